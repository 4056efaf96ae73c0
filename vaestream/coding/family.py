"""Operating points over a *family* of models: pick the model and quality that meet a PSNR or bit target.

A family directory holds model directories (each with ``config.json``, ``ckpt/`` and ``coder_tables.npz``),
typically one rate-distortion model per lambda (``ModelConfig.lmbda``, :func:`vaestream.objective.rd_loss`)::

    FAMILY/lmbda-100/  FAMILY/lmbda-1000/  ...

Every (model, quality on its ladder) pair is an operating point with a rate R (container bits per record,
header and frames included) and a distortion, PSNR = 10 log10(1 / MSE) over the batch (records in [0, 1],
MSE over every value of the batch). :func:`choose` returns

* for ``psnr=T``: the point with the fewest bits among those with PSNR >= T;
* for ``bpp=b``: the point with the highest PSNR among those with R / D <= b (D values per record).

**Measured on which records.** By default on the records being compressed: decoding is a pure function of
the bitstream (issue 12; fixed 64-row blocks), so the reconstruction the encoder computes is bit for bit
the one every receiver will decode, and the PSNR it measures is the PSNR delivered, not an estimate. That
costs one decode per candidate (the ladder has 19 qualities). A held-back batch (``select_on``) is the
alternative when one choice should serve many later batches (a stream): the target then holds on the
held-back batch, and on new records only as far as they resemble it.

The container records the model: its header carries the first 4 bytes of the model fingerprint, and
:func:`codec_for` finds the member whose tables were built for that fingerprint (odds of a clash between
two members 2^-32 per pair).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np

from vaestream.coding import container
from vaestream.coding.rdmetrics import psnr_db
from vaestream.errors import ConfigError, ModelError


def members(family: str | os.PathLike) -> list[Path]:
    """The model directories of ``family`` that have coder tables, ordered by lambda (ELBO models last), then
    name. Raises :class:`ModelError` if there are none."""
    from vaestream.coding.codec import TABLES_FILE
    from vaestream.store import read_config

    root = Path(family)
    if not root.is_dir():
        raise ModelError(f"{root}: not a directory of models")
    found = [d for d in sorted(root.iterdir()) if (d / "config.json").is_file() and (d / TABLES_FILE).is_file()]
    if not found:
        raise ModelError(f"{root}: no model directories with coder tables (config.json + coder_tables.npz)")

    def key(d: Path):
        lm = read_config(d).lmbda
        return (lm is None, lm or 0.0, d.name)

    return sorted(found, key=key)


def operating_points(codec, records, with_ssim: bool = False) -> list[dict]:
    """Every quality of ``codec``'s ladder on ``records``: ``{"quality", "bits_per_record", "mse", "psnr_db"}``
    (and ``"ssim"``, :func:`vaestream.coding.rdmetrics.ssim` over the pictures, with ``with_ssim``).

    Bits are those of ``codec.compress(records, quality)`` (the whole container); the reconstruction is the
    decoded stream's (``codec.decode`` of its codes, which ``decompress`` reproduces bit for bit)."""
    from vaestream.coding.coder import quantize
    from vaestream.coding.rdmetrics import ssim

    x, _ = codec.model_inputs(records)
    if len(x) == 0:
        raise ConfigError("no records to measure operating points on")
    mean, _ = codec.posterior(x)
    rows = []
    for q in codec.qualities:
        codes = quantize(mean, codec.tables, q)
        bits = 8 * len(codec.compress_codes(codes, q)) / len(x)
        x_hat = codec.decode(codes, q)
        mse = float(np.mean((x - x_hat) ** 2))
        rows.append({"quality": float(q), "bits_per_record": bits, "mse": mse, "psnr_db": psnr_db(mse)})
        if with_ssim:
            shape = (len(x),) + tuple(codec.config.input_shape)
            rows[-1]["ssim"] = ssim(np.clip(x_hat, 0, 1).reshape(shape), x.reshape(shape))
    return rows


def choose(family: str | os.PathLike, records, psnr: float | None = None, bpp: float | None = None) -> dict:
    """The operating point of ``family`` for a target, measured on ``records`` (see the module docstring).

    Returns ``{"model": Path, "lmbda", "quality", "bits_per_record", "psnr_db", "mse", "candidates": [...]}``
    (``candidates``: every point measured, with its model). Raises :class:`ConfigError` if no point meets
    the target, naming the best one can get.
    """
    from vaestream.coding import codec as codec_mod

    if (psnr is None) == (bpp is None):
        raise ConfigError("give one target: psnr (dB) or bpp (bits per value)")
    target = psnr if psnr is not None else bpp
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ConfigError(f"target must be a positive number, got {target!r}")
    points = []
    for d in members(family):
        c = codec_mod.load(d)
        for r in operating_points(c, records):
            points.append({"model": d, "lmbda": c.config.lmbda, **r,
                           "bits_per_value": r["bits_per_record"] / c.config.input_dim})
    if psnr is not None:
        ok = [p for p in points if p["psnr_db"] >= psnr]
        if not ok:
            best = max(points, key=lambda p: p["psnr_db"])
            raise ConfigError(f"no model of {family} reaches {psnr:g} dB on these records (best: {best['psnr_db']:.2f}"
                              f" dB, {best['model'].name} at quality {best['quality']:g})")
        pick = min(ok, key=lambda p: (p["bits_per_record"], -p["psnr_db"]))
    else:
        ok = [p for p in points if p["bits_per_value"] <= bpp]
        if not ok:
            least = min(points, key=lambda p: p["bits_per_value"])
            raise ConfigError(f"no model of {family} fits {bpp:g} bits per value on these records (least: "
                              f"{least['bits_per_value']:.4f}, {least['model'].name})")
        pick = max(ok, key=lambda p: (p["psnr_db"], -p["bits_per_record"]))
    return {**pick, "candidates": points}


def codec_for(family: str | os.PathLike, blob: bytes, **kwargs):
    """The codec of the member of ``family`` that wrote ``blob`` (matched by the header's model fingerprint).
    ``kwargs`` go to :func:`vaestream.coding.codec.load`."""
    from vaestream.coding import codec as codec_mod
    from vaestream.coding.coder import CoderTables

    fp = container.read_header(io.BytesIO(bytes(blob))).fingerprint.hex()
    for d in members(family):
        if CoderTables.load(d / codec_mod.TABLES_FILE).fingerprint.startswith(fp):
            return codec_mod.load(d, **kwargs)
    raise ModelError(f"{family}: no member was written by model {fp}... (the stream's fingerprint)")

"""Operating points over a *family* of models: pick the model and quality that meet a PSNR or bit target.

A family directory holds model directories of two kinds:

* **lossy members** (``config.json``, ``ckpt/`` and ``coder_tables.npz``), typically one rate-distortion
  model per lambda (``ModelConfig.lmbda``, :func:`vaestream.objective.rd_loss`), whose points are the
  qualities of the coder's ladder (the quantised latent, decoded by the decoder network);
* **near-lossless members**: a bits-back model of 8-bit pixels (``beta_binomial`` likelihood, MLP), whose
  points are the pixel levels of :data:`LEVELS_LADDER` (:class:`vaestream.coding.bitsback.coder.LosslessCoder`
  with ``levels=K``: every pixel rounded to the nearest of K levels and the level image coded exactly, so
  each pixel is within a known bound of the original). They reach the high-PSNR end a decoder network
  does not (the bound is exact, whatever the model), where a lossy member's curve flattens::

    FAMILY/lmbda-100/  FAMILY/lmbda-1000/  ...  FAMILY/bitsback/

Every (model, quality or levels) pair is an operating point with a rate R (container bits per record,
header and frames included) and a distortion, PSNR = 10 log10(1 / MSE) over the batch (records in [0, 1],
MSE over every value of the batch). With ``rdo``, a lossy member also offers its *rate-distortion optimised*
points (:mod:`vaestream.coding.rdo`: the same streams, each record's codes searched for bits + lambda MSE;
fewer bits at the same PSNR, ~20x slower to encode). :func:`choose` returns

* for ``psnr=T``: the point with the fewest bits among those with PSNR >= T;
* for ``bpp=b``: the point with the highest PSNR among those with R / D <= b (D values per record).

**Measured on which records.** By default on the records being compressed: decoding is a pure function of
the bitstream (fixed 64-row blocks), so the reconstruction the encoder computes is bit for bit
the one every receiver will decode, and the PSNR it measures is the PSNR delivered, not an estimate. That
costs one decode per candidate (the ladder has 19 qualities). A held-back batch (``select_on``) is the
alternative when one choice should serve many later batches (a stream): the target then holds on the
held-back batch, and on new records only as far as they resemble it.

The container records the model: its header carries the first 4 bytes of the model fingerprint (and a
near-lossless stream's frames their K), and :func:`codec_for` finds the member whose tables were built for
that fingerprint, or whose model has it (odds of a clash between two members 2^-32 per pair).

One point serves the whole batch here; :mod:`vaestream.coding.per_record` gives each record its own point of the
family (``compress --family --per-record``).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np

from vaestream.coding import container
from vaestream.metrics import psnr_db
from vaestream.errors import ConfigError, ModelError


LEVELS_LADDER = (2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 64)
"""The pixel levels K a near-lossless member is measured at with ``reconstruction="level"`` (max error 127, 64,
42, 32, 26, 21, 18, 14, 12, 8, 6, 4, 2 counts)."""
MEAN_LADDER = (2, 3, 4, 5, 6, 8)
"""... and with ``reconstruction="mean"`` (E[n | level, z]: where the levels are coarse it buys 0.5-3.5 dB at the
same bits; measured on MNIST, K = 2: 20.7 -> 24.3 dB), and with ``"learned"`` at every K whose context model
has a reconstruction network."""


RDO_QUALITIES = (2.0 ** 0.5, 2.0, 2.0 ** 1.5, 4.0, 2.0 ** 2.5)
"""The qualities a lossy member's rate-distortion optimised points are measured at (with ``rdo``): the coarse
end of the ladder, where the search pays (at fine qualities the rounding error is already small)."""
RDO_RATIOS = (1.0,)
"""... with ``rdo_lmbda`` = the member's training ``lmbda`` times each of these."""


def is_lossy(model_dir: Path) -> bool:
    """Whether ``model_dir`` has coder tables (the lossy codec's operating points)."""
    from vaestream.coding.codec import TABLES_FILE

    return (Path(model_dir) / TABLES_FILE).is_file()


def is_near_lossless(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a model the bits-back coder can code 8-bit pixels with near-losslessly: a
    ``beta_binomial`` MLP with one stochastic layer (a two-layer model codes only losslessly, see
    :class:`vaestream.coding.bitsback.coder.LosslessCoder`)."""
    from vaestream.store import read_config

    cfg = read_config(model_dir)
    return cfg.likelihood == "beta_binomial" and cfg.arch == "mlp" and not cfg.hierarchical


def members(family: str | os.PathLike) -> list[Path]:
    """The model directories of ``family`` that are lossy members (coder tables) or near-lossless members (a
    bits-back model of 8-bit pixels), ordered by lambda (models without one last), then name. Raises
    :class:`ModelError` if there are none."""
    from vaestream.store import read_config

    root = Path(family)
    if not root.is_dir():
        raise ModelError(f"{root}: not a directory of models")
    found = [d for d in sorted(root.iterdir())
             if (d / "config.json").is_file() and (is_lossy(d) or is_near_lossless(d))]
    if not found:
        raise ModelError(f"{root}: no model directories with coder tables (config.json + coder_tables.npz) "
                         "and no bits-back (beta_binomial) models")

    def key(d: Path):
        lm = read_config(d).lmbda
        return (lm is None, lm or 0.0, d.name)

    return sorted(found, key=key)


def operating_points(codec, records, with_ssim: bool = False, rdo: bool = False) -> list[dict]:
    """Every quality of ``codec``'s ladder on ``records``: ``{"quality", "rdo_lmbda", "bits_per_record", "mse",
    "psnr_db"}`` (and ``"ssim"``, :func:`vaestream.metrics.ssim` over the pictures, with
    ``with_ssim``). ``rdo_lmbda`` is None: the rounded posterior means.

    With ``rdo`` (a model trained with a ``lmbda``), also the rate-distortion optimised points
    (:mod:`vaestream.coding.rdo`): each quality of :data:`RDO_QUALITIES` with ``rdo_lmbda`` = the model's
    ``lmbda`` times each of :data:`RDO_RATIOS`. Each costs ``rdo.DEFAULT_STEPS`` decoder passes per record.

    Bits are those of ``codec.compress(records, quality)`` (the whole container); the reconstruction is the
    decoded stream's (``codec.decode`` of its codes, which ``decompress`` reproduces bit for bit)."""
    from vaestream.metrics import ssim

    x, _ = codec.model_inputs(records)
    if len(x) == 0:
        raise ConfigError("no records to measure operating points on")
    mean, _ = codec.posterior(x)
    settings = [(float(q), None) for q in codec.qualities]
    if rdo and codec.config.lmbda:
        settings += [(codec.ladder_quality(q), float(r * codec.config.lmbda)) for q in RDO_QUALITIES
                     for r in RDO_RATIOS]
    rows = []
    for q, lm in settings:
        codes = codec.codes_of(x, mean, q, lm)
        bits = 8 * len(codec.compress_codes(codes, q)) / len(x)
        x_hat = codec.decode(codes, q)
        mse = float(np.mean((x - x_hat) ** 2))
        rows.append({"quality": q, "rdo_lmbda": lm, "bits_per_record": bits, "mse": mse, "psnr_db": psnr_db(mse)})
        if with_ssim:
            shape = (len(x),) + tuple(codec.config.input_shape)
            rows[-1]["ssim"] = ssim(np.clip(x_hat, 0, 1).reshape(shape), x.reshape(shape))
    return rows


def near_lossless_points(coder, records, ladder=None, with_ssim: bool = False) -> list[dict]:
    """Every (K, reconstruction) of ``ladder`` (default: :data:`LEVELS_LADDER` with ``"level"``, then
    :data:`MEAN_LADDER` with ``"mean"``, then ``"learned"`` where the coder's context model has a reconstruction
    network) with the bits-back coder ``coder``
    (:class:`vaestream.coding.bitsback.coder.LosslessCoder`) on ``records`` (8-bit counts): ``{"levels",
    "reconstruction", "max_error", "bits_per_record", "mse", "psnr_db"}`` (and ``"ssim"``). Bits are those of
    the whole container; the reconstruction is what ``decompress`` returns (computed while coding:
    :meth:`~vaestream.coding.bitsback.coder.LosslessCoder.compress_and_reconstruct`, tested to be identical)."""
    from vaestream.coding.bitsback.tables import level_grids
    from vaestream.coding.bitsback.coder import LosslessCoder
    from vaestream.metrics import ssim

    x, _ = coder._records(records, "records")
    if len(x) == 0:
        raise ConfigError("no records to measure operating points on")
    xf = x.astype(np.float64) / 255.0
    if ladder is None:
        ladder = [(k, "level") for k in LEVELS_LADDER] + [(k, "mean") for k in MEAN_LADDER]
        if coder.use_context:
            ladder += [(k, "learned") for k, cm in sorted(coder.contexts.items()) if cm.has_reconstruction]
    level_grids([k for k, _ in ladder])  # every K's tables in one pass over the pmfs
    rows = []
    for k, how in ladder:
        c = LosslessCoder(coder.model, levels=k, frame_records=coder.frame_records, reconstruction=how,
                          contexts=coder.contexts, use_context=coder.use_context)
        blob, x_hat = c.compress_and_reconstruct(x)
        bits = 8 * len(blob) / len(x)
        x_hat = x_hat.astype(np.float64) / 255.0
        mse = float(np.mean((xf - x_hat) ** 2))
        rows.append({"levels": int(k), "reconstruction": how, "max_error": c.max_error, "bits_per_record": bits,
                     "mse": mse, "psnr_db": psnr_db(mse), "context": c.context is not None})
        if with_ssim:
            shape = (len(x),) + tuple(c.config.input_shape)
            rows[-1]["ssim"] = ssim(x_hat.reshape(shape), xf.reshape(shape))
    return rows


def member_points(model_dir: Path, records, with_ssim: bool = False, rdo: bool = False) -> list[dict]:
    """The operating points of one member on ``records`` (uint8 pictures): its coder's qualities if it has
    tables (and with ``rdo`` its rate-distortion optimised points, :func:`operating_points`), its
    :data:`LEVELS_LADDER` if it is a bits-back model of 8-bit pixels (``"levels"`` names them; a lossy point
    has ``"levels": None``, a near-lossless one ``"quality"`` and ``"rdo_lmbda"`` None). Each point has
    ``"model"`` (the directory), ``"lmbda"`` and ``"bits_per_value"``."""
    from vaestream.coding import codec as codec_mod

    d = Path(model_dir)
    points = []
    if is_lossy(d):
        c = codec_mod.load(d)
        for r in operating_points(c, records, with_ssim=with_ssim, rdo=rdo):
            points.append({"model": d, "lmbda": c.config.lmbda, "levels": None, "reconstruction": None, **r,
                           "bits_per_value": r["bits_per_record"] / c.config.input_dim})
    if is_near_lossless(d):
        coder = near_lossless_coder(d)
        for r in near_lossless_points(coder, records, with_ssim=with_ssim):
            points.append({"model": d, "lmbda": coder.config.lmbda, "quality": None, "rdo_lmbda": None, **r,
                           "bits_per_value": r["bits_per_record"] / coder.config.input_dim})
    return points


def near_lossless_coder(model_dir: str | os.PathLike, levels: int | None = None, reconstruction: str = "level",
                        use_context: bool = True):
    """The bits-back coder of the member ``model_dir`` (lossless; or near-lossless with ``levels``), with the
    pixel context models beside it (``MODEL_DIR/context/``, :mod:`vaestream.coding.bitsback.context`): it codes with
    the one of its K unless ``use_context`` is False, and decodes streams written with any of them."""
    from vaestream.coding.bitsback.context import load_contexts
    from vaestream.coding.bitsback.coder import LosslessCoder
    from vaestream.store import load_model

    return LosslessCoder(load_model(model_dir), levels=levels, reconstruction=reconstruction,
                         contexts=load_contexts(model_dir), use_context=use_context)


def compress(pick: dict, records) -> bytes:
    """Compress ``records`` at the operating point ``pick`` (from :func:`choose`)."""
    from vaestream.coding import codec as codec_mod

    if pick.get("levels"):
        return near_lossless_coder(pick["model"], pick["levels"], pick["reconstruction"]).compress(records)
    return codec_mod.load(pick["model"]).compress(records, quality=pick["quality"], rdo_lmbda=pick.get("rdo_lmbda"))


def choose(family: str | os.PathLike, records, psnr: float | None = None, bpp: float | None = None,
           rdo: bool = False) -> dict:
    """The operating point of ``family`` for a target, measured on ``records`` (see the module docstring).

    With ``rdo``, the lossy members' rate-distortion optimised points are candidates too
    (:func:`operating_points`): fewer bits for the same PSNR, at ~1/20 of the encoding speed.

    Returns ``{"model": Path, "lmbda", "quality", "rdo_lmbda", "levels", "bits_per_record", "psnr_db", "mse",
    "candidates": [...]}`` (a lossy point has ``levels`` None, a near-lossless one ``quality`` None;
    ``candidates``: every point measured, with its model). :func:`compress` codes records at it. Raises
    :class:`ConfigError` if no point meets the target, naming the best one can get.
    """
    if (psnr is None) == (bpp is None):
        raise ConfigError("give one target: psnr (dB) or bpp (bits per value)")
    target = psnr if psnr is not None else bpp
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ConfigError(f"target must be a positive number, got {target!r}")
    points = [p for d in members(family) for p in member_points(d, records, rdo=rdo)]
    if psnr is not None:
        ok = [p for p in points if p["psnr_db"] >= psnr]
        if not ok:
            best = max(points, key=lambda p: p["psnr_db"])
            raise ConfigError(f"no model of {family} reaches {psnr:g} dB on these records (best: {best['psnr_db']:.2f}"
                              f" dB, {best['model'].name} at {_setting(best)})")
        pick = min(ok, key=lambda p: (p["bits_per_record"], -p["psnr_db"]))
    else:
        ok = [p for p in points if p["bits_per_value"] <= bpp]
        if not ok:
            least = min(points, key=lambda p: p["bits_per_value"])
            raise ConfigError(f"no model of {family} fits {bpp:g} bits per value on these records (least: "
                              f"{least['bits_per_value']:.4f}, {least['model'].name})")
        pick = max(ok, key=lambda p: (p["psnr_db"], -p["bits_per_record"]))
    return {**pick, "candidates": points}


def _setting(p: dict) -> str:
    if p.get("levels"):
        return f"{p['levels']} levels ({p['reconstruction']})"
    return f"quality {p['quality']:g}" + (f", RDO lambda {p['rdo_lmbda']:g}" if p.get("rdo_lmbda") else "")


def codec_for(family: str | os.PathLike, blob: bytes, **kwargs):
    """The decoder of the member of ``family`` that wrote ``blob`` (matched by the header's model fingerprint):
    a :class:`vaestream.coding.codec.Codec` for a lossy stream (``kwargs`` go to
    :func:`vaestream.coding.codec.load`), the member's :class:`vaestream.coding.bitsback.coder.LosslessCoder` for a
    bits-back (lossless or near-lossless) one. Both decode it with ``decompress(blob)``."""
    from vaestream.coding import codec as codec_mod
    from vaestream.coding.tables import CoderTables

    h = container.read_header(io.BytesIO(bytes(blob)))
    fp = h.fingerprint.hex()
    for d in members(family):
        if h.lossless:
            if is_near_lossless(d):
                coder = near_lossless_coder(d)
                if coder.accepts(h.fingerprint):
                    return coder
        elif is_lossy(d) and CoderTables.load(d / codec_mod.TABLES_FILE).fingerprint.startswith(fp):
            return codec_mod.load(d, **kwargs)
    raise ModelError(f"{family}: no member was written by model {fp}... (the stream's fingerprint)")

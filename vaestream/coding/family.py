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
near-lossless stream's frames their K), and :func:`vaestream.coding.streams.open_stream` finds the member whose
tables were built for that fingerprint, or whose model has it (odds of a clash between two members 2^-32 per pair).

Each point is an :class:`OperatingPoint`: the setting (model, quality or K, reconstruction, RDO multiplier) and
what was measured at it; :meth:`OperatingPoint.coder` is the coder that compresses at it.

One point serves the whole batch here; :mod:`vaestream.coding.per_record` gives each record its own point of the
family (``compress --family --per-record``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from vaestream.coding import container
from vaestream.metrics import psnr_db
from vaestream.errors import ConfigError, ModelError, ModelMismatchError


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


def bitsback_coder(model_dir: str | os.PathLike, levels: int | None = None, reconstruction: str = "level",
                   use_context: bool = True, *, model=None, contexts=None, **kwargs):
    """The bits-back coder of the model directory ``model_dir``: lossless, or near-lossless with ``levels`` (K),
    with the pixel context models beside it (``MODEL_DIR/context/``, :mod:`vaestream.coding.bitsback.context`).
    It codes K with the directory's context model for K unless ``use_context`` is False, and decodes streams
    written with any of them. ``reconstruction="learned"`` needs that context model's reconstruction network.

    ``model`` / ``contexts``: the directory's VAE and context models if already loaded; ``kwargs`` go to
    :class:`vaestream.coding.bitsback.coder.LosslessCoder` (``frame_records``, ``group``, ...).

    Raises:
      ModelError: ``model_dir`` is not a model directory (a SavedModel export carries only the decoder mean).
      ConfigError: the model cannot code so (not a discrete likelihood, ``levels`` out of range), or
        ``reconstruction="learned"`` without a reconstruction network for K in the directory.
    """
    from vaestream.coding.bitsback.coder import LosslessCoder
    from vaestream.coding.bitsback.context import load_contexts

    d = Path(model_dir)
    if model is None:
        if not (d / "config.json").is_file():
            raise ModelError(f"{d}: bits-back coding needs a model directory (config.json + ckpt/), not a "
                             "SavedModel export")
        from vaestream.store import load_model

        model = load_model(d)
    if contexts is None:
        contexts = load_contexts(d)
    if reconstruction == "learned" and levels is not None:
        cm = contexts.get(int(levels))
        if not use_context or cm is None or not cm.has_reconstruction:
            why = ("is not used (use_context False)" if cm is not None and not use_context else
                   "has no reconstruction network" if cm is not None else "does not exist")
            raise ConfigError(f"{d}: reconstruction 'learned' needs the directory's pixel context model for K = "
                              f"{levels} with a reconstruction network (context/levels-{levels}.npz), which {why}; "
                              "train it with vaestream train-context")
    return LosslessCoder(model, levels=levels, reconstruction=reconstruction, contexts=contexts,
                         use_context=use_context, **kwargs)


def _lossy(d: Path, h: container.Header, name: str):
    from vaestream.coding import codec as codec_mod

    c = codec_mod.load(d)
    fp = h.fingerprint.hex()
    if not c.fingerprint.startswith(fp):
        raise ModelMismatchError(f"{name}: written by model {fp}..., not by the model in {d} "
                                 f"({c.fingerprint[:len(fp)]}...)")
    return c


def _bitsback(d: Path, h: container.Header, name: str):
    from vaestream.coding.bitsback.context import load_contexts, stream_context
    from vaestream.store import load_model

    if not (d / "config.json").is_file():
        raise ModelError(f"{name}: a bits-back stream; it needs the model directory that wrote it, not the "
                         f"SavedModel export {d}")
    model, contexts = load_model(d), load_contexts(d)
    mfp = model.fingerprint()
    if not stream_context(h.fingerprint, mfp, contexts)[0]:
        raise ModelMismatchError(f"{name}: written by model {h.fingerprint.hex()}..., not by the model in {d} "
                                 f"({mfp[:2 * container.FINGERPRINT_BYTES]}...) alone nor with one of its "
                                 f"{len(contexts)} pixel context models")
    coder = bitsback_coder(d, model=model, contexts=contexts)
    coder.check_header(h, name)
    return coder


def _member(family: Path, h: container.Header, name: str):
    """The decoder of the member of ``family`` that wrote the container whose header is ``h``."""
    from vaestream.coding.codec import TABLES_FILE
    from vaestream.coding.tables import CoderTables

    fp = h.fingerprint.hex()
    for d in members(family):
        if h.lossless:
            if is_near_lossless(d):
                coder = bitsback_coder(d)
                if coder.accepts(h.fingerprint):
                    return coder
        elif is_lossy(d) and CoderTables.load(d / TABLES_FILE).fingerprint.startswith(fp):
            return _lossy(d, h, name)
    raise ModelError(f"{name}: written by model {fp}..., which is not a member of {family}")


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model directory (``config.json``) or a SavedModel export (``saved_model.pb``), not a
    family directory."""
    p = Path(path)
    return (p / "config.json").is_file() or (p / "saved_model.pb").is_file()


def container_coder(h: container.Header, model_or_family: str | os.PathLike, name: str = "stream"):
    """The coder that decodes the container whose header is ``h``: of the model directory (or SavedModel export)
    ``model_or_family``, or of the member of the family ``model_or_family`` whose fingerprint the header carries:
    a :class:`vaestream.coding.codec.Codec` for a lossy container, :func:`bitsback_coder` for a bits-back one.
    Raises :class:`ModelMismatchError` / :class:`ModelError` naming ``name`` and the fingerprint if the model is
    not the one given or not in the family (:func:`vaestream.coding.streams.open_stream` reads the header)."""
    root = Path(model_or_family)
    if not is_model_dir(root):
        return _member(root, h, name)
    return _bitsback(root, h, name) if h.lossless else _lossy(root, h, name)


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """One operating point of a family member: its setting and what was measured at it.

    A lossy point has ``quality`` (a step of the member's ladder) and optionally ``rdo_lmbda`` (rate-distortion
    optimised codes); a near-lossless point has ``levels`` (K) and ``reconstruction``. The measures are those
    of the real container on the records measured (``bits_per_record``, ``bits_per_value``, ``mse`` and
    ``psnr_db`` on [0, 1], ``ssim`` if asked). Per-record candidates
    (:func:`vaestream.coding.per_record.candidates`) also carry each record's estimated bits and squared error
    (``record_bits``, ``record_se``, float64 ``[N]``).
    """

    model: Path
    quality: float | None = None
    levels: int | None = None
    reconstruction: str | None = None
    rdo_lmbda: float | None = None
    lmbda: float | None = None
    bits_per_record: float = math.nan
    bits_per_value: float = math.nan
    psnr_db: float = math.nan
    mse: float = math.nan
    ssim: float | None = None
    max_error: int | None = None
    context: bool | None = None
    record_bits: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    record_se: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        """``"lossy"`` (a quality of the coder tables) or ``"near_lossless"`` (K pixel levels, bits-back)."""
        return "lossy" if self.levels is None else "near_lossless"

    def coder(self):
        """The coder that compresses at this point: a :class:`vaestream.coding.codec.Codec` set to its quality
        (``compress(x, rdo_lmbda=point.rdo_lmbda)`` for an RDO point, or :meth:`compress`), or the member's
        bits-back coder with its K, reconstruction and context models
        (:func:`bitsback_coder`)."""
        if self.kind == "lossy":
            from vaestream.coding import codec as codec_mod

            return codec_mod.load(self.model, quality=self.quality)
        return bitsback_coder(self.model, self.levels, self.reconstruction or "level")

    def compress(self, records) -> bytes:
        """``records`` compressed at this point (its RDO multiplier included)."""
        if self.kind == "lossy":
            return self.coder().compress(records, rdo_lmbda=self.rdo_lmbda)
        return self.coder().compress(records)

    def describe(self) -> str:
        """The setting in words, e.g. ``lmbda-100 at quality 2`` or ``bitsback at 4 levels (mean)``."""
        if self.kind == "near_lossless":
            return f"{Path(self.model).name} at {self.levels} levels ({self.reconstruction})"
        rdo = f", RDO lambda {self.rdo_lmbda:g}" if self.rdo_lmbda else ""
        return f"{Path(self.model).name} at quality {self.quality:g}{rdo}"

    def to_dict(self) -> dict[str, Any]:
        """The point as JSON-ready values (``model`` as a string; the per-record arrays and unset measures left
        out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("record_bits", "record_se")}
        out["model"] = str(self.model)
        for k in ("ssim", "max_error", "context"):
            if out[k] is None:
                del out[k]
        return out


def _measured(model: Path, x_true: np.ndarray, x_hat: np.ndarray, nbytes: int, with_ssim: bool,
              input_shape, **setting) -> OperatingPoint:
    """The point of ``setting`` whose container has ``nbytes`` and whose decoded records are ``x_hat`` (float on
    [0, 1], like ``x_true``)."""
    from vaestream.metrics import ssim

    n, d = x_true.shape
    mse = float(np.mean((x_true - x_hat) ** 2))
    s = None
    if with_ssim:
        shape = (n,) + tuple(input_shape)
        s = ssim(np.clip(x_hat, 0, 1).reshape(shape), x_true.reshape(shape))
    bits = 8 * nbytes / n
    return OperatingPoint(model=Path(model), bits_per_record=bits, bits_per_value=bits / d, mse=mse,
                          psnr_db=psnr_db(mse), ssim=s, **setting)


def operating_points(codec, records, with_ssim: bool = False, rdo: bool = False) -> list[OperatingPoint]:
    """Every quality of ``codec``'s ladder on ``records`` (``rdo_lmbda`` None: the rounded posterior means), and
    with ``rdo`` (a model trained with a ``lmbda``) also the rate-distortion optimised points
    (:mod:`vaestream.coding.rdo`): each quality of :data:`RDO_QUALITIES` with ``rdo_lmbda`` = the model's
    ``lmbda`` times each of :data:`RDO_RATIOS`. Each of these costs ``rdo.DEFAULT_STEPS`` decoder passes per record.

    Bits are those of the container of the codes (what ``compress`` writes); the reconstruction is the
    decoded stream's (``codec.decode`` of its codes, which ``decompress`` reproduces bit for bit)."""
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
        rows.append(_measured(Path(codec.name), x, codec.decode(codes, q), len(codec.compress_codes(codes, q)),
                              with_ssim, codec.config.input_shape, quality=q, rdo_lmbda=lm,
                              lmbda=codec.config.lmbda))
    return rows


def near_lossless_points(model_dir: str | os.PathLike, records, ladder=None,
                         with_ssim: bool = False) -> list[OperatingPoint]:
    """Every (K, reconstruction) of ``ladder`` (default: :data:`LEVELS_LADDER` with ``"level"``, then
    :data:`MEAN_LADDER` with ``"mean"``, then ``"learned"`` where the member's context model has a reconstruction
    network) of the bits-back member ``model_dir`` (coded with its context models,
    :func:`vaestream.coding.family.bitsback_coder`) on ``records`` (8-bit counts). Bits are those of the whole
    container; the reconstruction is what ``decompress`` returns (computed while coding:
    :meth:`~vaestream.coding.bitsback.coder.LosslessCoder.compress_and_reconstruct`, tested to be identical)."""
    from vaestream.coding.bitsback.tables import level_grids

    base = bitsback_coder(model_dir)
    x, _ = base._records(records, "records")
    if len(x) == 0:
        raise ConfigError("no records to measure operating points on")
    xf = x.astype(np.float64) / 255.0
    if ladder is None:
        ladder = [(k, "level") for k in LEVELS_LADDER] + [(k, "mean") for k in MEAN_LADDER]
        ladder += [(k, "learned") for k, cm in sorted(base.contexts.items()) if cm.has_reconstruction]
    level_grids([k for k, _ in ladder])  # every K's tables in one pass over the pmfs
    rows = []
    for k, how in ladder:
        c = bitsback_coder(model_dir, k, how, model=base.model, contexts=base.contexts)
        blob, x_hat = c.compress_and_reconstruct(x)
        rows.append(_measured(Path(model_dir), xf, x_hat.astype(np.float64) / 255.0, len(blob), with_ssim,
                              c.config.input_shape, levels=int(k), reconstruction=how, lmbda=c.config.lmbda,
                              max_error=c.max_error, context=c.context is not None))
    return rows


def member_points(model_dir: str | os.PathLike, records, with_ssim: bool = False,
                  rdo: bool = False) -> list[OperatingPoint]:
    """The operating points of one member on ``records`` (uint8 pictures): its coder's qualities if it has
    tables (and with ``rdo`` its rate-distortion optimised points, :func:`operating_points`), its
    :data:`LEVELS_LADDER` if it is a bits-back model of 8-bit pixels (:func:`near_lossless_points`)."""
    from vaestream.coding import codec as codec_mod

    d = Path(model_dir)
    points = []
    if is_lossy(d):
        points += operating_points(codec_mod.load(d), records, with_ssim=with_ssim, rdo=rdo)
    if is_near_lossless(d):
        points += near_lossless_points(d, records, with_ssim=with_ssim)
    return points


def measure(family: str | os.PathLike, records, rdo: bool = False) -> list[OperatingPoint]:
    """Every operating point of every member of ``family`` on ``records`` (:func:`member_points`)."""
    return [p for d in members(family) for p in member_points(d, records, rdo=rdo)]


def choose(family: str | os.PathLike, records=None, psnr: float | None = None, bpp: float | None = None,
           rdo: bool = False, points: list[OperatingPoint] | None = None) -> OperatingPoint:
    """The operating point of ``family`` for a target, measured on ``records`` (see the module docstring), or
    among ``points`` (:func:`measure`) if given.

    With ``rdo``, the lossy members' rate-distortion optimised points are candidates too
    (:func:`operating_points`): fewer bits for the same PSNR, at ~1/20 of the encoding speed.
    :meth:`OperatingPoint.compress` codes records at the point returned. Raises :class:`ConfigError` if no point
    meets the target, naming the best one can get.
    """
    if (psnr is None) == (bpp is None):
        raise ConfigError("give one target: psnr (dB) or bpp (bits per value)")
    target = psnr if psnr is not None else bpp
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ConfigError(f"target must be a positive number, got {target!r}")
    if points is None:
        points = measure(family, records, rdo=rdo)
    if psnr is not None:
        ok = [p for p in points if p.psnr_db >= psnr]
        if not ok:
            best = max(points, key=lambda p: p.psnr_db)
            raise ConfigError(f"no model of {family} reaches {psnr:g} dB on these records (best: {best.psnr_db:.2f}"
                              f" dB, {best.describe()})")
        return min(ok, key=lambda p: (p.bits_per_record, -p.psnr_db))
    ok = [p for p in points if p.bits_per_value <= bpp]
    if not ok:
        least = min(points, key=lambda p: p.bits_per_value)
        raise ConfigError(f"no model of {family} fits {bpp:g} bits per value on these records (least: "
                          f"{least.bits_per_value:.4f}, {least.describe()})")
    return max(ok, key=lambda p: (p.psnr_db, -p.bits_per_record))

"""Per-record operating points: each record of a batch coded at the family point that suits it.

:func:`vaestream.coding.family.choose` codes a whole batch at one (member, quality or K). Records differ: a plain
shirt is sharp at K = 6 for the bits a patterned one needs at K = 4. Like a conventional codec's mode
decision, the encoder may choose per record. For a Lagrange multiplier ``lmbda``, record i goes to

    j(i) = argmin_j  R_j(i) - log2 P(j) + lmbda SE_j(i)

over the family's candidate points j (:func:`candidates`): ``R_j(i)`` its bits at j, ``SE_j(i)`` the squared
error of its decoded 8-bit picture at j, summed over its values on the [0, 1] scale, ``-log2 P(j)`` what the
record map pays for j; a point that saves its records less than a stream costs is dropped (:func:`assign`). As
``lmbda`` grows, the batch's error falls and its bits rise, so a PSNR target is met at about the fewest bits by
the smallest ``lmbda`` that meets it (:func:`choose`, a bisection).

* The squared errors are those of the candidate's decoded pictures on the batch. A lossy point's are exact for
  any subset. A near-lossless point's ``mean`` / ``learned`` reconstruction depends on the z its chain draws, so a
  subset's error differs by a little (hundredths of a dB): :func:`compress_to` checks the target on the real
  streams and raises ``lmbda`` where it falls short.
* The bits are estimates: a lossy point's ideal code length; a near-lossless point's
  :meth:`~vaestream.coding.bitsback.coder.LosslessCoder.bits`, scaled so that they sum to the point's real
  container bits on the batch.

Fashion-MNIST, a jointly tuned family, full test set: 4-36 % fewer bits than its best single point at the same PSNR
from 19 to 32 dB; BD-rate against tiled WebP over 18-32 dB -53.4 % (single points: -46.4 %;
benchmarks/RESULTS_coder.md).

Stream ("VM", format 1; written and read by :func:`vaestream.coding.container.pack_per_record` /
:func:`~vaestream.coding.container.read_per_record`)::

    "VM" | format u8 (= 1) | record ndim u8 | record shape (ndim varints) | records varint | streams varint m
         | m x (records varint, bytes varint) | map bytes varint | map | CRC32 u32 | m streams

* the record shape: a record's as compressed (``[D]`` or ``[H, W]``);
* ``map``: which stream each record is in, in record order: an ANS code (constriction) of N symbols with the
  categorical distribution of the m counts (N H(counts) bits plus at most ~64); empty when m <= 1;
* the CRC32 covers every byte before it; each stream is an ordinary vaestream container (its own header,
  model fingerprint and CRCs) of its records in their order, decoded by the family member that wrote it
  (:func:`vaestream.coding.family.codec_for`).

Mixed streams decode to 8-bit pictures (uint8): a lossy point's reconstruction is rounded to the nearest count,
and its error is measured after that rounding.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from vaestream.coding import container, family
from vaestream.coding.bitsback import codecs as cs
from vaestream.metrics import psnr_db
from vaestream.errors import BitstreamError, ConfigError, DataError


def _pictures(records) -> tuple[np.ndarray, tuple[int, ...]]:
    """uint8 ``[N, D]`` or ``[N, H, W]`` -> (``[N, D]``, a record's shape)."""
    a = np.asarray(records)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or len(a) == 0:
        raise DataError(f"per-record coding takes a batch of 8-bit pictures (uint8 [N, D] or [N, H, W]), got "
                        f"{a.dtype} {a.shape}")
    return a.reshape(len(a), -1), tuple(int(s) for s in a.shape[1:])


def _to_counts(x_hat) -> np.ndarray:
    """A reconstruction (uint8 counts, or floats on [0, 1]) -> uint8 counts ``[N, D]``."""
    x_hat = np.asarray(x_hat)
    if x_hat.dtype != np.uint8:
        x_hat = np.rint(np.clip(x_hat.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return x_hat.reshape(len(x_hat), -1)


def _se(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    d = (x.astype(np.float64) - x_hat.astype(np.float64)) / 255.0
    return np.sum(d * d, axis=1)


def candidates(fam: str | os.PathLike, records, log=None) -> list[dict]:
    """Every candidate point of the family ``fam`` on ``records`` (uint8 pictures ``[N, ...]``), with per-record
    costs: ``{"model": Path, "quality", "levels", "reconstruction", "bits": float64 [N], "se": float64 [N],
    "bits_per_record", "psnr_db"}`` (``bits_per_record``: the point's real container bits on the whole batch).

    A lossy member offers every quality of its ladder (bits: the ideal code length of each record's codes). A
    near-lossless member offers each K of :data:`vaestream.coding.family.MEAN_LADDER` and each K it has a context
    model for (coded with it if it has one; ``"learned"`` reconstruction where the context model has a
    reconstruction network, else ``"mean"``); bits: :meth:`~vaestream.coding.bitsback.coder.LosslessCoder.bits`,
    scaled to the real container bits. ``log`` (optional) receives each point as it is measured."""
    from vaestream.coding import codec as codec_mod
    from vaestream.coding.bitsback.coder import LosslessCoder

    x, _ = _pictures(records)
    out = []
    for d in family.members(fam):
        if family.is_lossy(d):
            c = codec_mod.load(d)
            xs, _ = c.model_inputs(x)
            mean, _ = c.posterior(xs)
            for q in c.qualities:
                codes = c.codes_of(xs, mean, float(q))
                se = _se(x, _to_counts(c.decode(codes, float(q))))
                out.append({"model": d, "quality": float(q), "levels": None, "reconstruction": None,
                            "bits": c.ideal_bits(codes, float(q)).astype(np.float64), "se": se,
                            "bits_per_record": 8 * len(c.compress_codes(codes, float(q))) / len(x)})
                _done(out[-1], x.shape[1], log)
        if family.is_near_lossless(d):
            base = family.near_lossless_coder(d)
            ctx = base.contexts
            ladder = [(k, "learned" if k in ctx and ctx[k].has_reconstruction else "mean")
                      for k in sorted(set(family.MEAN_LADDER) | set(ctx))]
            for k, how in ladder:
                c = LosslessCoder(base.model, levels=k, reconstruction=how, contexts=base.contexts)
                blob, x_hat = c.compress_and_reconstruct(x)
                est = c.bits(x)
                real = 8.0 * len(blob)
                out.append({"model": d, "quality": None, "levels": int(k), "reconstruction": how,
                            "bits": est * (real / max(est.sum(), 1e-9)), "se": _se(x, x_hat),
                            "bits_per_record": real / len(x)})
                _done(out[-1], x.shape[1], log)
    return out


def _done(p: dict, d: int, log) -> None:
    p["psnr_db"] = psnr_db(float(np.mean(p["se"])) / d)
    if log is not None:
        log({k: (v.name if isinstance(v, Path) else v) for k, v in p.items() if k not in ("bits", "se")})


STREAM_BITS = 600.0
"""About what one more stream costs beyond its records' bits: a container header, a frame and the start of a
bits-back chain (500-850 bits on Fashion-MNIST, measured on 300 records). A point serves only records that save
more than this."""


def assign(points: list[dict], lmbda: float, stream_bits: float = STREAM_BITS, rounds: int = 200) -> np.ndarray:
    """Each record's point for the multiplier ``lmbda`` (bits per unit of squared error on [0, 1]), int ``[N]``:

        j(i) = argmin_j  bits_j(i) - log2 P(j) + lmbda se_j(i)

    where ``-log2 P(j)`` is what the record map pays for j (P: the points' shares of the previous round's
    assignment) and a point that saves its records less than ``stream_bits`` in all (against their next best
    point) is dropped, the weakest first; rounds until nothing changes (ties to the earlier point)."""
    cost = np.stack([p["bits"] for p in points]) + float(lmbda) * np.stack([p["se"] for p in points])
    n = cost.shape[1]
    active = np.ones(len(points), bool)
    share = np.full(len(points), 1.0 / len(points))
    j = np.argmin(cost, axis=0)
    for _ in range(rounds):
        c = np.where(active[:, None], cost - np.log2(np.maximum(share, 1.0 / n))[:, None], np.inf)
        last, j = j, np.argmin(c, axis=0)
        counts = np.bincount(j, minlength=len(points))
        share = counts / n
        if np.count_nonzero(counts) > 1:
            best = c[j, np.arange(n)]
            c[j, np.arange(n)] = np.inf
            saving = np.bincount(j, weights=np.min(c, axis=0) - best, minlength=len(points))
            weak = np.flatnonzero((counts > 0) & (saving < stream_bits))
            if len(weak):
                active[weak[np.argmin(saving[weak])]] = False
                continue
        if np.array_equal(j, last):
            break
    return j


def outcome(points: list[dict], j: np.ndarray, d: int) -> dict:
    """What the assignment ``j`` gives: ``{"bits_per_record"`` (estimated), ``"mse"``, ``"psnr_db"``}``, ``d``
    values per record."""
    n = np.arange(len(j))
    se = np.stack([p["se"] for p in points])[j, n]
    bits = np.stack([p["bits"] for p in points])[j, n]
    mse = float(se.mean()) / d
    return {"bits_per_record": float(bits.mean()), "mse": mse, "psnr_db": psnr_db(mse)}


def choose(points: list[dict], d: int, psnr: float | None = None, bpp: float | None = None) -> dict:
    """The multiplier for a target, by bisection over log(lmbda): for ``psnr=T``, the smallest ``lmbda`` whose
    assignment reaches PSNR >= T (exact, from the candidates' reconstructions); for ``bpp=b``, the largest whose
    estimated bits per value stay <= b. ``d``: values per record. Returns ``{"lmbda", "assignment": int [N],
    **outcome}``; raises :class:`ConfigError` if the target is out of the candidates' reach."""
    if (psnr is None) == (bpp is None):
        raise ConfigError("give one target: psnr (dB) or bpp (bits per value)")
    target = psnr if psnr is not None else bpp
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ConfigError(f"target must be a positive number, got {target!r}")

    def ok(lm: float) -> bool:
        o = outcome(points, assign(points, lm), d)
        return o["psnr_db"] >= psnr if psnr is not None else o["bits_per_record"] / d <= bpp

    lo, hi = 1e-3, 1e9  # bits per unit of squared error: from "bits only" to "error only"
    if psnr is not None and not ok(hi):
        raise ConfigError(f"no per-record assignment reaches {psnr:g} dB (best: "
                          f"{outcome(points, assign(points, hi), d)['psnr_db']:.2f} dB)")
    if bpp is not None and not ok(lo):
        raise ConfigError(f"no per-record assignment fits {bpp:g} bits per value")
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if ok(mid) == (psnr is not None):
            hi = mid
        else:
            lo = mid
    lm = hi if psnr is not None else lo
    j = assign(points, lm)
    return {"lmbda": lm, "assignment": j, **outcome(points, j, d)}


def _code_point(p: dict, x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Records ``x`` (uint8 ``[n, D]``) at point ``p`` -> (container, its decoded counts uint8 ``[n, D]``)."""
    if p.get("levels"):
        coder = family.near_lossless_coder(p["model"], p["levels"], p["reconstruction"])
        blob, x_hat = coder.compress_and_reconstruct(x)
        return blob, _to_counts(x_hat)
    from vaestream.coding import codec as codec_mod

    c = codec_mod.load(p["model"])
    blob = c.compress(x, quality=p["quality"])
    return blob, _to_counts(c.decompress(blob))


def compress(points: list[dict], j: np.ndarray, records) -> tuple[bytes, np.ndarray]:
    """The records (uint8 pictures ``[N, D]`` or ``[N, H, W]``), record i at ``points[j[i]]``: (one mixed stream
    (module docstring), what :func:`decompress` returns for it, uint8 ``[N, D]``)."""
    x, shape = _pictures(records)
    j = np.asarray(j, np.int64)
    if j.shape != (len(x),) or j.min() < 0 or j.max() >= len(points):
        raise ConfigError(f"an assignment of {len(x)} records to {len(points)} points, got {j.shape}")
    used = np.unique(j)
    x_hat = np.empty_like(x)
    streams = []
    for u in used:
        blob, x_hat[j == u] = _code_point(points[u], x[j == u])
        streams.append(blob)
    sym = np.searchsorted(used, j).astype(np.int32)
    counts = np.array([np.sum(j == u) for u in used], np.float64)
    code = b""
    if len(used) > 1:
        msg = cs.Categorical(counts / counts.sum(), n=len(sym)).push(cs.message(), sym)
        code = cs.words(msg).astype("<u4").tobytes()
    return container.pack_per_record(shape, len(x), list(zip(counts, streams)), code), x_hat


def compress_to(fam: str | os.PathLike, records, psnr: float | None = None, bpp: float | None = None,
                points: list[dict] | None = None) -> tuple[bytes, np.ndarray, dict]:
    """Compress ``records`` (uint8 pictures) per record over the family ``fam`` for a target: PSNR >= ``psnr``
    on the batch at the fewest bits (the delivered PSNR, checked on the real streams: a near-lossless point's
    reconstruction depends on the z its chain draws, so where it falls short, ``lmbda`` is raised and the batch
    coded again), or about ``bpp`` bits per value. ``points``: :func:`candidates` of these records, if measured.
    Returns (the mixed stream, what it decodes to (uint8 ``[N, D]``), ``{"lmbda", "bits_per_record", "psnr_db",
    "streams": [{"model", "quality", "levels", "reconstruction", "records"}]}``) with the real bits and PSNR."""
    x, _ = _pictures(records)
    points = candidates(fam, x) if points is None else points
    d = x.shape[1]
    goal = psnr
    for _ in range(5):
        ch = choose(points, d, psnr=goal, bpp=bpp)
        blob, x_hat = compress(points, ch["assignment"], records)
        got = psnr_db(float(np.mean(_se(x, x_hat))) / d)
        if psnr is None or got >= psnr:
            break
        goal += psnr - got + 0.005
    else:
        raise ConfigError(f"per-record coding missed {psnr:g} dB on the real streams ({got:.3f} dB)")
    j = ch["assignment"]
    streams = [{"model": str(points[u]["model"]), "quality": points[u]["quality"], "levels": points[u]["levels"],
                "reconstruction": points[u]["reconstruction"], "records": int(np.sum(j == u))} for u in np.unique(j)]
    return blob, x_hat, {"lmbda": ch["lmbda"], "bits_per_record": 8 * len(blob) / len(x), "psnr_db": got,
                  "streams": streams}


def read(blob, name: str = "stream") -> tuple[tuple[int, ...], list[tuple[int, bytes]], np.ndarray]:
    """Parse and verify a mixed stream: ``(a record's shape, [(records, container bytes), ...], the stream of each
    record int [N])``. Raises :class:`BitstreamError` naming ``name`` for anything malformed, truncated or corrupt."""
    shape, n, streams, code = container.read_per_record(blob, name)
    m = len(streams)
    if m == 1:
        return shape, streams, np.zeros(n, np.int64)
    counts = np.array([c for c, _ in streams], np.float64)
    msg, sym = cs.Categorical(counts / counts.sum(), n=n).pop(cs.message(np.frombuffer(code, "<u4")))
    sym = np.asarray(sym, np.int64)
    if not cs.is_empty(msg) or np.any(np.bincount(sym, minlength=m) != counts):
        raise BitstreamError(f"{name}: corrupt mixed stream (its record map does not match its counts)")
    return shape, streams, sym


def decompress(fam: str | os.PathLike, blob, name: str = "stream") -> np.ndarray:
    """A mixed stream -> its records' reconstructions, uint8 ``[N, *record shape]`` (as compressed). Each stream is
    decoded by the member of ``fam`` that wrote it (:func:`vaestream.coding.family.codec_for`: a stream of a model
    not in the family raises :class:`vaestream.errors.ModelError`)."""
    shape, streams, sym = read(blob, name)
    out = np.empty((len(sym), int(np.prod(shape))), np.uint8)
    for i, (c, s) in enumerate(streams):
        y = _to_counts(family.codec_for(fam, s).decompress(s))
        if y.shape != (c, out.shape[1]):
            raise BitstreamError(f"{name}: stream {i} decodes to {y.shape[0]} records of {y.shape[1]} values, its "
                                 f"header says {c} of {out.shape[1]}")
        out[sym == i] = y
    return out.reshape((len(out),) + shape)

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
  subset's error differs by a little (hundredths of a dB): :meth:`PerRecordCoder.encode` checks the target on the
  real streams and raises ``lmbda`` where it falls short.
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
  (:func:`vaestream.coding.streams.open_stream`).

Mixed streams decode to 8-bit pictures (uint8): a lossy point's reconstruction is rounded to the nearest count,
and its error is measured after that rounding.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from vaestream.coding import container, family
from vaestream.coding.family import OperatingPoint
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


def candidates(fam: str | os.PathLike, records, log=None) -> list[OperatingPoint]:
    """Every candidate point of the family ``fam`` on ``records`` (uint8 pictures ``[N, ...]``), with per-record
    costs: :class:`~vaestream.coding.family.OperatingPoint` s whose ``record_bits`` and ``record_se`` (float64
    ``[N]``) are each record's estimated bits and squared error, ``bits_per_record`` the point's real container
    bits on the whole batch.

    A lossy member offers every quality of its ladder (bits: the ideal code length of each record's codes). A
    near-lossless member offers each K of :data:`vaestream.coding.family.MEAN_LADDER` and each K it has a context
    model for (coded with it if it has one; ``"learned"`` reconstruction where the context model has a
    reconstruction network, else ``"mean"``); bits: :meth:`~vaestream.coding.bitsback.coder.LosslessCoder.bits`,
    scaled to the real container bits. ``log`` (optional) receives each point (:meth:`OperatingPoint.to_dict`)
    as it is measured."""
    from vaestream.coding import codec as codec_mod
    from vaestream.coding.family import bitsback_coder

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
                out.append(_point(d, x, c.ideal_bits(codes, float(q)).astype(np.float64), se,
                                  8 * len(c.compress_codes(codes, float(q))), log, quality=float(q),
                                  lmbda=c.config.lmbda))
        if family.is_near_lossless(d):
            base = bitsback_coder(d)
            ctx = base.contexts
            ladder = [(k, "learned" if k in ctx and ctx[k].has_reconstruction else "mean")
                      for k in sorted(set(family.MEAN_LADDER) | set(ctx))]
            for k, how in ladder:
                c = bitsback_coder(d, k, how, model=base.model, contexts=ctx)
                blob, x_hat = c.compress_and_reconstruct(x)
                est = c.bits(x)
                real = 8.0 * len(blob)
                out.append(_point(d, x, est * (real / max(est.sum(), 1e-9)), _se(x, x_hat), real, log,
                                  levels=int(k), reconstruction=how, lmbda=c.config.lmbda,
                                  max_error=c.max_error, context=c.context is not None))
    return out


def _point(d: Path, x: np.ndarray, bits: np.ndarray, se: np.ndarray, total_bits: float, log,
           **setting) -> OperatingPoint:
    n, dim = x.shape
    mse = float(np.mean(se)) / dim
    p = OperatingPoint(model=Path(d), bits_per_record=total_bits / n, bits_per_value=total_bits / n / dim,
                       mse=mse, psnr_db=psnr_db(mse), record_bits=bits, record_se=se, **setting)
    if log is not None:
        log(p.to_dict())
    return p


STREAM_BITS = 600.0
"""About what one more stream costs beyond its records' bits: a container header, a frame and the start of a
bits-back chain (500-850 bits on Fashion-MNIST, measured on 300 records). A point serves only records that save
more than this."""


def assign(points: list[OperatingPoint], lmbda: float, stream_bits: float = STREAM_BITS,
           rounds: int = 200) -> np.ndarray:
    """Each record's point for the multiplier ``lmbda`` (bits per unit of squared error on [0, 1]), int ``[N]``:

        j(i) = argmin_j  bits_j(i) - log2 P(j) + lmbda se_j(i)

    where ``-log2 P(j)`` is what the record map pays for j (P: the points' shares of the previous round's
    assignment) and a point that saves its records less than ``stream_bits`` in all (against their next best
    point) is dropped, the weakest first; rounds until nothing changes (ties to the earlier point)."""
    cost = np.stack([p.record_bits for p in points]) + float(lmbda) * np.stack([p.record_se for p in points])
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


def outcome(points: list[OperatingPoint], j: np.ndarray, d: int) -> dict:
    """What the assignment ``j`` gives: ``{"bits_per_record"`` (estimated), ``"mse"``, ``"psnr_db"``}``, ``d``
    values per record."""
    n = np.arange(len(j))
    se = np.stack([p.record_se for p in points])[j, n]
    bits = np.stack([p.record_bits for p in points])[j, n]
    mse = float(se.mean()) / d
    return {"bits_per_record": float(bits.mean()), "mse": mse, "psnr_db": psnr_db(mse)}


def choose(points: list[OperatingPoint], d: int, psnr: float | None = None, bpp: float | None = None) -> dict:
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


def _code_point(p: OperatingPoint, x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Records ``x`` (uint8 ``[n, D]``) at point ``p`` -> (container, its decoded counts uint8 ``[n, D]``)."""
    coder = p.coder()
    if p.kind == "near_lossless":
        blob, x_hat = coder.compress_and_reconstruct(x)
        return blob, _to_counts(x_hat)
    blob = coder.compress(x, quality=p.quality)
    return blob, _to_counts(coder.decompress(blob))


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


@dataclasses.dataclass(frozen=True)
class PerRecordStream:
    """What :meth:`PerRecordCoder.encode` made: the stream (``blob``), what it decodes to (``reconstruction``,
    uint8 ``[N, D]``), the multiplier (``lmbda``; None for an assignment given), the real ``bits_per_record`` and
    ``psnr_db``, and ``streams``: ``[{"model", "quality", "levels", "reconstruction", "records"}]``."""

    blob: bytes
    reconstruction: np.ndarray
    lmbda: float | None
    bits_per_record: float
    psnr_db: float
    streams: list

    def summary(self) -> dict:
        """The JSON-ready summary (no blob, no reconstruction)."""
        return {"lmbda": self.lmbda, "bits_per_record": self.bits_per_record, "psnr_db": self.psnr_db,
                "streams": self.streams}


class PerRecordCoder:
    """Each record at its own operating point of a family, one stream (see the module docstring).

    Args:
      family: the family directory (its members decode the sub-streams).
      psnr / bpp: the target :meth:`compress` meets (one of them; decoding needs neither).
      points: the :func:`candidates` of the records to be compressed, if already measured.
    """

    def __init__(self, family: str | os.PathLike, psnr: float | None = None, bpp: float | None = None,
                 points: list[OperatingPoint] | None = None):
        self.family = Path(family)
        self.psnr, self.bpp, self.points = psnr, bpp, points

    def encode(self, records, assignment: np.ndarray | None = None) -> PerRecordStream:
        """Compress ``records`` (uint8 pictures ``[N, D]`` or ``[N, H, W]``) and say how: record i at
        ``points[assignment[i]]`` if an assignment is given, else at the points chosen for the target: PSNR >=
        ``psnr`` on the batch at the fewest bits (the delivered PSNR, checked on the real streams: a near-lossless
        point's reconstruction depends on the z its chain draws, so where it falls short, ``lmbda`` is raised and
        the batch coded again), or about ``bpp`` bits per value."""
        x, _ = _pictures(records)
        points = candidates(self.family, x) if self.points is None else self.points
        if assignment is not None:
            blob, x_hat = self._pack(points, assignment, records)
            return self._result(points, np.asarray(assignment), None, blob, x_hat, x)
        if (self.psnr is None) == (self.bpp is None):
            raise ConfigError("per-record compression needs one target: psnr (dB) or bpp (bits per value)")
        d, goal = x.shape[1], self.psnr
        for _ in range(5):
            ch = choose(points, d, psnr=goal, bpp=self.bpp)
            blob, x_hat = self._pack(points, ch["assignment"], records)
            got = psnr_db(float(np.mean(_se(x, x_hat))) / d)
            if self.psnr is None or got >= self.psnr:
                break
            goal += self.psnr - got + 0.005
        else:
            raise ConfigError(f"per-record coding missed {self.psnr:g} dB on the real streams ({got:.3f} dB)")
        return self._result(points, ch["assignment"], ch["lmbda"], blob, x_hat, x)

    @staticmethod
    def _result(points, j, lmbda, blob, x_hat, x) -> PerRecordStream:
        streams = [{"model": str(points[u].model), "quality": points[u].quality, "levels": points[u].levels,
                    "reconstruction": points[u].reconstruction, "records": int(np.sum(j == u))} for u in np.unique(j)]
        got = psnr_db(float(np.mean(_se(x, x_hat))) / x.shape[1])
        return PerRecordStream(blob, x_hat, lmbda, 8 * len(blob) / len(x), got, streams)

    @staticmethod
    def _pack(points: list[OperatingPoint], j, records) -> tuple[bytes, np.ndarray]:
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

    def compress(self, records, assignment: np.ndarray | None = None) -> bytes:
        """The stream of :meth:`encode` (bytes only)."""
        return self.encode(records, assignment).blob

    def bits(self, records) -> np.ndarray:
        """Each record's estimated code length at the point chosen for it, float64 ``[N]`` (the candidates'
        ``record_bits``; the record map's and the sub-streams' fixed costs are not included)."""
        x, _ = _pictures(records)
        points = candidates(self.family, x) if self.points is None else self.points
        j = choose(points, x.shape[1], psnr=self.psnr, bpp=self.bpp)["assignment"]
        return np.stack([p.record_bits for p in points])[j, np.arange(len(j))]

    def decompress(self, blob, name: str = "stream") -> np.ndarray:
        """A per-record stream -> its records' reconstructions, uint8 ``[N, *record shape]`` (as compressed). Each
        sub-stream is decoded by the member of the family that wrote it
        (:func:`vaestream.coding.family.container_coder`: a stream of a model not in the family raises
        :class:`vaestream.errors.ModelError`)."""
        shape, streams, sym = read(blob, name)
        out = np.empty((len(sym), int(np.prod(shape))), np.uint8)
        for i, (c, s) in enumerate(streams):
            sub = f"{name} stream {i}"
            h = container.read_header(io.BytesIO(s), sub)
            y = _to_counts(family.container_coder(h, self.family, sub).decompress(s, name=sub))
            if y.shape != (c, out.shape[1]):
                raise BitstreamError(f"{name}: stream {i} decodes to {y.shape[0]} records of {y.shape[1]} values, its "
                                     f"header says {c} of {out.shape[1]}")
            out[sym == i] = y
        return out.reshape((len(out),) + shape)

    def iter_decompress(self, f: BinaryIO, name: str | None = None) -> Iterator[np.ndarray]:
        """The records of a per-record stream read front to back from the binary file ``f``: one array (the record
        map orders records across sub-streams, so the stream decodes whole)."""
        name = name or getattr(f, "name", "stream")
        data = bytes(f) if isinstance(f, (bytes, bytearray, memoryview)) else f.read()
        yield self.decompress(data, str(name))

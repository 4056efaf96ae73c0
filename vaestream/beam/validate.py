"""Validation of record batches: shape, dtype, range for the likelihood (:func:`validate_batch`, :class:`Validate`)."""

from __future__ import annotations

from typing import Sequence

import apache_beam as beam
import numpy as np

from vaestream.beam.elements import DEAD_LETTER, DeadLetter, RECORDS, RecordBatch
from vaestream.data import BOUNDED_LIKELIHOODS, input_scale
from vaestream.errors import DataError


def default_scale(records: np.ndarray) -> float:
    """Stored value -> model input for a batch of records: the input-scaling rule of every entry point,
    :func:`vaestream.data.input_scale` (1/255 for 8-bit counts: uint8 or whole numbers in 0..255 such as an
    integer CSV; 1 for floats). The jobs apply it to each batch as read (``--chunk_size`` records); ``--scale``
    fixes it for data whose batches could differ (a batch of only 0s and 1s in 8-bit data)."""
    return input_scale(records)


def validate_batch(batch: RecordBatch, shape: tuple[int, ...] | None = None, likelihood: str | None = None,
                   dtype: str | None = None, scale: float | None = None, levels: int | None = None
                   ) -> tuple[RecordBatch | None, list[DeadLetter]]:
    """Check one batch; return (the good records, reshaped/cast and with ``scale`` set, dead letters).

    A record is refused when its number of values differs from prod(``shape``), when it holds NaN or
    infinite values, or (``likelihood`` ``bernoulli``, ``gaussian_sigmoid`` or ``beta_binomial``) when a model
    input ``x = value * scale`` lies outside [0, 1] (``scale``: default the batch's, else
    :func:`default_scale`). With ``dtype="uint8"`` records are stored as uint8 (values must be whole numbers
    in [0, 255]; scale 1/255); with ``dtype="float32"`` as float32 model inputs (scale 1). ``levels`` (with
    ``dtype="uint8"``, for lossless coding): the stored counts must be at most ``levels`` (1: binary records for a
    Bernoulli model).
    """
    recs = batch.records
    n = len(batch)
    dead: list[DeadLetter] = []
    if not (np.issubdtype(recs.dtype, np.integer) or np.issubdtype(recs.dtype, np.floating)
            or recs.dtype == np.bool_):
        return None, [DeadLetter(batch.source, k, f"{k}: values of dtype {recs.dtype} are not numbers")
                      for k in batch.keys]
    if shape is not None:
        d_have, d_want = int(np.prod(recs.shape[1:])), int(np.prod(shape))
        if d_have != d_want:
            return None, [DeadLetter(batch.source, k, f"{k}: record has {d_have} values (shape "
                                                      f"{tuple(recs.shape[1:])}), expected {d_want} {tuple(shape)}")
                          for k in batch.keys]
        recs = recs.reshape((n,) + tuple(shape))
    sc = scale if scale is not None else (batch.scale if batch.scale is not None else default_scale(recs))
    flat = recs.reshape(n, -1)
    ok = np.ones(n, bool)
    reasons: dict[int, str] = {}
    if np.issubdtype(flat.dtype, np.floating):
        finite = np.isfinite(flat).all(axis=1)
        for j in np.flatnonzero(~finite):
            reasons[j] = f"{batch.keys[j]}: record has NaN or infinite values"
        ok &= finite
    if likelihood in BOUNDED_LIKELIHOODS and not (flat.dtype == np.uint8 and 0 < sc * 255.0 <= 1.0):
        # (uint8 counts at scale <= 1/255 are inside [0, 1] whatever they are: no scan)
        with np.errstate(invalid="ignore"):
            lo = flat.min(axis=1).astype(np.float64) * sc
            hi = flat.max(axis=1).astype(np.float64) * sc
        inside = (lo >= 0.0) & (hi <= 1.0) | ~ok
        for j in np.flatnonzero(~inside):
            reasons[j] = (f"{batch.keys[j]}: model inputs span [{lo[j]:g}, {hi[j]:g}], outside the support [0, 1] of "
                          f"the {likelihood} decoder")
        ok &= inside
    if dtype == "uint8" and recs.dtype != np.uint8:
        # within 1e-3 of a count is that count: float32 inputs k/255 come back as k +- 2e-5
        with np.errstate(invalid="ignore"):
            v = flat.astype(np.float64) * (sc * 255.0)
            whole = ((v >= -1e-3) & (v <= 255 + 1e-3) & (np.abs(v - np.round(v)) < 1e-3)).all(axis=1) | ~ok
        for j in np.flatnonzero(~whole):
            reasons[j] = f"{batch.keys[j]}: values are not whole numbers in [0, 255] and cannot be stored as uint8"
        ok &= whole
    if levels is not None:
        if dtype != "uint8":
            raise DataError("levels needs dtype='uint8' (counts)")
        with np.errstate(invalid="ignore"):
            top = np.round(flat.max(axis=1).astype(np.float64) * (sc * 255.0)) if recs.dtype != np.uint8 \
                else flat.max(axis=1).astype(np.float64)
        within = (top <= levels) | ~ok
        for j in np.flatnonzero(~within):
            reasons[j] = (f"{batch.keys[j]}: counts reach {top[j]:g}; lossless coding with this model takes whole "
                          f"numbers 0..{levels}" + (" (binary records)" if levels == 1 else ""))
        ok &= within
    for j in sorted(reasons):
        dead.append(DeadLetter(batch.source, batch.keys[j], reasons[j]))
    if not ok.any():
        return None, dead
    good = RecordBatch(batch.source, batch.keys, recs, sc)
    if not ok.all():
        good = good.take(ok)
    if dtype == "uint8" and good.records.dtype != np.uint8:
        good.records = np.round(good.records.astype(np.float64) * (sc * 255.0)).astype(np.uint8)
        good.scale = 1.0 / 255.0
    elif dtype == "float32" and (good.records.dtype != np.float32 or good.scale != 1.0):
        good.records = (good.records.astype(np.float32) * np.float32(good.scale)).astype(np.float32)
        good.scale = 1.0
    return good, dead


class ValidateFn(beam.DoFn):
    def __init__(self, shape, likelihood, dtype, scale, levels=None):
        self.args = (tuple(shape) if shape is not None else None, likelihood, dtype, scale, levels)

    def process(self, batch: RecordBatch):
        good, dead = validate_batch(batch, *self.args)
        if good is not None:
            yield good
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, d)


class Validate(beam.PTransform):
    """Refuse bad records (see :func:`validate_batch`): outputs ``records`` and ``dead_letter``."""

    def __init__(self, shape: Sequence[int] | None = None, likelihood: str | None = None, dtype: str | None = None,
                 scale: float | None = None, levels: int | None = None):
        super().__init__()
        if dtype not in (None, "uint8", "float32"):
            raise DataError(f"dtype {dtype!r} is not one of uint8, float32")
        if levels is not None and dtype != "uint8":
            raise DataError("levels needs dtype='uint8' (counts)")
        self.fn = ValidateFn(shape, likelihood, dtype, scale, levels)

    def expand(self, pcoll):
        return pcoll | "CheckRecords" >> beam.ParDo(self.fn).with_outputs(DEAD_LETTER, main=RECORDS)

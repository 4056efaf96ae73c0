"""Drift signal: the per-window mean lower bound and bits/record, and a flag when the data changed.

For a window w of n_w records with per-record lower bounds L_i (the ELBO, nats) the monitor reports

    mean_elbo_w       = (1/n_w) sum_i L_i                      nats/record
    bits_per_record_w = -mean_elbo_w / ln 2                    (the bits-back code length the model implies)

(the sum over a sample S_w of the window's records when the caller scored only those, ``scored`` = |S_w|: then
mean_elbo_w = (1/|S_w|) sum_{i in S_w} L_i, as the streaming encoder's hash-uniform sample; and, when the caller
passes the window's coded size, ``coded_bits_per_record``: reported, not judged — the latent codes' size
hardly moves when the data changes, the bound does)

and compares ``bits_per_record_w`` with a reference r, an exponential moving average of the bits/record of
earlier unflagged windows (r_w = (1 - a) r_{w-1} + a b_w, a = ``smoothing``). A window is flagged when

    b_w - r > threshold * r        (relative; e.g. 0.1: 10 % more bits than usual, i.e. a 10 % lower bound)
    or b_w - r > absolute_bits     (when given)

(with ``two_sided``, |b_w - r| in both tests: a large fall of bits/record is flagged too)

after ``warmup`` windows have set the reference. A flagged window leaves the reference alone, so a lasting
change keeps being flagged — until ``rebaseline_after`` consecutive flagged windows, when the new level is
accepted as the reference (and the record says ``"rebaselined": true``). Windows with fewer than
``min_records`` records are reported but neither flagged nor used for the reference.

Every window becomes one JSON line in ``log_path`` (when given) and one dict returned to the caller; the Beam
streaming encoder also reports them as metrics (:mod:`vaestream.beam.streaming`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vaestream.errors import ConfigError

LN2 = math.log(2.0)


@dataclasses.dataclass
class DriftConfig:
    """When a window counts as drifted (see the module docstring); each field's meaning is beside it."""

    threshold: float = 0.1
    """Relative increase of bits/record over the reference that flags a window (0.1 = 10 %)."""
    absolute_bits: float | None = None
    """Also flag an increase of more than this many bits/record (None: relative only)."""
    smoothing: float = 0.3
    """a, the weight of a new window in the reference's moving average."""
    warmup: int = 2
    """Windows that only set the reference."""
    rebaseline_after: int = 5
    """Consecutive flagged windows after which the new level becomes the reference (0: never)."""
    min_records: int = 1
    """Windows with fewer records are reported but not judged."""
    two_sided: bool = False
    """Also flag a window whose bits/record fall by more than the threshold (the data changed, though the
    model now finds it easier)."""

    def __post_init__(self):
        if not self.threshold > 0 or not 0 < self.smoothing <= 1 or self.warmup < 1 or self.rebaseline_after < 0:
            raise ConfigError(f"bad drift config {self}: need threshold > 0, 0 < smoothing <= 1, warmup >= 1, "
                              "rebaseline_after >= 0")


class DriftMonitor:
    """Judges one window after another (see the module docstring).

    Args:
      config: a :class:`DriftConfig`.
      log_path: a JSONL file each window's record is appended to (None: no file).
      state: a :meth:`state` dict to continue from (e.g. after a restart).
    """

    def __init__(self, config: DriftConfig | None = None, log_path: str | os.PathLike | None = None,
                 state: dict | None = None):
        self.config = config or DriftConfig()
        self.log_path = Path(log_path) if log_path is not None else None
        s = state or {}
        self.reference: float | None = s.get("reference")
        self.windows: int = int(s.get("windows", 0))
        self.judged: int = int(s.get("judged", 0))
        self.consecutive: int = int(s.get("consecutive", 0))
        self.flagged_total: int = int(s.get("flagged_total", 0))

    def state(self) -> dict:
        """The monitor's state (JSON-able), to resume with ``DriftMonitor(config, log, state)``."""
        return {"reference": self.reference, "windows": self.windows, "judged": self.judged,
                "consecutive": self.consecutive, "flagged_total": self.flagged_total}

    def observe(self, window: str, elbo: np.ndarray | None = None, *, elbo_sum: float | None = None,
                records: int | None = None, coded_bits: float | None = None, scored: int | None = None,
                **extra: Any) -> dict:
        """Judge one window and return (and log) its record.

        Args:
          window: the window's name (e.g. ``"[start, end)"`` or a file name).
          elbo: the per-record lower bounds ``[n]`` in nats; or give ``elbo_sum`` and ``records``.
          coded_bits: the window's total coded size in bits (reported as ``coded_bits_per_record``).
          scored: with ``elbo_sum``, when the bound was computed for a sample of the window's ``records``:
            the number of records ``elbo_sum`` sums over (the mean is ``elbo_sum / scored``; windows with
            fewer than ``min_records`` scored records are not judged). Default: ``records``.
          extra: more fields for the record (start, end, model version, ...).

        Returns:
          ``{"window", "records", "scored", "mean_elbo", "bits_per_record", "coded_bits_per_record",
          "reference_bits", "change", "flagged", "rebaselined", "time", **extra}``; ``change`` is (b - r) / r.
        """
        if elbo is not None:
            if scored is not None:
                raise ConfigError("scored goes with elbo_sum and records (elbo holds the scored records' bounds)")
            e = np.asarray(elbo, np.float64).reshape(-1)
            n, total = int(e.size), float(e.sum())
            m = n
        else:
            if elbo_sum is None or records is None:
                raise ConfigError("give elbo, or elbo_sum and records")
            n, total = int(records), float(elbo_sum)
            m = n if scored is None else int(scored)
        if not 0 <= m <= n:
            raise ConfigError(f"scored must be in [0, records = {n}], got {m}")
        cfg = self.config
        mean = total / m if m else float("nan")
        bits = -mean / LN2 if m else float("nan")
        coded = (coded_bits / n) if (coded_bits is not None and n) else None
        rec: dict[str, Any] = {"window": window, "records": n, "scored": m, "mean_elbo": mean,
                               "bits_per_record": bits, "coded_bits_per_record": coded,
                               "reference_bits": self.reference, "change": None, "flagged": False,
                               "rebaselined": False, "time": time.time()}
        self.windows += 1
        if m and m >= cfg.min_records and math.isfinite(bits):
            if self.reference is None or self.judged < cfg.warmup:
                self.reference = bits if self.reference is None else \
                    (1 - cfg.smoothing) * self.reference + cfg.smoothing * bits
            else:
                r = self.reference
                rec["change"] = (bits - r) / abs(r) if r else None
                delta = abs(bits - r) if cfg.two_sided else bits - r
                flagged = delta > cfg.threshold * abs(r) or (
                    cfg.absolute_bits is not None and delta > cfg.absolute_bits)
                rec["flagged"] = bool(flagged)
                if flagged:
                    self.flagged_total += 1
                    self.consecutive += 1
                    if cfg.rebaseline_after and self.consecutive >= cfg.rebaseline_after:
                        self.reference, self.consecutive = bits, 0
                        rec["rebaselined"] = True
                else:
                    self.consecutive = 0
                    self.reference = (1 - cfg.smoothing) * r + cfg.smoothing * bits
            self.judged += 1
        rec.update(extra)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec, sort_keys=True, default=_jsonable) + "\n")
        return rec


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The window records of a drift log (JSONL), in order."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

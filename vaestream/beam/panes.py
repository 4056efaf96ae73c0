"""The streaming encoder's window panes on disk (:mod:`vaestream.beam.streaming`): each pane's codes, container,
summary and dead letters written (:class:`WriteWindowFn`), the drift step over the panes' summaries
(:class:`DriftFn`), and the panes read back (:func:`read_windows`, :func:`read_dead_letters`).

Per window (directory ``OUTPUT/codes/``), named ``codes-START-END-pPANE`` (UTC ``%Y%m%dT%H%M%S.%f``): the
``.tfrecord`` of the pane's codes, the ``.vaez`` container when the model has coder tables, and the ``.json``
summary; dead letters go to ``OUTPUT/dead_letter/`` and the drift records to ``OUTPUT/drift.jsonl``. Each file
is written under a temporary name and renamed (a broker pane's files are staged and committed with its message
IDs instead: :class:`vaestream.beam.broker_source.BrokerCommit`).
"""

from __future__ import annotations

import collections
import datetime
import glob as globmod
import json
import os
import threading
import time

import apache_beam as beam
import numpy as np
from apache_beam import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms import userstate
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP

from vaestream import beam as vb
from vaestream.beam.broker_source import BrokerCommit, MessageIds, dead_letter_lines
from vaestream.beam.elements import CODE_LAYOUTS, LAYOUT_VERSIONS
from vaestream.beam.scoring import Scored, ScoredBatch
from vaestream.beam.sinks import write_atomic
from vaestream.online.drift import DriftConfig, DriftMonitor

CODES_DIR = "codes"
DEAD_DIR = "dead_letter"
DRIFT_LOG = "drift.jsonl"
_NS = vb.NAMESPACE



def iso_time(micros: int) -> str:
    """An event time (microseconds) as ISO 8601 UTC; ``+inf`` / ``-inf`` at the ends of time."""
    if micros >= MAX_TIMESTAMP.micros:
        return "+inf"
    if micros <= MIN_TIMESTAMP.micros:
        return "-inf"
    return datetime.datetime.fromtimestamp(micros / 1e6, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def file_stamp(micros: int) -> str:
    """An event time (microseconds) as it appears in file names (UTC ``%Y%m%dT%H%M%S.%f``)."""
    return datetime.datetime.fromtimestamp(micros / 1e6, datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%f")


def write_tfrecord_atomic(path: str, records: list[bytes], staged: str | None = None) -> int:
    """Write serialized records as a TFRecord file (TF's writer: length + masked CRC32C framing) under a
    temporary name, then rename it into place; returns the file's size. ``staged``: write that file (synced)
    and leave it for a commit to rename."""
    import tensorflow as tf

    tmp = staged or f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with tf.io.TFRecordWriter(tmp) as w:
        collections.deque(map(w.write, records), maxlen=0)   # one C call a record, no Python loop body
    size = tf.io.gfile.stat(tmp).length
    if staged:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        tf.io.gfile.rename(tmp, path, overwrite=True)
    return int(size)


def pane_examples(items: list[Scored], layout: str = "block") -> list[bytes]:
    """The serialized code Examples of a pane's chunks, in order: byte for byte those of
    :func:`vaestream.beam.code_examples` chunk by chunk in ``layout``. ``block`` (the batch encode job's default,
    FORMAT.md §8): one Example a chunk (a file's chunk, a broker message's records: keys ``ID:000000000`` ..
    stored as the name and the first offset), :func:`vaestream.beam.sinks.block_example`. ``record``: one
    Example a record, serialized in one call per (fingerprint, key length) rather than one per chunk (keys of
    one length take :func:`vaestream.shardset.serialize_examples`'s whole-matrix path)."""
    from vaestream import shardset
    from vaestream.beam.sinks import block_example

    codes = [s.codes for s in items if len(s.codes)]
    if not codes:
        return []
    if layout == "block":
        return [block_example(c) for c in codes]
    fingerprints = {c.fingerprint for c in codes}
    if len(codes) == 1 or len(fingerprints) > 1 or any(c.coded for c in codes):
        return [e for c in codes for e in vb.code_examples(c)]
    keys = [k.encode() for c in codes for k in c.keys]
    mean = np.concatenate([c.mean for c in codes])
    log_scale = np.concatenate([c.log_scale for c in codes])
    const = {"fingerprint": shardset.bytes_feature([codes[0].fingerprint.encode()])}
    lengths = np.fromiter(map(len, keys), np.int64, len(keys))
    kinds = np.unique(lengths)
    if len(kinds) == 1:
        return shardset.serialize_examples(keys, floats={"mean": mean, "log_scale": log_scale}, constants=const)
    out: list[bytes] = [b""] * len(keys)
    for length in kinds:
        idx = np.flatnonzero(lengths == length)
        part = shardset.serialize_examples([keys[i] for i in idx], constants=const,
                                           floats={"mean": mean[idx], "log_scale": log_scale[idx]})
        for i, e in zip(idx.tolist(), part):
            out[i] = e
    return out


def write_dead_letters(out_dir: str, name: str, dead: list, stage=None) -> str:
    """``OUTPUT/dead_letter/dead_letter-NAME.jsonl``: the dead letters, one JSON object per line, sorted by
    (source, key); written under a temporary name and renamed (``stage``: written by ``stage(path, data)``, to
    be committed later). Returns the path."""
    import tensorflow as tf

    tf.io.gfile.makedirs(f"{out_dir}/{DEAD_DIR}")
    path = f"{out_dir}/{DEAD_DIR}/dead_letter-{name}.jsonl"
    (stage or write_atomic)(path, dead_letter_lines(dead))
    return path


def pane_name(win, pane) -> tuple[str, str]:
    """A pane's name in its files (``START-END-pINDEX``) and its timing (``early``, ``on_time``, ``late``)."""
    timing = {0: "early", 1: "on_time", 2: "late"}.get(getattr(pane, "timing", 3), "unknown")
    idx = getattr(pane, "index", 0)
    return f"{file_stamp(win.start.micros)}-{file_stamp(win.end.micros)}-p{idx}", timing


def _pane_items(values) -> tuple[list[Scored], list, list[str]]:
    """A pane's grouped values -> (scored chunks, dead letters, broker message IDs)."""
    items: list[Scored] = []
    dead: list = []
    ids: list[str] = []
    for v in values:
        if isinstance(v, MessageIds):
            ids.extend(v)
        elif isinstance(v, ScoredBatch):
            items.extend(v)
        else:
            (dead if isinstance(v, vb.DeadLetter) else items).append(v)
    return items, dead, ids


class WriteWindowFn(beam.DoFn):
    """(key, [Scored, ScoredBatch, DeadLetter and MessageIds]) of one window pane -> its codes files + summary,
    and its dead letters (``dead_letter-START-END-pPANE.jsonl``); yields the summary dict (when the pane has codes).
    ``code_layout``: the ``.tfrecord``'s float code Examples, ``block`` (one a chunk) or ``record`` (one a
    record), as the batch encode job's ``--code_layout`` (:func:`pane_examples`); the summary names it
    (``code_layout``: ``block/1`` or ``record/1``)."""

    def __init__(self, out_dir: str, broker: BrokerCommit | None = None, handler=None, code_layout: str = "block"):
        if code_layout not in CODE_LAYOUTS:
            from vaestream.errors import ConfigError

            raise ConfigError(f"code layout {code_layout!r} is not one of {', '.join(CODE_LAYOUTS)}")
        self.out_dir = out_dir
        self.code_layout = code_layout
        self.broker = broker
        self.handler = handler   # the ScoringModelHandler whose (cached) model's codec codes the panes' symbols
        self._codec = None
        self.records = Metrics.counter(_NS, "records")
        self.bytes_out = Metrics.counter(_NS, "bytes_out")
        self.panes = Metrics.counter(_NS, "panes_written")
        self.late_records = Metrics.counter(_NS, "late_records_written")
        self.dead = Metrics.counter(_NS, "dead_lettered")

    def setup(self):
        import tensorflow as tf

        tf.io.gfile.makedirs(f"{self.out_dir}/{CODES_DIR}")
        if self.handler is not None:
            self._codec = self.handler.load_model().codec   # the per-process cache: no load per bundle

    def process(self, kv, win=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
        items, dead, ids = _pane_items(kv[1])
        name, timing = pane_name(win, pane)
        staged: list[str] = []
        stage = None
        if self.broker is not None:
            name, stage = self._broker_stage(name, ids, staged)
        if dead:
            write_dead_letters(self.out_dir, name, dead, stage)
            self.dead.inc(len(dead))
        items.sort(key=lambda s: (s.codes.source, s.codes.keys[0] if len(s.codes) else ""))
        if not items:
            if self.broker is not None:
                self._commit(name, staged, ids, 0)
            return
        base = f"{self.out_dir}/{CODES_DIR}/codes-{name}"
        written, coded_bits = self._write_codes(base, items, stage, staged)
        n = sum(len(s.codes) for s in items)
        summary = _summary(win, pane, timing, items, n, coded_bits, base, ids)
        summary["code_layout"] = LAYOUT_VERSIONS[self.code_layout]
        (stage or write_atomic)(base + ".json", (json.dumps(summary, sort_keys=True) + "\n").encode())
        if self.broker is not None:
            self._commit(name, staged, ids, n)
        self.records.inc(n)
        self.bytes_out.inc(written)
        self.panes.inc()
        if timing == "late":
            self.late_records.inc(n)
        yield summary

    def _broker_stage(self, name: str, ids: list[str], staged: list[str]):
        """A broker pane's files are staged, committed with their message IDs (the ledger), then acknowledged;
        the name carries the first ID, so a pane written after a restart never replaces one written before.
        Returns (the pane's name, the ``stage(path, data)`` that stages a file and lists it in ``staged``)."""
        from vaestream.broker.wire import id_key

        ids.sort(key=id_key)
        ledger = self.broker.ledger

        def stage(path, data):
            ledger.write_staged(path, data)
            staged.append(path)
        return f"{name}-{ids[0] if ids else 'none'}", stage

    def _write_codes(self, base: str, items: list[Scored], stage, staged: list[str]) -> tuple[int, float | None]:
        """The pane's ``.tfrecord`` and, when every chunk has quantised codes, its ``.vaez`` container (one for
        the pane): (bytes written, the container's bits or None)."""
        examples = pane_examples(items, self.code_layout)
        if stage is None:
            written = write_tfrecord_atomic(base + ".tfrecord", examples)
        else:
            written = write_tfrecord_atomic(base + ".tfrecord", examples,
                                            self.broker.ledger.staged(base + ".tfrecord"))
            staged.append(base + ".tfrecord")
        syms = [s.symbols for s in items if s.symbols is not None]
        if self._codec is None or not syms or len(syms) != len(items):
            return written, None
        # the pane's quantised codes, in the order of its Examples, as one container
        packed = self._codec.compress_codes(syms[0] if len(syms) == 1 else np.concatenate(syms))
        (stage or write_atomic)(base + ".vaez", packed)
        return written + len(packed), 8.0 * len(packed)

    def _commit(self, name: str, staged: list[str], ids: list[str], records: int) -> None:
        from vaestream.broker import fault

        fault("before_rename")
        self.broker.commit(f"pane-{name}", staged, ids, records=records)


def _summary(win, pane, timing: str, items: list[Scored], n: int, coded_bits: float | None, base: str,
             ids: list[str]) -> dict:
    """The pane's ``.json`` summary."""
    elbo = np.concatenate([s.elbo for s in items]).astype(np.float64)   # of the scored records
    summary = {"window_start": iso_time(win.start.micros), "window_end": iso_time(win.end.micros),
               "window_start_s": win.start.micros / 1e6, "window_end_s": win.end.micros / 1e6,
               "pane": getattr(pane, "index", 0), "timing": timing, "records": n,
               "scored": int(elbo.size), "elbo_sum": float(elbo.sum()),
               "mean_elbo": float(elbo.mean()) if elbo.size else None,
               "coded_bits": coded_bits, "fingerprints": sorted({s.codes.fingerprint for s in items}),
               "sources": sorted({s.codes.source for s in items}),
               "files": [os.path.basename(base) + ext for ext in ([".tfrecord", ".vaez"] if coded_bits
                                                                  else [".tfrecord"])],
               "written_at": time.time()}
    if ids:
        summary["messages"] = ids
    return summary



class DriftFn(beam.DoFn):
    """Window summaries (one key, global window) -> drift records, appended to ``drift.jsonl``."""

    STATE = userstate.ReadModifyWriteStateSpec("drift", coders.PickleCoder())

    def __init__(self, out_dir: str, config: DriftConfig):
        self.out_dir, self.config = out_dir, config
        self.flagged = Metrics.counter(_NS, "drift_flagged_windows")
        self.bits = Metrics.gauge(_NS, "window_millibits_per_record")
        self.elbo = Metrics.distribution(_NS, "window_mean_elbo_millinats")

    def process(self, kv, state=beam.DoFn.StateParam(STATE)):
        s = kv[1]
        mon = DriftMonitor(self.config, f"{self.out_dir}/{DRIFT_LOG}", state.read())
        rec = mon.observe(f"[{s['window_start']}, {s['window_end']}) p{s['pane']}", elbo_sum=s["elbo_sum"],
                          records=s["records"], scored=s.get("scored"), coded_bits=s["coded_bits"],
                          window_start=s["window_start"], window_end=s["window_end"], pane=s["pane"],
                          timing=s["timing"], fingerprints=s["fingerprints"])
        state.write(mon.state())
        if rec["flagged"]:
            self.flagged.inc()
        if np.isfinite(rec["bits_per_record"]):
            self.bits.set(int(round(1000 * rec["bits_per_record"])))
            self.elbo.update(int(round(1000 * rec["mean_elbo"])))
        yield rec



def read_windows(output: str) -> list[dict]:
    """The summaries of the panes written under ``output`` (``codes/*.json``), by window then pane."""
    out = []
    for f in globmod.glob(os.path.join(output, CODES_DIR, "codes-*.json")):
        with open(f) as fh:
            out.append(json.load(fh))
    return sorted(out, key=lambda s: (s["window_start_s"], s["pane"]))


def read_dead_letters(output: str) -> list[dict]:
    """Every dead letter written under ``output``."""
    out = []
    for f in sorted(globmod.glob(os.path.join(output, DEAD_DIR, "dead_letter-*.jsonl"))):
        with open(f) as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out

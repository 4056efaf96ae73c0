"""Streaming encode with Apache Beam: new files -> windowed codes, dead letters and a drift signal.

    paths = p | WatchFiles(FileWatcher("incoming/*.npy", poll_interval=1.0))     # or ReadFromPubSub / TestStream
    result = paths | StreamEncode("out/", model_dir="runs/model", window=10.0)

**Sources.** The stream is a PCollection of file paths, each with an event time (the poll at which the file
was found) and a watermark that says no older path will follow:

* :class:`WatchFiles` over a :class:`FileWatcher`: polls a glob every ``poll_interval`` seconds and emits
  each new file once (a set of the paths seen; writers should create files under a temporary name and rename
  them into place). It feeds Beam's in-process streaming runner (``BundleBasedDirectRunner`` with
  ``streaming=True``) through the runner's ``TestStream`` service protocol: the watcher is a
  ``TestStreamService`` whose event stream is the file system's (elements at poll time, then the watermark
  advanced to the poll time). Beam 2.77's in-process streaming runner cannot run splittable DoFns, so
  ``PeriodicImpulse`` / ``MatchContinuously`` do not run there.
* :class:`PollFiles`: the same for runners with splittable DoFns (Dataflow, Flink, Prism): ``PeriodicImpulse``
  then a match of the pattern and a stateful (per-path) de-duplication, so each file is emitted once.
* :func:`pubsub_paths`: Pub/Sub messages naming files (a path, or a Cloud Storage notification's
  ``bucket``/``name``), on runners that have Pub/Sub.
* ``TestStream`` in tests (watermarks, late data).

**Windows and lateness.** Paths are assigned to fixed event-time windows of ``window`` seconds; a window's
codes are written when the watermark passes its end (one ON_TIME pane) and records that arrive late but
within ``allowed_lateness`` seconds are written as further LATE panes (files named by pane). Input that is
later than that goes to the dead-letter output with the reason: a late gate (a stateful DoFn in the global
window whose event-time timer tracks a lower bound on the watermark) refuses a path whose window closed
(watermark > window end + allowed lateness) before it is read. The windows themselves keep the late data for
a further ``gate_slack`` seconds, more than the gate's lag behind the watermark, so nothing is dropped
silently while the stream is active.

**Per window** (written by :mod:`vaestream.beam.panes`; directory ``OUTPUT/codes/``), named
``codes-START-END-pPANE`` (UTC ``%Y%m%dT%H%M%S.%f``):

* ``.tfrecord``: the codes in the batch encode job's layout (:func:`vaestream.beam.code_examples`;
  ``StreamConfig.code_layout``): ``block`` (default) one ``tf.train.Example`` per chunk (a file's chunk, a
  broker message): ``records``, ``mean`` and ``log_scale`` ``[n, Nz]``, one fingerprint, the keys as a name and
  first offset (or listed); ``record`` one per record: key, mean, log_scale, fingerprint;
* ``.vaez``: when the model has coder tables, the window's quantised codes as one container
  (:mod:`vaestream.coding.container`), whose header names the model fingerprint: decode it with
  :meth:`vaestream.online.registry.Registry.decode` or :func:`vaestream.coding.codec.load`;
* ``.json``: the window's summary (records, sources, pane timing, the scored sample's size and mean ELBO, bits,
  fingerprint, time written).

Each file is written under a temporary name and renamed, so a reader never sees half a file and a retried
bundle rewrites the same name. Dead letters go to ``OUTPUT/dead_letter/`` as ``{"source", "key", "reason"}``
lines: unreadable or malformed files and records to ``dead_letter-START-END-pPANE.jsonl``, grouped and written
with the pane's codes; late paths to ``dead_letter-late-WM-CRC.jsonl``, written by the late gate. The drift
monitor (:mod:`vaestream.online.drift`) judges each window's mean ELBO and bits/record and appends one line per
window to ``OUTPUT/drift.jsonl``; counters and gauges go to Beam metrics (namespace ``vaestream``).

One step reads each file, validates its records and scores them (:class:`_EncodeFilesFn`): the readers of
:mod:`vaestream.beam`, :func:`vaestream.beam.validate.validate_batch`, and the model of
:class:`vaestream.beam.scoring.ScoringModelHandler` (a :class:`vaestream.beam.VAEModelHandler`, loaded once per
worker process) that in one call per chunk computes the codes, the ELBO of a sample of the records (one in
``StreamConfig.score_every``, by key hash) with fixed noise from the same encoder pass
(:func:`vaestream.beam.scoring.elbo_from_posterior`), and the quantised codes, which the pane writer
entropy-codes as one container per pane.

**Cost per batch, not per record or per transform.** On the in-process runner every poll that finds files is
one round through the pipeline (the watcher waits for the pipeline to take a batch before it polls again, so a
busy pipeline gets bigger batches, not more of them), and each transform costs each round a bundle (a pickling
round trip of its DoFn, its setup, Beam's DoFn-signature checks: ~1-2 ms), so a round runs five small
transforms (key, gate and window on its paths, the GroupByKey's two on the scored chunks) and one that does
the per-record work; the gate's
timer fires once per window; each window pane is one write of its codes and dead letters.
``max_latency`` (:meth:`StreamConfig.for_max_latency`) sizes the window and the poll from a latency budget.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import zlib
from typing import Sequence

import apache_beam as beam
from apache_beam import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Duration, Timestamp

from vaestream import beam as vb
from vaestream.beam.broker_source import (BrokerCommit, BrokerWatcher, EncodeMessagesFn, KeyNewMessagesFn,
                                          ReadFromBroker, messages_of)
from vaestream.beam.elements import LAYOUT_VERSIONS
from vaestream.beam.panes import (CODES_DIR, DEAD_DIR, DRIFT_LOG, DriftFn, WriteWindowFn,  # noqa: F401 (the API)
                                  file_stamp, iso_time, read_dead_letters, read_windows, write_dead_letters)
from vaestream.beam.stream_sources import (FileWatcher, PollFiles, WatchFiles,  # noqa: F401 (the streaming API)
                                           pubsub_paths)
from vaestream.beam.scoring import Scored, ScoringModelHandler  # noqa: F401 (the streaming API)
from vaestream.online.drift import DriftConfig
from vaestream.errors import ConfigError, DataError

WINDOWS = "windows"
_NS = vb.NAMESPACE


# ---------------------------------------------------------------------------------------------------------
# the late gate
# ---------------------------------------------------------------------------------------------------------
class _LateGate(beam.DoFn):
    """(key, path) in the global window -> path, unless its window has closed: then the path's dead letter is
    written here, to ``OUTPUT/dead_letter/dead_letter-late-WM-CRC.jsonl`` (WM the watermark bound, CRC the
    path's crc32: a retried bundle rewrites the same file). An event-time timer stepping every ``step`` seconds
    records a lower bound on the watermark. (Late paths are rare; writing them here spares every round of the
    stream a dead-letter branch of its own.)"""

    KNOWN = userstate.ReadModifyWriteStateSpec("known_watermark", coders.VarIntCoder())
    LAST = userstate.ReadModifyWriteStateSpec("last_element", coders.VarIntCoder())
    ARMED = userstate.ReadModifyWriteStateSpec("armed", coders.BooleanCoder())
    TICK = userstate.TimerSpec("tick", TimeDomain.WATERMARK)

    def __init__(self, out_dir: str, window_seconds: float, allowed_lateness: float, step: float, horizon: float,
                 broker: BrokerCommit | None = None):
        self.out_dir = out_dir
        self.broker = broker
        self.w = Duration.of(window_seconds).micros
        self.lateness = Duration.of(allowed_lateness).micros
        self.step = max(1, Duration.of(step).micros)
        self.horizon = Duration.of(horizon).micros
        self.late = Metrics.counter(_NS, "late_dead_lettered")
        self.dead = Metrics.counter(_NS, "dead_lettered")

    def process(self, kv, ts=beam.DoFn.TimestampParam, known=beam.DoFn.StateParam(KNOWN),
                last=beam.DoFn.StateParam(LAST), armed=beam.DoFn.StateParam(ARMED),
                tick=beam.DoFn.TimerParam(TICK)):
        path = kv[1]
        msgs = None
        if not isinstance(path, str):       # a broker message, or a batch of them (one window's)
            msgs = messages_of(path)
            path = msgs[0].ref
        t = ts.micros
        wm = known.read()
        last.write(max(last.read() or t, t))
        if not armed.read():
            armed.write(True)
            tick.set(Timestamp(micros=max(wm if wm is not None else t, t - self.w) + self.step))
        start = t - t % self.w
        deadline = start + self.w + self.lateness
        if wm is not None and wm > deadline:
            what = "file" if msgs is None else "message"

            def letter(ref: str, t: int) -> vb.DeadLetter:
                return vb.DeadLetter(ref, ref, f"{ref}: late: event time {iso_time(t)} belongs to window "
                                               f"[{iso_time(start)}, {iso_time(start + self.w)}), which closed "
                                               f"(allowed lateness {self.lateness / 1e6:g} s) before the {what} "
                                               f"arrived; the watermark was at least {iso_time(wm)}")
            if msgs is not None:
                letters = [letter(m.ref, Timestamp.of(m.event_time).micros) for m in msgs]
                self.broker.dead_letters(f"late-{file_stamp(wm)}-{msgs[0].id}", letters, [m.id for m in msgs])
            else:
                letters = [letter(path, t)]
                write_dead_letters(self.out_dir, f"late-{file_stamp(wm)}-{zlib.crc32(path.encode()):08x}", letters)
            self.late.inc(len(letters))
            self.dead.inc(len(letters))
            return
        yield kv[1]

    @userstate.on_timer(TICK)
    def on_tick(self, fired=beam.DoFn.TimestampParam, known=beam.DoFn.StateParam(KNOWN),
                last=beam.DoFn.StateParam(LAST), armed=beam.DoFn.StateParam(ARMED),
                tick=beam.DoFn.TimerParam(TICK)):
        f = fired.micros
        known.write(max(known.read() or f, f))
        if f < (last.read() or f) + self.horizon and f + self.step < MAX_TIMESTAMP.micros:
            tick.set(Timestamp(micros=f + self.step))
        else:
            armed.write(False)


# ---------------------------------------------------------------------------------------------------------
# reading, scoring
# ---------------------------------------------------------------------------------------------------------
class _EncodeFilesFn(beam.DoFn):
    """path -> ``(0, Scored)`` for each chunk of the file's valid records (its event time), and
    ``(0, DeadLetter)`` for an unreadable or truncated file and for each record
    :func:`vaestream.beam.validate.validate_batch` refuses (for the model's ``shape`` and ``likelihood``).

    Reading, validation and the model call (``handler``, a :class:`ScoringModelHandler`: one
    ``run_inference`` per chunk of up to ``chunk_size`` records, the model from the handler's per-process
    cache) are one step, keyed for the pane's GroupByKey: on Beam's in-process streaming runner every
    transform costs each round of the stream a bundle of its own (~1-2 ms: a pickling round trip of the DoFn,
    its setup and Beam's DoFn-signature checks; ``benchmarks/RESULTS_streaming.md``), so the stream pays one
    transform here where ``ReadFiles | Validate | RunInference | Key`` cost four (with ``BatchElements``)."""

    def __init__(self, handler: ScoringModelHandler, chunk_size: int, shape=None, likelihood: str | None = None):
        self.handler = handler
        self.chunk_size = chunk_size
        self.shape = tuple(shape) if shape is not None else None
        self.likelihood = likelihood
        self.records_in = Metrics.counter(_NS, "records_in")
        self.files = Metrics.counter(_NS, "files_in")
        self.model_calls = Metrics.counter(_NS, "model_calls")
        self._model = None

    def setup(self):
        self._model = self.handler.load_model()

    def process(self, path: str):
        self.files.inc()
        try:
            tasks = vb.plan_reads(path)
        except DataError as e:
            self.records_in.inc()
            yield 0, vb.DeadLetter(path, path, str(e))
            return
        for task in tasks:
            for item in vb.read_range(task, self.chunk_size):
                if not isinstance(item, vb.RecordBatch):
                    self.records_in.inc()
                    yield 0, item
                    continue
                self.records_in.inc(len(item))
                good, dead = vb.validate_batch(item, self.shape, self.likelihood)
                if good is not None:
                    self.model_calls.inc()
                    yield 0, self.handler.run_inference([good], self._model)[0]
                for d in dead:
                    yield 0, d


# ---------------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StreamConfig:
    """Windowing of the streaming encoder (seconds).

    The late gate's timer fires every ``gate_step`` seconds of event time while input arrives (and for
    ``gate_horizon`` seconds after the last input), so the step defaults to one window: one timer firing per
    window. Windows keep late data for ``allowed_lateness + gate_slack`` seconds, with ``gate_slack`` at least
    the gate's lag behind the watermark (< ``gate_step``), so input the gate lets through is never dropped by
    the windowing.

    ``max_latency`` (see :meth:`for_max_latency`): the bound, in seconds, from a file's arrival to its codes
    on disk that the window (at most ``max_latency / 3``) and, in :func:`run_stream`, the poll interval (at
    most ``max_latency / 10``) are sized for.

    ``score_every``: the drift signal's sample, one record in ``score_every`` by key hash
    (:func:`vaestream.beam.scoring.scored_rows`; 1: every record; 0: none, and no window is judged). Every
    record is coded; only the sample pays the ELBO's decoder pass (~7 us a scored record on two cores, more
    than the encoder's ~4 us). At the default 32 a window of ``n`` records scores ~n/32 of them (3,000 of a
    100,000-record window): the standard error of its mean ELBO is ~``sqrt(32 / n)`` of the records' spread.

    ``code_layout``: ``block`` (default) or ``record``, the ``.tfrecord``'s Examples (module docstring).
    """

    window: float = 10.0
    allowed_lateness: float = 0.0
    gate_step: float | None = None      # default: window
    gate_slack: float | None = None     # default: gate_step (the gate's lag behind the watermark is < one step)
    gate_horizon: float | None = None   # default: 2 windows + allowed lateness
    chunk_size: int = vb.CHUNK
    batch_size: int = vb.CHUNK
    max_latency: float | None = None
    score_every: int = 32
    code_layout: str = "block"

    def __post_init__(self):
        if not self.window > 0 or self.allowed_lateness < 0:
            raise ConfigError(f"window must be positive and allowed_lateness non-negative, got {self.window}, "
                              f"{self.allowed_lateness}")
        if int(self.score_every) != self.score_every or self.score_every < 0:
            raise ConfigError(f"score_every must be a non-negative integer, got {self.score_every}")
        if self.code_layout not in vb.CODE_LAYOUTS:
            raise ConfigError(f"code_layout must be one of {', '.join(vb.CODE_LAYOUTS)}, got {self.code_layout!r}")
        if self.max_latency is not None:
            if not self.max_latency > 0:
                raise ConfigError(f"max_latency must be positive, got {self.max_latency}")
            self.window = min(self.window, self.max_latency / 3.0)   # the rule of for_max_latency

    @classmethod
    def for_max_latency(cls, max_latency: float, window: float | None = None, **kw) -> "StreamConfig":
        """A config whose window meets ``max_latency`` seconds from arrival to codes on disk.

        A record found by a poll waits for its window to close and for the next poll to see the watermark pass
        the window's end, then for its round (read, encode, write) and the round queued ahead of it:

            latency <= poll + W + poll + 2 R,   with  poll = max_latency / 10  (:meth:`poll_interval`),
            W = max_latency / 3,

        leaving ~0.47 max_latency for the two rounds (R <= 0.23 max_latency: at a sustained rate r records/s
        and a runner speed v records/s a round of the backpressured watcher takes about c / (1 - r/v), c its
        fixed cost). (With W = max_latency / 2 the rounds had 0.3 max_latency: at 3 s, a broker stream near
        the job's speed on two shared cores missed it, p99 2.6-3.1 s; with 1-s windows p99 was 1.9 s:
        ``benchmarks/RESULTS_streaming.md``.) A given ``window`` is kept when it is shorter. The gate steps once
        per window."""
        return cls(window=max_latency / 3.0 if window is None else window, max_latency=max_latency, **kw)

    def poll_interval(self, requested: float) -> float:
        """The watcher's poll interval: ``requested``, at most ``max_latency / 10`` when that is set."""
        return requested if self.max_latency is None else min(requested, self.max_latency / 10.0)


class StreamEncode(beam.PTransform):
    """File paths (timestamped, global window) -> windowed code files, dead letters and drift records.

    Returns a dict of PCollections: ``windows`` (the summary of each pane written) and ``drift`` (drift
    records). Dead letters are files (``OUTPUT/dead_letter/``): a pane's read and validation dead letters are
    written with its codes, a late path's by the late gate.

    Args:
      output: the output directory.
      model_dir / saved_model: the model (a model directory, or a SavedModel export / registry version).
      config: :class:`StreamConfig`.
      drift: :class:`vaestream.online.drift.DriftConfig`.
      coder: write ``.vaez`` containers (None: when the model has coder tables; True: require them).
      quality: the coder quality.
    """

    def __init__(self, output: str, model_dir: str | None = None, saved_model: str | None = None,
                 config: StreamConfig | None = None, drift: DriftConfig | None = None, coder: bool | None = None,
                 quality: float | None = None, broker: BrokerCommit | None = None):
        super().__init__()
        self.output = output.rstrip("/")
        self.broker = broker
        self.cfg = config or StreamConfig()
        self.drift = drift or DriftConfig()
        self.model_config = vb.read_model_config(model_dir, saved_model)
        self.handler = ScoringModelHandler(model_dir, saved_model, self.cfg.batch_size, coder, quality,
                                           self.cfg.score_every)

    def expand(self, paths):
        c = self.cfg
        step = c.gate_step if c.gate_step is not None else c.window
        slack = c.gate_slack if c.gate_slack is not None else step
        horizon = c.gate_horizon if c.gate_horizon is not None else 2 * c.window + c.allowed_lateness
        keyed = (paths | "KeyPaths" >> beam.Map(lambda p: ("paths", p)).with_output_types(tuple[str, str])
                 if self.broker is None else paths | "KeyMessages" >> beam.ParDo(KeyNewMessagesFn(self.output)))
        gated = keyed | "LateGate" >> beam.ParDo(_LateGate(self.output, c.window, c.allowed_lateness, step, horizon,
                                                           self.broker))
        windowed = gated | "Window" >> beam.WindowInto(
            window.FixedWindows(c.window), trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
            allowed_lateness=Duration.of(c.allowed_lateness + slack),
            accumulation_mode=trigger.AccumulationMode.DISCARDING)
        cfg = self.model_config
        # a pane's codes and its dead letters (read or validation) are grouped and written together
        encode = (_EncodeFilesFn(self.handler, c.chunk_size, cfg.input_shape, cfg.likelihood) if self.broker is None
                  else EncodeMessagesFn(self.handler, c.chunk_size, cfg.input_shape, cfg.likelihood))
        windows = (windowed
                   | ("EncodeFiles" if self.broker is None else "EncodeMessages") >> beam.ParDo(encode)
                   | "GroupWindow" >> beam.GroupByKey()
                   | "WriteWindow" >> beam.ParDo(WriteWindowFn(self.output, self.broker, self.handler,
                                                             c.code_layout)))
        drift = (windows
                 | "GlobalSummaries" >> beam.WindowInto(window.GlobalWindows())
                 | "KeySummaries" >> beam.Map(lambda s: ("drift", s))
                 | "Drift" >> beam.ParDo(DriftFn(self.output, self.drift)))
        return {WINDOWS: windows, "drift": drift}


def streaming_pipeline(options=None) -> beam.Pipeline:
    """A streaming Pipeline: on the runner the options name, else Beam's in-process streaming runner
    (``BundleBasedDirectRunner``; the FnApiRunner is batch-only)."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = options or PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    if options.view_as(StandardOptions).runner is None:
        from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner

        return beam.Pipeline(runner=BundleBasedDirectRunner(), options=options)
    return beam.Pipeline(options=options)



def run_stream(output: str, patterns: str | Sequence[str] | None = None, model_dir: str | None = None,
               saved_model: str | None = None, config: StreamConfig | None = None,
               drift: DriftConfig | None = None, poll_interval: float = 1.0, stop_after: float | None = None,
               idle_timeout: float | None = None, max_files: int | None = None,
               stop: threading.Event | None = None, pubsub_topic: str | None = None,
               pubsub_subscription: str | None = None, coder: bool | None = None, quality: float | None = None,
               pipeline_args: Sequence[str] = (), watcher: FileWatcher | None = None, source: str | None = None,
               group: str = "stream-encode", batch_messages: int = 200, watermark_lag: float = 0.0,
               max_deliver: int = 5, ack_wait: float | None = None) -> dict:
    """Run the streaming encoder until the source ends (``stop_after``, ``idle_timeout``, ``max_files``,
    ``stop``; Pub/Sub: until cancelled) and return a summary: counters, windows written, dead letters, drift
    flags, seconds.

    ``source``: a broker stream (``redis://HOST:PORT/STREAM``, :mod:`vaestream.broker`) instead of files, read by
    the consumer group ``group`` through the in-process runner's bridge (:class:`BrokerWatcher`);
    ``max_files`` then counts messages, ``batch_messages`` is the most one round takes, and output is committed
    effectively once (the ledger under ``OUTPUT/ledger/``; see :mod:`vaestream.beam.broker_source`).
    ``ack_wait`` (default: 3 x (window + allowed lateness), at least 60 s) is how long another consumer's
    unacknowledged message waits before this one reclaims it."""
    from apache_beam.options.pipeline_options import PipelineOptions

    p = streaming_pipeline(PipelineOptions(list(pipeline_args)))
    broker = bwatcher = recovered = None
    cfg = config or StreamConfig()
    if source is not None:
        bwatcher, recovered = _broker_watcher(output, source, group, cfg, poll_interval, batch_messages,
                                              idle_timeout, stop_after, max_files, stop, watermark_lag, max_deliver,
                                              ack_wait)
        broker = bwatcher.commit
        paths = p | "ReadFromBroker" >> ReadFromBroker(bwatcher)
        watcher = None
    elif pubsub_topic or pubsub_subscription:
        paths = p | "PubSub" >> pubsub_paths(pubsub_topic, pubsub_subscription)
        watcher = None
    else:
        if watcher is None:
            if not patterns:
                raise ConfigError("give file patterns to watch, or a Pub/Sub topic/subscription")
            watcher = FileWatcher(patterns, cfg.poll_interval(poll_interval), stop_after, idle_timeout, max_files,
                                  stop)
        paths = p | "WatchFiles" >> WatchFiles(watcher)
    paths | "StreamEncode" >> StreamEncode(output, model_dir, saved_model, config, drift, coder, quality, broker)
    t0 = time.perf_counter()
    backlog = _run_sources(p, watcher, bwatcher)
    seconds = time.perf_counter() - t0
    summary = _stream_summary(output, seconds, cfg, watcher)
    if bwatcher is not None:
        r = bwatcher.reader
        summary.update(source=r.u.address, group=r.group, recovered=recovered, messages_read=bwatcher.messages,
                       reads=bwatcher.reads, elements=bwatcher.elements, poisoned=bwatcher.poisoned,
                       broker=dict(r.counts), backlog=backlog)
    return summary


def _broker_watcher(output: str, source: str, group: str, cfg: StreamConfig, poll_interval: float,
                    batch_messages: int, idle_timeout, stop_after, max_messages, stop, watermark_lag: float,
                    max_deliver: int, ack_wait: float | None) -> tuple[BrokerWatcher, object]:
    """The bridge from the broker stream ``source`` (after the ledger's recovery, its committed IDs skipped):
    (the :class:`BrokerWatcher`, what :meth:`vaestream.broker.Ledger.recover` rolled forward)."""
    from vaestream.broker import BrokerReader, BrokerURL, Ledger

    wait = BrokerURL.parse(source).ack_wait or ack_wait
    hold = cfg.window + cfg.allowed_lateness
    if wait is not None and not wait > hold:
        raise ConfigError(f"{source}: ack_wait {wait:g} s must exceed the window plus the allowed lateness "
                          f"({hold:g} s), the longest a message waits for its pane, or messages in flight "
                          f"are reclaimed and written twice")
    wait = wait if wait is not None else max(60.0, 3 * hold)
    os.makedirs(output, exist_ok=True)
    recovered = Ledger(output).recover()
    committed = Ledger(output).committed_ids()
    reader = BrokerReader(source, group, committed=committed, max_deliver=max_deliver, ack_wait=wait,
                          block=min(cfg.poll_interval(poll_interval), 1.0)).setup()
    broker = BrokerCommit(source, reader.group, output)
    return BrokerWatcher(reader, broker, batch_messages, idle_timeout, stop_after, max_messages, stop,
                         watermark_lag, window=cfg.window), recovered


def _run_sources(p: beam.Pipeline, watcher: FileWatcher | None, bwatcher: BrokerWatcher | None) -> int | None:
    """Run the pipeline to the end of its source, then close the watchers; raises the broker's failure rather
    than the pipeline's report of it. Returns the broker's backlog (None without a broker)."""
    backlog = None
    try:
        try:
            vb.run_pipeline(p)   # its counters are incomplete on the in-process runner: the summary counts files
        except Exception:
            if bwatcher is not None and bwatcher.error is not None:
                raise bwatcher.error from None   # the broker's failure, not the pipeline's report of it
            raise
        if bwatcher is not None:
            if bwatcher.error is not None:
                raise bwatcher.error
            backlog = bwatcher.reader.backlog()
    finally:
        if watcher is not None:
            watcher.close()
        if bwatcher is not None:
            bwatcher.close()
    return backlog


def _stream_summary(output: str, seconds: float, cfg: StreamConfig, watcher: FileWatcher | None) -> dict:
    """The run's summary, counted from what was written under ``output``."""
    from vaestream.online.drift import read_log

    wins = read_windows(output)
    dead = read_dead_letters(output)
    drift_recs = read_log(os.path.join(output, DRIFT_LOG))
    records = sum(w["records"] for w in wins)
    sources = {s for w in wins for s in w["sources"]}
    return {"job": "stream_encode", "seconds": round(seconds, 3),
            "files_found": len(watcher.arrivals) if watcher is not None else None,
            "files_encoded": len(sources), "records": records, "dead_lettered": len(dead),
            "late_dead_lettered": sum(1 for d in dead if ": late: " in d["reason"]),
            "late_records_written": sum(w["records"] for w in wins if w["timing"] == "late"),
            "panes": len(wins), "drift_flagged_windows": sum(1 for r in drift_recs if r.get("flagged")),
            "records_per_second": round(records / max(seconds, 1e-9), 1), "output": output,
            "window_s": cfg.window, "max_latency_s": cfg.max_latency,
            "code_layout": LAYOUT_VERSIONS[cfg.code_layout], "score_every": cfg.score_every,
            "polls_with_files": watcher.polls if watcher is not None else None,
            "poll_s": watcher.poll_interval if watcher is not None else None}

"""Broker messages as a Beam source, in two forms over one reader (:class:`vaestream.broker.BrokerReader`), and
the steps of the streaming encoder that are particular to them.

* :class:`ReadFromBroker` over a :class:`BrokerWatcher`: **a bridge** for Beam's in-process streaming runner
  (``BundleBasedDirectRunner``), which runs no splittable DoFn and has no bundle finalization. The watcher is
  a ``TestStreamService`` in this process: it reads the stream and serves the runner the messages as
  ``TestStream`` events (their IDs at their event times, then the watermark; the first step swaps each ID for
  the message the watcher holds), as
  :class:`vaestream.beam.stream_sources.FileWatcher` does for files; after each batch it waits until the
  pipeline has taken it (backpressure) before it reads again. It is not a Beam I/O connector: it works only
  where the runner and the watcher share a process.
* :class:`vaestream.beam.broker_splittable.ReadBroker`: a splittable DoFn for runners that run them (Dataflow,
  Flink, Prism): its restriction counts messages (``[0, max_messages)``, unbounded by default), it
  **checkpoints** (``defer_remainder``) when the stream has nothing new, its **watermark estimator** (manual)
  follows the broker's clock, and in bounded mode it ends after ``max_messages`` or ``idle_timeout`` seconds
  without a message (so it is tested on the FnApiRunner, which runs splittable DoFns in batch mode only).

On Dataflow or Flink a stream from Pub/Sub or Kafka goes into the same transforms: :class:`ReadPubSubMessages`
(``ReadFromPubSub(with_attributes=True)`` then :func:`message_from_pubsub`) or ``ReadFromKafka`` then
``beam.Map`` of :func:`message_from_bytes` gives :class:`vaestream.broker.Message` elements carrying the same
wire format (the attributes or headers are the fields); those runners acknowledge on their own checkpoints, and
``BrokerCommit(None, None, OUTPUT)``'s ledger still keeps redelivered messages out of the output.

**Effectively once.** Nobody acknowledges a message when it is read. :class:`BrokerCommit` is handed to the
stage that writes output: the window writer of :class:`vaestream.beam.streaming.StreamEncode` stages a pane's
files, commits them with the broker IDs the pane holds (:class:`vaestream.broker.Ledger`), and only then
acknowledges those IDs (:class:`vaestream.broker.Acker`, its own connection); the late gate does the same for
a late message's dead letter, and the watcher for a message delivered more than ``max_deliver`` times. At
start-up the ledger is recovered and its IDs are skipped, so a crash at any point loses nothing and writes
nothing twice.
"""

from __future__ import annotations

import os
import threading
import time

import apache_beam as beam
import numpy as np
from apache_beam import coders
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from vaestream import beam as vb
from vaestream.beam.bridge import StreamBridge, bridge, release_free_memory
from vaestream.beam.elements import KeyRange
from vaestream.beam.scoring import ScoredBatch
from vaestream.broker import Acker, BrokerError, BrokerReader, BrokerURL, Ledger, Message, WireError, decode, fault
from vaestream.broker import wire
from vaestream.data import COUNT_SCALE
from vaestream.errors import ConfigError

_NS = vb.NAMESPACE
DEAD_DIR = "dead_letter"
RELEASE_EVERY = 5.0   # seconds between two returns of freed heap memory to the system (release_free_memory)
_COMMITTED_LOCK = threading.Lock()
_COMMITTED: dict[tuple[str, str], frozenset] = {}   # (output, transform) -> the ledger's IDs at its first set-up


def message_from_bytes(data: bytes, attributes: dict | None = None, message_id: str = "0-0",
                       stream: str = "pubsub", publish_time: float | None = None) -> Message:
    """A Pub/Sub or Kafka message in the wire format (``data`` the payload, ``attributes`` the other fields:
    ``vaestream``, ``format``, ``dtype``, ``shape``, ...) as a :class:`vaestream.broker.Message`; without an
    ``event_time`` attribute, ``publish_time`` (seconds) is its event time."""
    fields = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in (attributes or {}).items()}
    fields[b"data"] = data
    if b"event_time" not in fields and publish_time is not None:
        fields[b"event_time"] = repr(float(publish_time)).encode()
    return Message(str(message_id), fields, 1, stream)


def message_from_pubsub(msg, subscription: str = "pubsub") -> Message:
    """A ``PubsubMessage`` (``ReadFromPubSub(..., with_attributes=True)``) as a :class:`vaestream.broker.Message`."""
    t = getattr(msg, "publish_time", None)
    seconds = t.timestamp() if hasattr(t, "timestamp") else (t.seconds + t.nanos / 1e9 if t is not None else None)
    return message_from_bytes(msg.data, dict(msg.attributes or {}), msg.message_id or "0-0", subscription, seconds)


class ReadPubSubMessages(beam.PTransform):
    """PBegin -> :class:`vaestream.broker.Message` elements from Pub/Sub (Dataflow; Flink with the connector):
    ``ReadFromPubSub(with_attributes=True)`` then :func:`message_from_pubsub`. The runner acknowledges
    messages on its own checkpoints; give :class:`vaestream.beam.streaming.StreamEncode` a
    ``BrokerCommit(None, None, OUTPUT)``, whose ledger keeps redelivered messages out of the output. (Kafka
    likewise: ``ReadFromKafka(...)`` then ``beam.Map(lambda kv: message_from_bytes(kv[1], headers, ...))``.)"""

    def __init__(self, subscription: str | None = None, topic: str | None = None):
        super().__init__()
        self.subscription, self.topic = subscription, topic

    def expand(self, pbegin):
        sub = self.subscription or self.topic or "pubsub"
        return (pbegin | "ReadPubSub" >> beam.io.ReadFromPubSub(topic=self.topic, subscription=self.subscription,
                                                                with_attributes=True)
                | "ToMessage" >> beam.Map(message_from_pubsub, sub))


def dead_letter_lines(letters: list[vb.DeadLetter]) -> bytes:
    """The dead-letter file's contents: one JSON object per line, sorted by (source, key)."""
    return "".join(d.to_json() + "\n" for d in sorted(letters, key=lambda d: (d.source, d.key))).encode()


class MessageBatch(tuple):
    """The messages of one read whose event times fall in one window: **one element** through the pipeline (its
    timestamp the earliest of their event times), so that the in-process runner's per-element costs (the
    bridge's swap, the key step, the late gate's state, the windowing: ~0.5 ms an element) are paid once a
    window and read, not once a message. The steps that take messages take a batch or a single
    :class:`vaestream.broker.Message` (the splittable read and Pub/Sub yield single messages)."""


def messages_of(element) -> tuple:
    """The messages of a pipeline element (a :class:`MessageBatch` or one message)."""
    return tuple(element) if isinstance(element, MessageBatch) else (element,)


class BrokerCommit:
    """How the stage that writes output commits it and acknowledges its messages (picklable).

    Args:
      url: the stream's URL (None: commit to the ledger only, for a runner that acknowledges on its own, as
        Dataflow does Pub/Sub messages).
      group: the consumer group to acknowledge to.
      output: the output directory (its ``ledger/``).
    """

    def __init__(self, url: str | None, group: str | None, output: str):
        self.url, self.group, self.output = url, group, output.rstrip("/")
        self._acker: Acker | None = None

    def __getstate__(self):
        return dict(self.__dict__, _acker=None)

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.output)

    def commit(self, name: str, files: list[str], ids: list[str], **info) -> None:
        """Commit the staged ``files`` of unit ``name`` with its message ``ids``, then acknowledge them (the
        fault points ``after_rename`` and ``after_ack`` around the acknowledgement)."""
        self.ledger.commit(name, files, sorted(ids, key=wire.id_key), **info)
        fault("after_rename")
        if self.url is None:
            return
        if self._acker is None:
            self._acker = Acker(self.url, self.group)
        self._acker.ack(ids)
        fault("after_ack")

    def dead_letters(self, name: str, letters: list[vb.DeadLetter], ids: list[str]) -> str:
        """Stage, commit and acknowledge a file of dead letters (``dead_letter/dead_letter-NAME.jsonl``)."""
        os.makedirs(os.path.join(self.output, DEAD_DIR), exist_ok=True)
        path = os.path.join(self.output, DEAD_DIR, f"dead_letter-{name}.jsonl")
        self.ledger.write_staged(path, dead_letter_lines(letters))
        fault("before_rename")
        self.commit(name, [path], ids, dead_letters=len(letters))
        return path


# ---------------------------------------------------------------------------------------------------------
# the TestStream bridge (in-process streaming runner)
# ---------------------------------------------------------------------------------------------------------
class BrokerWatcher(StreamBridge):
    """Reads a stream and serves its messages to the in-process streaming runner as ``TestStream`` events.

    Args:
      reader: the :class:`vaestream.broker.BrokerReader` (set up with the ledger's committed IDs).
      commit: the :class:`BrokerCommit` that dead-letters poisoned messages.
      batch_messages: the most messages one read (one round of the pipeline) takes.
      idle_timeout: stop when no message came for this many seconds (None: never).
      stop_after: stop this many seconds after the start (None: never).
      max_messages: stop after this many messages.
      stop: an event that stops the stream.
      watermark_lag: seconds the watermark stays behind the broker's clock.
      ack_timeout: the longest wait for the pipeline to take a batch before reading anyway.
      window: the pipeline's fixed window (seconds): a read's messages are served as one :class:`MessageBatch`
        per window their event times fall in (None: one element per message).

    The watermark is the broker time of the newest message read, or the broker's clock just before the read
    when the stream is caught up (a read of new entries returned less than a full batch; not a read of the
    entries pending from before a restart, which says nothing of the backlog behind them), minus
    ``watermark_lag``; it never goes back. A message whose producer event time is behind it by more than its
    window and the allowed lateness is late: dead-lettered by the late gate.
    """

    def __init__(self, reader: BrokerReader, commit: BrokerCommit, batch_messages: int = 200,
                 idle_timeout: float | None = None, stop_after: float | None = None,
                 max_messages: int | None = None, stop: threading.Event | None = None, watermark_lag: float = 0.0,
                 ack_timeout: float = 30.0, window: float | None = None):
        super().__init__(stop, ack_timeout)
        self.window_micros = None if window is None else max(1, Duration.of(window).micros)
        self.reader, self.commit = reader, commit
        self.batch_messages = int(batch_messages)
        self.idle_timeout, self.stop_after, self.max_messages = idle_timeout, stop_after, max_messages
        self.watermark_lag = float(watermark_lag)
        self.messages = 0
        self.records_offered = 0
        self.poisoned = 0
        self.reads = 0
        self.elements = 0
        self._bodies: dict[str, Message | MessageBatch] = {}
        self.error: BaseException | None = None

    def take(self, msg_id: str) -> Message | MessageBatch:
        """The pipeline took the element ``msg_id`` (a message's ID, or a batch's first): its body (kept here, in
        this process, so that the events carry IDs, not payloads; gRPC's 4 MiB message limit would split a read
        into many rounds). The bridge's backpressure, not the broker's acknowledgement."""
        with self._cond:
            self.mark_taken(msg_id)
            msg = self._bodies.pop(msg_id, None)
        if msg is None:
            raise RuntimeError(f"broker bridge: message {msg_id} taken twice or never read")
        return msg

    def _elements(self, msgs: list[Message]) -> list[tuple[str, int, Message | MessageBatch]]:
        """A read's elements: (ID, event time in microseconds, body), one a message or one a window."""
        if self.window_micros is None:
            return [(m.id, Timestamp.of(m.event_time).micros, m) for m in msgs]
        groups: dict[int, list[tuple[int, Message]]] = {}
        for m in msgs:
            t = Timestamp.of(m.event_time).micros
            groups.setdefault(t // self.window_micros, []).append((t, m))
        return [(g[0][1].id, min(t for t, _ in g), MessageBatch(m for _, m in g)) for g in groups.values()]

    def _dead_letter_poisoned(self) -> None:
        for msg, reason in self.reader.take_poisoned():
            self.poisoned += 1
            self.commit.dead_letters(f"poison-{msg.id}", [vb.DeadLetter(msg.ref, msg.ref, reason)], [msg.id])
            self.reader.in_flight.discard(msg.id)

    def events(self):
        """The event stream (see the class docstring)."""
        from apache_beam.portability.api import beam_runner_api_pb2

        ev = beam_runner_api_pb2.TestStreamPayload.Event
        te = beam_runner_api_pb2.TestStreamPayload.TimestampedElement
        coder = coders.StrUtf8Coder()
        t0 = last_new = last_release = time.monotonic()
        wm = MIN_TIMESTAMP.micros
        try:
            while not self.stop_event.is_set():
                want = self.batch_messages
                if self.max_messages is not None:
                    want = min(want, self.max_messages - self.messages)
                before = self.reader.server_time()
                msgs = self.reader.read(count=max(1, want)) if want > 0 else []
                self._dead_letter_poisoned()
                if msgs:
                    self.reads += 1
                    elements = self._elements(msgs)
                    self.elements += len(elements)
                    with self._cond:
                        for eid, _, body in elements:
                            self._pending[eid] = self.reads
                            self._bodies[eid] = body
                    self.messages += len(msgs)
                    last_new = time.monotonic()
                    yield ev(element_event=ev.AddElements(elements=[
                        te(encoded_element=coder.encode(eid), timestamp=t) for eid, t, _ in elements]))
                # caught up: every entry appended before `before` was in this read, later ones have IDs (whole
                # milliseconds) from `before` - 1 ms on; else the newest ID read
                if self.reader.last_read == "new" and len(msgs) < want:
                    t = before - 0.001
                elif msgs:   # a backlog, or entries pending from before a restart: the newest read
                    t = max(m.broker_time for m in msgs)
                else:
                    t = None
                if t is not None:
                    wm = max(wm, Timestamp.of(t - self.watermark_lag).micros)
                yield ev(watermark_event=ev.AdvanceWatermark(new_watermark=wm))
                if msgs:
                    self.wait_taken(self.reads)
                t = time.monotonic()
                if t - last_release >= RELEASE_EVERY:
                    last_release = t
                    release_free_memory()
                if (self.max_messages is not None and self.messages >= self.max_messages) or \
                        (self.stop_after is not None and t - t0 >= self.stop_after) or \
                        (self.idle_timeout is not None and t - last_new >= self.idle_timeout):
                    break
        except BrokerError as e:
            # the broker is gone: end the stream, so that the panes in flight are committed (their
            # acknowledgements wait for the ledger at the next start), and keep the cause for run_stream
            self.error = e
        except BaseException as e:
            self.error = e
            raise

    def close(self) -> None:
        """Stop the stream, the service and the reader."""
        super().close()
        self.reader.close()


class ReadFromBroker(beam.PTransform):
    """PBegin -> :class:`vaestream.broker.Message` elements at their event times, from a :class:`BrokerWatcher`
    (the in-process streaming runner's bridge)."""

    def __init__(self, watcher: BrokerWatcher):
        super().__init__()
        self.watcher = watcher

    def expand(self, pbegin):
        from apache_beam.testing.test_stream import TestStream

        return (pbegin | "BrokerEvents" >> TestStream(coder=coders.StrUtf8Coder(), endpoint=self.watcher.start())
                | "Taken" >> beam.Map(taken, self.watcher.id))


def taken(msg_id: str, watcher_id: str) -> Message:
    """The message ``msg_id`` from its watcher (the bridge works only in the watcher's process)."""
    w = bridge(watcher_id)
    if w is None:
        raise RuntimeError(f"broker bridge: watcher {watcher_id} is not in this process (the TestStream bridge runs "
                           f"on the in-process streaming runner only; elsewhere use broker_splittable.ReadBroker)")
    return w.take(msg_id)


# ---------------------------------------------------------------------------------------------------------
# decode, validate, score (the encode step of StreamEncode for messages)
# ---------------------------------------------------------------------------------------------------------
class MessageIds(tuple):
    """The IDs of messages whose records (codes or dead letters) are in the pane: the writer commits them."""


class KeyNewMessagesFn(beam.DoFn):
    """Message (or :class:`MessageBatch`) -> ``(key, message)`` (a batch: its new messages), unless the ledger
    of ``output`` (as it was when the worker started) has committed its ID: a message the runner delivers again
    after a restart (Pub/Sub, Kafka, the splittable read) is dropped here, before the late gate could dead-letter
    it a second time."""

    def __init__(self, output: str, key: str = "paths"):
        self.output, self.key = output, key
        self.skipped = Metrics.counter(_NS, "broker_committed_skipped")
        self._committed: frozenset[str] = frozenset()
        self._token = f"{os.getpid()}-{id(self):x}-{time.monotonic_ns()}"   # this transform, in every copy

    def setup(self):
        # the in-process runner sets up a copy of the DoFn for every bundle: the ledger (one file a pane, a
        # growing directory) is read once per process and transform, not once a round
        key = (self.output, self._token)
        with _COMMITTED_LOCK:
            committed = _COMMITTED.get(key)
            if committed is None:
                committed = frozenset(Ledger(self.output).committed_ids()) if os.path.isdir(self.output) \
                    else frozenset()
                _COMMITTED[key] = committed
        self._committed = committed

    def process(self, element):
        if not isinstance(element, MessageBatch):
            if element.id in self._committed:
                self.skipped.inc()
                return
            yield self.key, element
            return
        new = MessageBatch(m for m in element if m.id not in self._committed)
        if len(new) < len(element):
            self.skipped.inc(len(element) - len(new))
        if new:
            yield self.key, new


class EncodeMessagesFn(beam.DoFn):
    """Message (or :class:`MessageBatch`) -> ``(0, ScoredBatch)`` (the :class:`vaestream.beam.scoring.Scored` of
    a model call), ``(0, DeadLetter)`` and ``(0, MessageIds)`` for the pane's GroupByKey.

    A message is decoded (:func:`vaestream.broker.decode`; malformed: one dead letter with the reason) and
    validated (:func:`vaestream.beam.validate_batch`: refused records are dead letters); the valid records of
    a bundle's messages of one window are scored together, ``chunk_size`` records per model call (one call
    per message would cost a model call per 100 records)."""

    def __init__(self, handler, chunk_size: int, shape=None, likelihood: str | None = None):
        self.handler, self.chunk_size = handler, chunk_size
        self.shape = tuple(shape) if shape is not None else None
        self._size = int(np.prod(self.shape)) if self.shape is not None else None
        self.likelihood = likelihood
        self.records_in = Metrics.counter(_NS, "records_in")
        self.messages = Metrics.counter(_NS, "messages_in")
        self.model_calls = Metrics.counter(_NS, "model_calls")
        self._model = None
        self._buf: dict = {}

    def setup(self):
        self._model = self.handler.load_model()

    def start_bundle(self):
        self._buf = {}

    def _flush(self, win):
        batches, ids = self._buf.pop(win, ([], []))
        out = []
        if batches:
            self.model_calls.inc()
            out = [(0, ScoredBatch(self.handler.run_inference(batches, self._model)))]
        if ids:
            out.append((0, MessageIds(ids)))
        return out

    def process(self, element, win=beam.DoFn.WindowParam):
        batches, ids = self._buf.setdefault(win, ([], []))
        msgs = messages_of(element)
        self.messages.inc(len(msgs))
        n = 0
        for msg in msgs:
            ids.append(msg.id)
            try:
                records = decode(msg)
            except WireError as e:
                n += 1
                yield 0, vb.DeadLetter(msg.ref, msg.ref, str(e))
                continue
            n += len(records)
            keys = KeyRange(msg.id, 0, len(records))   # ID:000000000 ..: no string a record (block layout)
            if records.dtype == np.uint8 and len(records) and records.size == len(records) * (self._size or -1):
                # 8-bit counts of the model's size: validate_batch refuses none (uint8 is finite and, at its scale
                # 1/255, inside [0, 1]) and returns them reshaped at scale 1/255; ~30 us a message spared
                good, dead = vb.RecordBatch(msg.ref, keys, records.reshape((len(records),) + self.shape),
                                            COUNT_SCALE), ()
            else:
                good, dead = vb.validate_batch(vb.RecordBatch(msg.ref, keys, records), self.shape, self.likelihood)
            for d in dead:
                yield 0, d
            if good is not None:
                batches.append(good)
                if sum(len(b) for b in batches) >= self.chunk_size:
                    yield from self._flush(win)
                    batches, ids = self._buf.setdefault(win, ([], []))
        self.records_in.inc(n)

    def finish_bundle(self):
        for win in list(self._buf):
            for v in self._flush(win):
                yield WindowedValue(v, win.max_timestamp(), [win])


def check_source_url(url: str) -> BrokerURL:
    """Parse a ``--source`` URL (a :class:`vaestream.errors.ConfigError` says what is wrong)."""
    u = BrokerURL.parse(url)
    if u.port <= 0:
        raise ConfigError(f"{url}: bad port")
    return u


__all__ = ["BrokerCommit", "BrokerWatcher", "EncodeMessagesFn", "KeyNewMessagesFn", "MessageBatch", "MessageIds",
           "ReadFromBroker", "ReadPubSubMessages", "check_source_url", "dead_letter_lines", "message_from_bytes",
           "message_from_pubsub", "messages_of", "taken"]

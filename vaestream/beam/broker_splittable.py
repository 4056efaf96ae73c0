"""The splittable-DoFn form of the broker source (:class:`ReadBroker`), for runners that run splittable DoFns
(Dataflow, Flink, Prism), over the same reader (:class:`vaestream.broker.BrokerReader`) as the in-process bridge
(:class:`vaestream.beam.broker_source.BrokerWatcher`).

Its restriction counts messages (``[0, max_messages)``, unbounded by default); it **checkpoints**
(``defer_remainder``) when the stream has nothing new; its **watermark estimator** (manual) follows the broker's
clock; in bounded mode it ends after ``max_messages`` or ``idle_timeout`` seconds without a message, so it is
tested on the FnApiRunner, which runs splittable DoFns in batch mode only. Messages are acknowledged by the stage
that commits them (:class:`vaestream.beam.broker_source.BrokerCommit`), never when read.
"""

from __future__ import annotations

import os
import threading
import time

import apache_beam as beam
from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from vaestream import beam as vb
from vaestream.beam.broker_source import BrokerCommit
from vaestream.broker import BrokerReader, Ledger

_NS = vb.NAMESPACE
_READERS: dict[tuple, BrokerReader] = {}   # one reader per process and stream: its in-flight set spans checkpoints
_READERS_LOCK = threading.Lock()


class MessageRangeTracker(RestrictionTracker):
    """Claims message positions ``[start, stop)`` of a read; claiming :data:`END` ends the restriction where
    it is (bounded mode: the stream went idle). A checkpoint (``defer_remainder``) splits at the next
    position."""

    END = -1

    def __init__(self, rng: OffsetRange):
        self._range = rng
        self._next = rng.start
        self._done = False

    def current_restriction(self) -> OffsetRange:
        return self._range

    def try_claim(self, position: int) -> bool:
        if self._done:
            return False
        if position == self.END:
            self._range = OffsetRange(self._range.start, self._next)
            self._done = True
            return True
        if position >= self._range.stop:
            return False
        self._next = position + 1
        return True

    def try_split(self, fraction_of_remainder: float):
        if self._done or self._next >= self._range.stop:
            return None
        split = self._next + int((self._range.stop - self._next) * fraction_of_remainder)
        primary, residual = OffsetRange(self._range.start, split), OffsetRange(split, self._range.stop)
        self._range = primary
        return primary, residual

    def check_done(self) -> None:
        if not self._done and self._next < self._range.stop:
            raise ValueError(f"messages [{self._next}, {self._range.stop}) of {self._range} were not attempted")

    def current_progress(self) -> RestrictionProgress:
        return RestrictionProgress(completed=self._next - self._range.start,
                                   remaining=max(0, self._range.stop - self._next))

    def is_bounded(self) -> bool:
        return True


class _MessageRanges(RestrictionProvider):
    """An element (a stream URL) starts as the messages ``[0, 2**62)``: the read ends by claiming
    :data:`MessageRangeTracker.END` (bounded mode) or never."""

    def initial_restriction(self, element):
        return OffsetRange(0, 2 ** 62)

    def create_tracker(self, restriction):
        return MessageRangeTracker(restriction)

    def restriction_size(self, element, restriction):
        return max(0, restriction.stop - restriction.start)

    def split(self, element, restriction):
        yield restriction           # one consumer per stream element; the group spreads work across elements


class _ReadBrokerFn(beam.DoFn):
    """url -> messages (the splittable read; see :class:`ReadBroker`)."""

    def __init__(self, group: str, max_messages: int | None, idle_timeout: float | None, batch_messages: int,
                 watermark_lag: float, poll: float, committed_from: str | None, max_deliver: int, ack_wait: float):
        self.group, self.max_messages, self.idle_timeout = group, max_messages, idle_timeout
        self.batch_messages, self.watermark_lag, self.poll = batch_messages, watermark_lag, poll
        self.committed_from, self.max_deliver, self.ack_wait = committed_from, max_deliver, ack_wait
        self.read_count = Metrics.counter(_NS, "broker_messages_read")
        self.checkpoints = Metrics.counter(_NS, "broker_checkpoints")
        self.poisoned = Metrics.counter(_NS, "broker_poisoned")

    def _reader(self, url: str) -> BrokerReader:
        key = (url, self.group, os.getpid())
        with _READERS_LOCK:   # one reader per process and stream: its in-flight set spans checkpoints
            r = _READERS.get(key)
            if r is None:
                committed = Ledger(self.committed_from).committed_ids() if self.committed_from else ()
                r = BrokerReader(url, self.group, committed=committed, max_deliver=self.max_deliver,
                                 ack_wait=self.ack_wait, block=self.poll).setup()
                r.idle_since = time.monotonic()
                _READERS[key] = r
            return r

    def process(self, url: str, tracker=beam.DoFn.RestrictionParam(_MessageRanges()),
                wm=beam.DoFn.WatermarkEstimatorParam(
                    ManualWatermarkEstimator.default_provider())):
        reader = self._reader(url)
        pos = tracker.current_restriction().start
        limit = self.max_messages if self.max_messages is not None else 2 ** 62
        while True:
            if pos >= limit:
                tracker.try_claim(MessageRangeTracker.END)
                return
            want = min(self.batch_messages, tracker.current_restriction().stop - pos, limit - pos)
            before = reader.server_time()
            msgs = reader.read(count=max(1, want)) if want > 0 else []
            for m, reason in reader.take_poisoned():
                self.poisoned.inc()
                if self.committed_from:   # dead-lettered into the output's ledger, then acknowledged
                    BrokerCommit(url, reader.group, self.committed_from).dead_letters(
                        f"poison-{m.id}", [vb.DeadLetter(m.ref, m.ref, reason)], [m.id])
                reader.in_flight.discard(m.id)   # else left pending (and counted)
            if msgs:
                reader.idle_since = time.monotonic()
            for m in msgs:
                if not tracker.try_claim(pos):
                    return           # the range ended: the rest stays pending and is delivered again
                pos += 1
                self.read_count.inc()
                yield TimestampedValue(m, Timestamp.of(m.event_time))
            if reader.last_read == "new" and len(msgs) < want:
                t = before - 0.001
            else:
                t = max((m.broker_time for m in msgs), default=None)
            new = None if t is None else Timestamp.of(t - self.watermark_lag)
            if new is not None and (wm.current_watermark() is None or new > wm.current_watermark()):
                wm.set_watermark(new)
            if pos >= tracker.current_restriction().stop:
                return
            if not msgs:
                if self.idle_timeout is not None and time.monotonic() - reader.idle_since >= self.idle_timeout:
                    tracker.try_claim(MessageRangeTracker.END)
                    return
                self.checkpoints.inc()
                tracker.defer_remainder(Duration.of(self.poll))   # checkpoint: resume later
                return


class ReadBroker(beam.PTransform):
    """PCollection of stream URLs -> their messages at event times: the splittable-DoFn form (runners with
    splittable DoFns; bounded with ``max_messages`` or ``idle_timeout``).

    Args:
      group: the consumer group.
      max_messages: stop after this many messages (None: unbounded).
      idle_timeout: end when no message came for this many seconds (None: checkpoint and go on).
      batch_messages: messages per read.
      watermark_lag: seconds the watermark stays behind the broker's clock.
      poll: seconds a read blocks, and the delay of a checkpoint's resumption.
      committed_from: the output directory: its ledger's IDs are skipped, and a message delivered more than
        ``max_deliver`` times is dead-lettered there (without one it is left pending and counted).
    """

    def __init__(self, group: str = "vaestream", max_messages: int | None = None, idle_timeout: float | None = None,
                 batch_messages: int = 200, watermark_lag: float = 0.0, poll: float = 0.2,
                 committed_from: str | None = None, max_deliver: int = 5, ack_wait: float = 600.0):
        super().__init__()
        self.fn = _ReadBrokerFn(group, max_messages, idle_timeout, batch_messages, watermark_lag, poll,
                                committed_from, max_deliver, ack_wait)

    def expand(self, urls):
        return urls | "ReadBroker" >> beam.ParDo(self.fn)

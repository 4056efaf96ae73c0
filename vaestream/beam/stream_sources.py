"""The sources of the streaming encoder (:mod:`vaestream.beam.streaming`): file paths with event times.

* :class:`WatchFiles` over a :class:`FileWatcher`: polls a glob and emits each new, settled file once,
  through the in-process streaming runner's ``TestStream`` service protocol;
* :class:`PollFiles`: the same for runners with splittable DoFns (``PeriodicImpulse`` + match + per-path
  de-duplication);
* :func:`pubsub_paths`: Pub/Sub messages naming files.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Iterable, Sequence

import apache_beam as beam
from apache_beam import coders
from apache_beam.transforms import userstate
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from vaestream import beam as vb
from vaestream.beam.bridge import StreamBridge, bridge
from vaestream.binio import is_settled, new_files
from vaestream.errors import ConfigError, DataError

_NS = vb.NAMESPACE


class FileWatcher(StreamBridge):
    """Polls glob ``patterns`` and streams each new file's path once, as ``TestStreamService`` events.

    Args:
      patterns: a glob or several.
      poll_interval: seconds between polls.
      stop_after: stop this many seconds after the stream starts (None: never).
      idle_timeout: stop when no new file appeared for this many seconds (None: never).
      max_files: stop after this many files.
      stop: an event that stops the stream when set.
      seen: paths to treat as already processed.
      ack_timeout: the longest wait for the pipeline to take a batch before polling anyway (seconds).
      max_batch_bytes: the most bytes of files one poll takes (the rest wait for the next).

    Attributes:
      arrivals: path -> wall-clock time (``time.time()``) the file was found, for latency accounting.
      endpoint: the ``host:port`` of the service once :meth:`start` ran.
      polls: the polls that found files (each is one element event: one bundle for the pipeline).

    **Backpressure.** The runner reads the service's events eagerly into a queue but takes the next one only
    when the pipeline is idle, so a watcher that polls on its own clock while the pipeline is busy queues
    many small events, each a full pass of the pipeline, and the backlog grows. :class:`WatchFiles` puts
    an acknowledgement step (:meth:`ack`) right after the source: the watcher polls again only once the
    pipeline has taken the previous poll's files (and ``poll_interval`` has passed), so each poll carries
    every file that arrived while the pipeline was busy: the batch grows with the load, and the pipeline pays
    its per-bundle cost once per batch, not per file. (Bounded by ``ack_timeout`` seconds, after which it
    polls anyway, e.g. on a runner that runs the ack step in another process.) A poll takes at most
    ``max_batch_bytes`` of files (default 32 MiB, ~43k MNIST records, about a second of work on two cores), so
    past saturation the backlog waits in the folder, not in memory, and each round stays bounded.
    """

    def __init__(self, patterns: str | Sequence[str], poll_interval: float = 1.0, stop_after: float | None = None,
                 idle_timeout: float | None = None, max_files: int | None = None,
                 stop: threading.Event | None = None, seen: Iterable[str] = (), ack_timeout: float = 10.0,
                 max_batch_bytes: int = 32 << 20):
        if not poll_interval > 0:
            raise ConfigError(f"poll_interval must be positive, got {poll_interval}")
        super().__init__(stop, ack_timeout)
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        self.poll_interval = float(poll_interval)
        self.stop_after, self.idle_timeout, self.max_files = stop_after, idle_timeout, max_files
        self.seen: set[str] = {os.path.abspath(s) for s in seen}
        self.arrivals: dict[str, float] = {}
        self.max_batch_bytes = int(max_batch_bytes)
        self.polls = 0

    def ack(self, path: str) -> None:
        """The pipeline took ``path`` (called by :class:`WatchFiles`' acknowledgement step)."""
        with self._cond:
            self.mark_taken(path)

    def poll(self) -> list[str]:
        """The new files (absolute paths, oldest mtime first), now marked seen: at most ``max_batch_bytes`` of
        them (at least one file); the rest wait in the folder for the next poll."""
        new = new_files(self.patterns, self.seen)
        taken, size = [], 0
        for f in new:
            try:
                size += os.path.getsize(f)
            except OSError:
                pass                      # gone or unreadable: the reader reports it
            if taken and size > self.max_batch_bytes:
                break
            taken.append(f)
        self.seen.update(taken)
        return taken

    def events(self):
        """The event stream: per poll, the new paths at the poll time, then the watermark at the poll time."""
        from apache_beam.portability.api import beam_runner_api_pb2

        ev = beam_runner_api_pb2.TestStreamPayload.Event
        te = beam_runner_api_pb2.TestStreamPayload.TimestampedElement
        coder = coders.StrUtf8Coder()
        t0 = last_new = time.monotonic()
        count = 0
        while not self.stop_event.is_set():
            t_poll = time.monotonic()
            now = Timestamp.now()
            new = self.poll()
            if self.max_files is not None:
                new = new[:max(0, self.max_files - count)]
            if new:
                wall = time.time()
                self.polls += 1
                with self._cond:
                    for f in new:
                        self.arrivals[f] = wall
                        self._pending[f] = self.polls
                count += len(new)
                last_new = time.monotonic()
                yield ev(element_event=ev.AddElements(
                    elements=[te(encoded_element=coder.encode(f), timestamp=now.micros) for f in new]))
            yield ev(watermark_event=ev.AdvanceWatermark(new_watermark=now.micros))
            if self.polls:
                self.wait_taken(self.polls)   # backpressure: poll again once the pipeline took this batch
            t = time.monotonic()
            if (self.max_files is not None and count >= self.max_files) or \
                    (self.stop_after is not None and t - t0 >= self.stop_after) or \
                    (self.idle_timeout is not None and t - last_new >= self.idle_timeout):
                break
            self.stop_event.wait(max(0.0, self.poll_interval - (time.monotonic() - t_poll)))


class WatchFiles(beam.PTransform):
    """PBegin -> file paths from a :class:`FileWatcher` (in-process streaming runner)."""

    def __init__(self, watcher: FileWatcher):
        super().__init__()
        self.watcher = watcher

    def expand(self, pbegin):
        from apache_beam.testing.test_stream import TestStream

        return (pbegin | "FileEvents" >> TestStream(coder=coders.StrUtf8Coder(), endpoint=self.watcher.start())
                | "Taken" >> beam.Map(_taken, self.watcher.id).with_output_types(str))


def _taken(path: str, watcher_id: str) -> str:
    """Acknowledge ``path`` to its watcher (in this process; a no-op elsewhere) and pass it on."""
    w = bridge(watcher_id)
    if w is not None:
        w.ack(path)
    return path


class _FirstSeen(beam.DoFn):
    """(path, metadata) -> path, once per path (per-key state)."""

    SEEN = userstate.ReadModifyWriteStateSpec("seen", coders.BooleanCoder())

    def process(self, kv, seen=beam.DoFn.StateParam(SEEN)):
        if not seen.read():
            seen.write(True)
            yield kv[0]


class PollFiles(beam.PTransform):
    """PBegin -> each new file matching ``pattern`` once, polled every ``interval`` seconds (runners with
    splittable DoFns): ``PeriodicImpulse`` -> match -> per-path de-duplication. Paths carry the poll time."""

    def __init__(self, pattern: str, interval: float = 10.0, start: float | None = None, stop: float | None = None):
        super().__init__()
        self.pattern, self.interval = pattern, float(interval)
        self.start = time.time() if start is None else start
        self.stop = stop

    def expand(self, pbegin):
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.transforms.periodicsequence import PeriodicImpulse

        pattern = self.pattern

        def match(_):
            for m in FileSystems.match([pattern])[0].metadata_list:
                if is_settled(m.path):  # not a file still being written
                    yield m.path, m.size_in_bytes

        stop = MAX_TIMESTAMP if self.stop is None else Timestamp.of(self.stop)
        return (pbegin
                | "Poll" >> PeriodicImpulse(Timestamp.of(self.start), stop, self.interval)
                | "Match" >> beam.FlatMap(match).with_output_types(tuple[str, int])
                | "FirstSeen" >> beam.ParDo(_FirstSeen()).with_input_types(tuple[str, int]))


def pubsub_paths(topic: str | None = None, subscription: str | None = None) -> beam.PTransform:
    """PBegin -> file paths from Pub/Sub messages (a path per message, or a Cloud Storage notification whose
    JSON names ``bucket`` and ``name``); needs a runner with Pub/Sub (Dataflow, Flink with the connector)."""

    def to_path(msg: bytes) -> str:
        text = msg.decode("utf-8").strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
                return f"gs://{obj['bucket']}/{obj['name']}"
            except (json.JSONDecodeError, KeyError) as e:
                raise DataError(f"Pub/Sub message is neither a path nor a storage notification: {text[:80]}") from e
        return text

    class _Paths(beam.PTransform):
        def expand(self, pbegin):
            return (pbegin | "ReadPubSub" >> beam.io.ReadFromPubSub(topic=topic, subscription=subscription)
                    | "MessageToPath" >> beam.Map(to_path))

    return _Paths()

"""The in-process streaming runner's ``TestStream`` bridge, shared by the file watcher
(:class:`vaestream.beam.stream_sources.FileWatcher`) and the broker watcher
(:class:`vaestream.beam.broker_source.BrokerWatcher`).

A :class:`StreamBridge` is a source object in this process that serves Beam's in-process streaming runner
(``BundleBasedDirectRunner``) its events through the runner's ``TestStreamService`` protocol (a local gRPC
server, :meth:`StreamBridge.start`). The step right after the source finds the bridge by its ID
(:func:`bridge`) to tell it what the pipeline took (:meth:`StreamBridge.mark_taken`): the bridge reads again
only once the pipeline has taken its previous batch (:meth:`StreamBridge.wait_taken`), so a busy pipeline gets
bigger batches, not more of them. It works only where the runner and the bridge share a process.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Hashable, Iterator

_BRIDGES: "weakref.WeakValueDictionary[str, StreamBridge]" = weakref.WeakValueDictionary()


class StreamBridge:
    """A ``TestStreamService`` in this process: subclasses give :meth:`events` (the event stream).

    Args:
      stop: an event that stops the stream when set (None: a new one).
      ack_timeout: the longest :meth:`wait_taken` waits for the pipeline (seconds).

    Attributes:
      id: the bridge's ID in this process (:func:`bridge`).
      endpoint: the ``host:port`` of the service once :meth:`start` ran.
    """

    def __init__(self, stop: threading.Event | None = None, ack_timeout: float = 10.0):
        self.stop_event = stop or threading.Event()
        self.ack_timeout = float(ack_timeout)
        self.endpoint: str | None = None
        self._controller = None
        self._pending: dict[Hashable, int] = {}   # element -> the batch that emitted it, until the pipeline takes it
        self._taken = 0                           # the latest batch the pipeline has taken
        self._cond = threading.Condition()
        self.id = f"{id(self):x}-{time.monotonic_ns()}"
        _BRIDGES[self.id] = self

    def events(self) -> Iterator:
        """The ``TestStreamPayload.Event`` stream."""
        raise NotImplementedError

    def mark_taken(self, element: Hashable) -> None:
        """The pipeline took ``element`` (``_pending[element]``: the batch n that emitted it): batches up to n
        are taken. Called with the lock (``self._cond``) held."""
        n = self._pending.pop(element, None)
        if n is not None and n > self._taken:
            self._taken = n
            self._cond.notify_all()

    def wait_taken(self, batch: int) -> None:
        """Wait until the pipeline took batch ``batch``, the stream stops, or ``ack_timeout`` passes."""
        with self._cond:
            self._cond.wait_for(lambda: self._taken >= batch or self.stop_event.is_set(), timeout=self.ack_timeout)

    # the TestStreamServiceController reader protocol
    def read_multiple(self, unused_tags):
        return self.events()

    def start(self) -> str:
        """Start the service (a local gRPC server); returns its endpoint."""
        from apache_beam.testing.test_stream_service import TestStreamServiceController

        if self._controller is None:
            self._controller = TestStreamServiceController(self)
            self._controller.start()
            self.endpoint = self._controller.endpoint
        return self.endpoint

    def close(self) -> None:
        """Stop the stream and the service."""
        self.stop_event.set()
        with self._cond:
            self._cond.notify_all()
        _BRIDGES.pop(self.id, None)
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


_LIBC: list = []


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim(0)``); False where there is no
    glibc. A stream's payloads (tens of MB a round, allocated and freed on the runner's threads, each thread
    with a heap arena of its own) leave freed memory in the arenas that glibc keeps: the process's resident
    size grows by tens of MiB a minute with no live object behind it. A bridge calls this every few seconds."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(lib.malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is None:
        return False
    _LIBC[0](0)
    return True


def bridge(bridge_id: str) -> StreamBridge | None:
    """The bridge ``bridge_id`` if it is in this process, else None."""
    return _BRIDGES.get(bridge_id)

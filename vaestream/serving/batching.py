"""Server-side batching for ``vaestream serve`` (TF Serving's ``--enable_batching``).

Concurrent requests to the same (model version, signature) are queued, merged into signature calls of at most
``max_execution_batch_size`` rows and the outputs split back to the requests, as TF Serving's
``BasicBatchScheduler``:

* ``max_batch_size`` bounds one request (a *task*): a larger one is refused (INVALID_ARGUMENT, "Task size N is
  larger than maximum input batch size M");
* without ``enable_large_batch_splitting`` a task joins the open batch of its queue if it fits
  (``max_batch_size`` rows), else it closes that batch and opens a new one, so a batch is at most
  ``max_batch_size`` rows;
* with ``enable_large_batch_splitting`` batches are at most ``max_execution_batch_size`` rows (default:
  ``max_batch_size``): a task that does not fit the open batch is split, its first piece filling the open
  batch and the rest going in pieces of ``max_execution_batch_size`` into new batches. The pieces run (maybe
  on different threads) and the request is answered whole, its rows in order;
* a batch runs when it is full, or when its first task has waited ``batch_timeout_micros`` (0: as soon
  as one of the ``num_batch_threads`` threads is free — under load requests pile up while the threads are
  busy, so the batches grow by themselves);
* a queue holds at most ``max_enqueued_batches`` batches; a request that would need more is answered
  UNAVAILABLE (gRPC) / 503 (REST) at once, so memory is bounded under overload;
* with ``allowed_batch_sizes`` a batch is padded up to the next allowed size (copies of its first row), as
  TF Serving's ``BatchingSession``; the padding rows' outputs are dropped.

A request waits either on its thread (:meth:`Batcher.submit`) or, from an asyncio event loop, on a future
(:meth:`Batcher.submit_async`: no thread per request; the batch thread wakes each loop once per batch).

Batching and splitting change no value: vaestream's signatures compute in fixed 64-row blocks
(:func:`vaestream.layers.blocked`), so a record's outputs are bit-identical in any batch or piece.

The parameters file is TF Serving's ``--batching_parameters_file``: a ``BatchingParameters`` text proto::

    max_batch_size { value: 1024 }
    enable_large_batch_splitting { value: true }
    max_execution_batch_size { value: 128 }
    batch_timeout_micros { value: 2000 }
    max_enqueued_batches { value: 64 }
    num_batch_threads { value: 2 }
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vaestream.errors import ModelError
from vaestream.serving.protocol import RequestError

_WRAPPED_INT = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads",
                "max_execution_batch_size")
_WRAPPED_BOOL = ("enable_large_batch_splitting",)
_IGNORED = ("thread_pool_name",)  # accepted as TF Serving does; vaestream has one pool per server
_UNSUPPORTED = ("pad_variable_length_inputs",)
_KNOWN = _WRAPPED_INT + _WRAPPED_BOOL + ("allowed_batch_sizes",) + _IGNORED


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's ``BatchingParameters`` (the fields vaestream implements), with TF Serving's defaults.

    ``max_batch_size`` bounds one request; ``max_execution_batch_size`` (None: ``max_batch_size``) bounds one
    signature call when ``enable_large_batch_splitting`` is on, and must then not exceed ``max_batch_size``;
    without splitting it must equal ``max_batch_size`` if given (TF Serving's rules).

    ``allowed_batch_sizes`` (increasing, the last entry the execution batch size, as TF Serving checks): a
    batch of ``b`` rows is padded to the smallest allowed size ``>= b`` with copies of its first row (as TF's
    batch kernels pad), and the padding rows' outputs are dropped, so the model sees only those shapes.
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int | None = None

    def __post_init__(self) -> None:
        for f in _WRAPPED_INT:
            v = getattr(self, f)
            if f == "max_execution_batch_size" and v is None:
                continue
            low = 0 if f == "batch_timeout_micros" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ModelError(f"batching parameters: {f} must be an integer >= {low}, got {v!r}")
        if not isinstance(self.enable_large_batch_splitting, bool):
            raise ModelError("batching parameters: enable_large_batch_splitting must be true or false, got "
                             f"{self.enable_large_batch_splitting!r}")
        m, e = self.max_batch_size, self.max_execution_batch_size
        if e is not None:
            if self.enable_large_batch_splitting and e > m:
                raise ModelError(f"batching parameters: max_execution_batch_size {e} must not exceed "
                                 f"max_batch_size {m}")
            if not self.enable_large_batch_splitting and e != m:
                raise ModelError(f"batching parameters: max_execution_batch_size {e} differs from max_batch_size "
                                 f"{m} but enable_large_batch_splitting is off (turn it on to split requests)")
        a = self.allowed_batch_sizes
        if a and (list(a) != sorted(set(a)) or a[-1] != self.execution_batch_size or a[0] < 1):
            which = "max_execution_batch_size" if self.enable_large_batch_splitting else "max_batch_size"
            raise ModelError(f"batching parameters: allowed_batch_sizes {list(a)} must increase and end with "
                             f"{which} {self.execution_batch_size}")

    @property
    def execution_batch_size(self) -> int:
        """The most rows one signature call gets: ``max_execution_batch_size`` with splitting (default
        ``max_batch_size``), else ``max_batch_size``."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size is not None:
            return self.max_execution_batch_size
        return self.max_batch_size

    @classmethod
    def parse(cls, text: str, source: str = "batching parameters") -> "BatchingParameters":
        """Parse the text proto of ``--batching_parameters_file``.

        Raises:
          ModelError: a syntax error, an unknown or unsupported field, a bad value.
        """
        body = re.sub(r"#[^\n]*", "", text)
        kw: dict[str, Any] = {}
        allowed: list[int] = []
        pos = 0
        token = re.compile(r"\s*(?:(\w+)\s*\{\s*value\s*:\s*(\"[^\"]*\"|[^\s}]+)\s*\}|(allowed_batch_sizes)\s*:\s*"
                           r"(\d+))\s*[;,]?")
        while pos < len(body):
            if not body[pos:].strip():
                break
            m = token.match(body, pos)
            if not m:
                raise ModelError(f"{source}: cannot parse {body[pos:].strip()[:60]!r} (TF Serving's "
                                 "BatchingParameters text format, e.g. 'max_batch_size { value: 128 }')")
            pos = m.end()
            if m.group(3):
                allowed.append(int(m.group(4)))
                continue
            name, value = m.group(1), m.group(2)
            if name in _IGNORED:
                continue
            if name in _UNSUPPORTED:
                raise ModelError(f"{source}: {name} is not supported by vaestream serve")
            if name in _WRAPPED_BOOL:
                flag = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}.get(value.lower())
                if flag is None:
                    raise ModelError(f"{source}: {name} {{ value: {value} }} is not true or false")
                kw[name] = flag
                continue
            if name not in _WRAPPED_INT:
                raise ModelError(f"{source}: unknown field {name!r} (known: {', '.join(_KNOWN)})")
            try:
                kw[name] = int(value)
            except ValueError:
                raise ModelError(f"{source}: {name} {{ value: {value} }} is not an integer") from None
        try:
            return cls(**kw, allowed_batch_sizes=tuple(allowed))
        except ModelError as e:
            raise ModelError(f"{source}: {str(e).removeprefix('batching parameters: ')}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "BatchingParameters":
        """Read ``--batching_parameters_file``. Raises ModelError (missing file, bad contents)."""
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"{p}: batching parameters file not found")
        return cls.parse(p.read_text(), str(p))


class _Task:
    """One request: its feeds, its rows, and the outputs of its pieces (piece start row -> outputs). It is
    answered either through ``done`` (a waiting thread) or ``future`` on ``loop`` (asyncio)."""

    __slots__ = ("feeds", "n", "done", "parts", "pending", "error", "loop", "future")

    def __init__(self, feeds: dict[str, np.ndarray], n: int, loop: asyncio.AbstractEventLoop | None = None):
        self.feeds, self.n = feeds, n
        self.loop = loop
        self.done = threading.Event() if loop is None else None
        self.future: asyncio.Future | None = loop.create_future() if loop is not None else None
        self.parts: dict[int, dict[str, np.ndarray]] = {}
        self.pending = 0  # pieces not yet run
        self.error: Exception | None = None

    def result(self) -> dict[str, np.ndarray]:
        """The outputs of the whole request, its pieces' in row order (raises the request's error)."""
        if self.error is not None:
            raise self.error
        if len(self.parts) == 1:
            return next(iter(self.parts.values()))
        starts = sorted(self.parts)
        return {k: np.concatenate([self.parts[s][k] for s in starts]) for k in self.parts[starts[0]]}


def _settle(tasks: list[_Task]) -> None:
    """On the tasks' event loop: hand each finished task's outputs (or error) to its future."""
    for t in tasks:
        if t.future.done():  # the request was cancelled (client gone, timeout)
            continue
        if t.error is not None:
            t.future.set_exception(t.error)
        else:
            t.future.set_result(t.result())


class _Piece:
    """Rows ``[start, start + n)`` of a task, as they go into one batch."""

    __slots__ = ("task", "start", "n")

    def __init__(self, task: _Task, start: int, n: int):
        self.task, self.start, self.n = task, start, n

    def feeds(self) -> dict[str, np.ndarray]:
        if self.start == 0 and self.n == self.task.n:
            return self.task.feeds
        return {k: v[self.start:self.start + self.n] for k, v in self.task.feeds.items()}


class _Batch:
    __slots__ = ("pieces", "size", "created", "closed", "args")

    def __init__(self, args: tuple):
        self.pieces: list[_Piece] = []
        self.size = 0
        self.created = time.monotonic()
        self.closed = False
        self.args = args  # (servable, signature)


def pad_rows(feeds: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad every ``[b, ...]`` feed to ``[size, ...]`` with copies of its first row (``size >= b``)."""
    out = {}
    for k, v in feeds.items():
        b = len(v)
        if b == size:
            out[k] = v
            continue
        p = np.empty((size,) + v.shape[1:], v.dtype)
        p[:b] = v
        p[b:] = v[:1]
        out[k] = p
    return out


class Batcher:
    """Queues of batches per key, run by ``num_batch_threads`` threads calling ``call(servable, signature,
    feeds)`` (feeds: input name -> ``[B, ...]``; returns output name -> ``[B, ...]``)."""

    def __init__(self, params: BatchingParameters, call: Callable[[Any, str, dict], dict[str, np.ndarray]]):
        self.params = params
        self._call = call
        self._cv = threading.Condition()
        self._queues: dict[Any, collections.deque[_Batch]] = {}
        self._closed = False
        self.batches_run = 0  # statistics: batches (signature calls), pieces and requests run
        self.pieces_run = 0
        self.tasks_run = 0
        self.sizes_run: collections.Counter[int] = collections.Counter()  # rows per signature call (padded)
        self._threads = [threading.Thread(target=self._worker, name=f"batch-{i}", daemon=True)
                         for i in range(params.num_batch_threads)]
        for t in self._threads:
            t.start()

    def submit(self, key: Any, servable: Any, signature: str, feeds: dict[str, np.ndarray],
               n: int) -> dict[str, np.ndarray]:
        """Queue one request of ``n`` rows (split into pieces when splitting is on and it does not fit the open
        batch) and wait for its outputs (output name -> ``[n, ...]``, rows in order).

        Raises:
          RequestError: INVALID_ARGUMENT (``n`` over ``max_batch_size``), UNAVAILABLE (the queue is full or the
            server is stopping), or the signature call's error.
        """
        task = _Task(feeds, n)
        self._enqueue(key, (servable, signature), task)
        task.done.wait()
        return task.result()

    def submit_async(self, key: Any, servable: Any, signature: str, feeds: dict[str, np.ndarray],
                     n: int) -> asyncio.Future:
        """:meth:`submit` from a running asyncio event loop: queues the request (raising at once as
        :meth:`submit` does when it cannot) and returns a future of its outputs, set on this loop."""
        task = _Task(feeds, n, asyncio.get_running_loop())
        self._enqueue(key, (servable, signature), task)
        return task.future

    def _enqueue(self, key: Any, args: tuple, task: _Task) -> None:
        """Place ``task``'s rows in the open batch of ``key``'s queue and new batches (pieces); wake a batch
        thread when a batch opens or closes (a task joining an open batch changes no thread's deadline)."""
        p, n = self.params, task.n
        if n > p.max_batch_size:
            raise RequestError(400, f"Task size {n} is larger than maximum input batch size {p.max_batch_size}")
        limit = p.execution_batch_size
        with self._cv:
            if self._closed:
                raise RequestError(503, "the server is shutting down", "UNAVAILABLE")
            q = self._queues.setdefault(key, collections.deque())
            open_ = q[-1] if q and not q[-1].closed else None
            if p.enable_large_batch_splitting:
                # TF Serving's capacity: the open batch's free rows plus max_enqueued_batches - (batches queued,
                # the open one counted even when empty) new batches
                queued = len(q) + (open_ is None)
                tail = open_.size if open_ is not None else 0
                capacity = (p.max_enqueued_batches - queued) * limit + (limit - tail)
                if n > capacity:
                    raise RequestError(503, f"The batch scheduling queue to which this task was submitted is full; "
                                            f"task size is {n} but scheduling capacity is only {capacity} "
                                            f"(num_enqueued_batches={queued}, max_enqueued_batches="
                                            f"{p.max_enqueued_batches}, open_batch_size={tail}, "
                                            f"max_execution_batch_size={limit})", "UNAVAILABLE")
                sizes, rest = [], n
                room = limit - tail
                if 0 < room < n:
                    sizes.append(room)
                    rest -= room
                while rest:
                    sizes.append(min(rest, limit))
                    rest -= sizes[-1]
            else:
                if (open_ is None or open_.size + n > limit) and len(q) >= p.max_enqueued_batches:
                    raise RequestError(503, "The batch scheduling queue to which this task was submitted is full",
                                       "UNAVAILABLE")
                sizes = [n]
            start, changed = 0, False
            for size in sizes:
                if open_ is None or open_.size + size > limit:
                    if open_ is not None:
                        open_.closed = True  # full for this piece: it may run now
                    open_ = _Batch(args)
                    q.append(open_)
                    changed = True
                open_.pieces.append(_Piece(task, start, size))
                open_.size += size
                start += size
                if open_.size >= limit:
                    open_.closed = changed = True
            task.pending = len(sizes)
            if changed:
                self._cv.notify()

    def _pick(self) -> tuple[_Batch | None, float | None]:
        """Under the lock: the oldest batch that may run now (popped), else the seconds until one may."""
        now, timeout = time.monotonic(), self.params.batch_timeout_micros / 1e6
        best: tuple[Any, _Batch] | None = None
        wait: float | None = None
        for key, q in self._queues.items():
            if not q:
                continue
            b = q[0]
            due = b.created + timeout
            if b.closed or now >= due or self._closed:
                if best is None or b.created < best[1].created:
                    best = (key, b)
            else:
                wait = due - now if wait is None else min(wait, due - now)
        if best is None:
            return None, wait
        self._queues[best[0]].popleft()
        best[1].closed = True
        return best[1], None

    def _worker(self) -> None:
        while True:
            with self._cv:
                while True:
                    batch, wait = self._pick()
                    if batch is not None:
                        break
                    if self._closed:
                        return
                    self._cv.wait(wait)
                if any(q for q in self._queues.values()):
                    self._cv.notify()  # more batches queued: another thread may take the next one
            self._run(batch)

    def _execute(self, batch: _Batch) -> list[dict[str, np.ndarray]]:
        """One signature call on the batch's rows (padded to an allowed size); each piece's outputs (views)."""
        servable, signature = batch.args
        pieces = batch.pieces
        if len(pieces) == 1:
            feeds = pieces[0].feeds()
        else:
            parts = [pc.feeds() for pc in pieces]
            feeds = {k: np.concatenate([f[k] for f in parts]) for k in parts[0]}
        size = batch.size
        allowed = self.params.allowed_batch_sizes
        if allowed:
            size = next(a for a in allowed if a >= batch.size)
            feeds = pad_rows(feeds, size)
        out = self._call(servable, signature, feeds)
        self.sizes_run[size] += 1
        if size != batch.size or len(pieces) > 1 or pieces[0].n != pieces[0].task.n:
            for k, v in out.items():
                if v.ndim == 0 or len(v) != size:
                    raise RequestError(500, f"output '{k}' of shape {list(v.shape)} has no batch dimension of "
                                            f"{size}: cannot split a merged batch", "INTERNAL")
        if len(pieces) == 1 and size == batch.size:
            return [out]
        outs, a = [], 0
        for pc in pieces:
            outs.append({k: v[a:a + pc.n] for k, v in out.items()})
            a += pc.n
        return outs

    def _run(self, batch: _Batch) -> None:
        pieces = batch.pieces
        outs: list[dict[str, np.ndarray]] = []
        error: Exception | None = None
        try:
            outs = self._execute(batch)
        except RequestError as e:
            error = e
        except Exception as e:  # a server bug: every request of the batch gets it, the thread lives on
            error = RequestError(500, f"Internal: {type(e).__name__}: {e}", "INTERNAL")
        finished: list[_Task] = []
        with self._cv:
            self.batches_run += 1
            self.pieces_run += len(pieces)
            for i, pc in enumerate(pieces):
                t = pc.task
                if error is not None:
                    t.error = t.error or error
                else:
                    t.parts[pc.start] = outs[i]
                t.pending -= 1
                if t.pending == 0:
                    self.tasks_run += 1
                    finished.append(t)
        by_loop: dict[Any, list[_Task]] = {}
        for t in finished:
            if t.loop is None:
                t.done.set()
            else:
                by_loop.setdefault(t.loop, []).append(t)
        for loop, tasks in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, tasks)
            except RuntimeError:  # the loop is closed: nobody waits for these answers any more
                pass

    def close(self, timeout: float = 30.0) -> None:
        """Run what is queued, refuse new requests, stop the threads."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)

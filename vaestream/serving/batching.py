"""Server-side batching for ``vaestream serve`` (TF Serving's ``--enable_batching``).

Concurrent requests to the same (model version, signature) are queued, merged into one signature call of
at most ``max_batch_size`` rows and the outputs split back to the requests, as TF Serving's
``BasicBatchScheduler``:

* a request joins the open batch of its queue if it fits (``max_batch_size`` rows), else it closes that
  batch and opens a new one; a request larger than ``max_batch_size`` is refused (INVALID_ARGUMENT);
* a batch runs when it is full, or when its first request has waited ``batch_timeout_micros`` (0: as soon
  as one of the ``num_batch_threads`` threads is free — under load requests pile up while the threads are
  busy, so the batches grow by themselves);
* a queue holds at most ``max_enqueued_batches`` batches; a request that would need one more is answered
  UNAVAILABLE (gRPC) / 503 (REST) at once, so memory is bounded under overload.

Batching changes no value: vaestream's signatures compute in fixed 64-row blocks
(:func:`vaestream.model.blocked`), so a record's outputs are bit-identical in any batch.

The parameters file is TF Serving's ``--batching_parameters_file``: a ``BatchingParameters`` text proto::

    max_batch_size { value: 128 }
    batch_timeout_micros { value: 2000 }
    max_enqueued_batches { value: 16 }
    num_batch_threads { value: 2 }
"""

from __future__ import annotations

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

_WRAPPED_INT = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
_IGNORED = ("thread_pool_name",)  # accepted as TF Serving does; vaestream has one pool per server
_UNSUPPORTED = ("enable_large_batch_splitting", "max_execution_batch_size", "pad_variable_length_inputs")


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's ``BatchingParameters`` (the fields vaestream implements), with TF Serving's defaults.

    ``allowed_batch_sizes`` is accepted (its last entry must equal ``max_batch_size``, as TF Serving checks)
    but batches are not padded to them: the signatures run in fixed 64-row blocks whatever the batch size.
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in _WRAPPED_INT:
            v = getattr(self, f)
            if not isinstance(v, int) or v < (0 if f == "batch_timeout_micros" else 1):
                raise ModelError(f"batching parameters: {f} must be an integer >= "
                                 f"{0 if f == 'batch_timeout_micros' else 1}, got {v!r}")
        a = self.allowed_batch_sizes
        if a and (list(a) != sorted(set(a)) or a[-1] != self.max_batch_size or a[0] < 1):
            raise ModelError(f"batching parameters: allowed_batch_sizes {list(a)} must increase and end with "
                             f"max_batch_size {self.max_batch_size}")

    @classmethod
    def parse(cls, text: str, source: str = "batching parameters") -> "BatchingParameters":
        """Parse the text proto of ``--batching_parameters_file``.

        Raises:
          ModelError: a syntax error, an unknown or unsupported field.
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
            if name not in _WRAPPED_INT:
                raise ModelError(f"{source}: unknown field {name!r} (known: {', '.join(_WRAPPED_INT)}, "
                                 "allowed_batch_sizes, thread_pool_name)")
            try:
                kw[name] = int(value)
            except ValueError:
                raise ModelError(f"{source}: {name} {{ value: {value} }} is not an integer") from None
        return cls(**kw, allowed_batch_sizes=tuple(allowed))

    @classmethod
    def from_file(cls, path: str | Path) -> "BatchingParameters":
        """Read ``--batching_parameters_file``. Raises ModelError (missing file, bad contents)."""
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"{p}: batching parameters file not found")
        return cls.parse(p.read_text(), str(p))


class _Task:
    __slots__ = ("feeds", "n", "done", "result", "error")

    def __init__(self, feeds: dict[str, np.ndarray], n: int):
        self.feeds, self.n = feeds, n
        self.done = threading.Event()
        self.result: dict[str, np.ndarray] | None = None
        self.error: Exception | None = None


class _Batch:
    __slots__ = ("tasks", "size", "created", "closed", "args")

    def __init__(self, args: tuple):
        self.tasks: list[_Task] = []
        self.size = 0
        self.created = time.monotonic()
        self.closed = False
        self.args = args  # (servable, signature)


class Batcher:
    """Queues of batches per key, run by ``num_batch_threads`` threads calling ``call(servable, signature,
    feeds)`` (feeds: input name -> ``[B, ...]``; returns output name -> ``[B, ...]``)."""

    def __init__(self, params: BatchingParameters, call: Callable[[Any, str, dict], dict[str, np.ndarray]]):
        self.params = params
        self._call = call
        self._cv = threading.Condition()
        self._queues: dict[Any, collections.deque[_Batch]] = {}
        self._closed = False
        self.batches_run = 0  # statistics: batches and requests run
        self.tasks_run = 0
        self._threads = [threading.Thread(target=self._worker, name=f"batch-{i}", daemon=True)
                         for i in range(params.num_batch_threads)]
        for t in self._threads:
            t.start()

    def submit(self, key: Any, servable: Any, signature: str, feeds: dict[str, np.ndarray],
               n: int) -> dict[str, np.ndarray]:
        """Queue one request of ``n`` rows and wait for its outputs (output name -> ``[n, ...]``).

        Raises:
          RequestError: INVALID_ARGUMENT (``n`` over ``max_batch_size``), UNAVAILABLE (the queue is full or the
            server is stopping), or the signature call's error.
        """
        from vaestream.serving.server import RequestError

        p = self.params
        if n > p.max_batch_size:
            raise RequestError(400, f"Task size {n} is larger than maximum input batch size {p.max_batch_size}")
        task = _Task(feeds, n)
        with self._cv:
            if self._closed:
                raise RequestError(503, "the server is shutting down", "UNAVAILABLE")
            q = self._queues.setdefault(key, collections.deque())
            open_ = q[-1] if q and not q[-1].closed else None
            if open_ is None or open_.size + n > p.max_batch_size:
                if open_ is not None:
                    open_.closed = True  # full for this request: it may run now
                    self._cv.notify()
                if len(q) >= p.max_enqueued_batches:
                    raise RequestError(503, "The batch scheduling queue to which this task was submitted is full",
                                       "UNAVAILABLE")
                open_ = _Batch((servable, signature))
                q.append(open_)
            open_.tasks.append(task)
            open_.size += n
            if open_.size >= p.max_batch_size:
                open_.closed = True
            self._cv.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        assert task.result is not None
        return task.result

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
            self._run(batch)

    def _run(self, batch: _Batch) -> None:
        from vaestream.serving.server import RequestError

        servable, signature = batch.args
        tasks = batch.tasks
        try:
            if len(tasks) == 1:
                outs = [self._call(servable, signature, tasks[0].feeds)]
            else:
                feeds = {k: np.concatenate([t.feeds[k] for t in tasks]) for k in tasks[0].feeds}
                out = self._call(servable, signature, feeds)
                for k, v in out.items():
                    if v.ndim == 0 or len(v) != batch.size:
                        raise RequestError(500, f"output '{k}' of shape {list(v.shape)} has no batch dimension of "
                                                f"{batch.size}: cannot split a merged batch", "INTERNAL")
                offsets = np.cumsum([0] + [t.n for t in tasks])
                outs = [{k: v[a:b] for k, v in out.items()} for a, b in zip(offsets[:-1], offsets[1:])]
            for t, o in zip(tasks, outs):
                t.result = o
        except RequestError as e:
            for t in tasks:
                t.error = e
        except Exception as e:  # a server bug: every request of the batch gets it, the thread lives on
            err = RequestError(500, f"Internal: {type(e).__name__}: {e}", "INTERNAL")
            for t in tasks:
                t.error = err
        finally:
            with self._cv:
                self.batches_run += 1
                self.tasks_run += len(tasks)
            for t in tasks:
                t.done.set()

    def close(self, timeout: float = 30.0) -> None:
        """Run what is queued, refuse new requests, stop the threads."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)

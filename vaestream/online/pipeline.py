"""How the online learner learns from one file, in parts, and from several files.

A file is *planned* on the host (read, validated, its hold-out records chosen, its minibatches drawn from the replay
buffer as it is: :meth:`Pipelined.plan`), *computed* by the compiled calls (the prequential score of the file fused
with the first K steps, then the rest: :meth:`Pipelined.compute`), *started* (its records enter the buffers:
:meth:`Pipelined.start`), then *finished* (drift, log: :meth:`Pipelined.finish`). A checkpoint is *captured* (the
variables' values, copies of the rings, the pending files) and *committed* (the TF checkpoint, the state file, the
ledger, each atomically, in that order; then the publisher's snapshot). The plan depends on the data only, never on
the model, and a capture's values can be written later, so the parts can be moved apart; :meth:`Pipelined.process_files`
runs them one file after the other (the same calls in the same order as :meth:`process_file` each).
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Callable, Iterable

import numpy as np

from vaestream.binio import atomic_write
from vaestream.errors import DataError
from vaestream.online.replay import ReplayBuffer

PAD_RECORDS = 256   # a file's records are padded to a multiple of this in the fused scoring call


@dataclasses.dataclass
class FilePlan:
    """A file's host work done: what its compiled calls take and what it adds to the buffers.

    Attributes:
      source: the file (or the records' name).
      stored: its records in the buffer's dtype ``[n, D]``.
      holdout: which records are held out ``[n]``.
      steps: the training steps it takes.
      padded: ``stored`` padded to a multiple of :data:`PAD_RECORDS` (the scoring call's input).
      chunks: ``(chunk [K, M, D], steps of it to take)`` per compiled call, the last chunk padded to K.
      seconds: the host seconds planning took.
      step_end: the trainer's step after the file (set when its calls are started).
    """

    source: str
    stored: np.ndarray
    holdout: np.ndarray
    steps: int
    padded: np.ndarray
    chunks: list
    seconds: float
    step_end: int = 0


def file_id(path: str) -> dict:
    """A file's ledger identity: absolute path, size and modification time."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime}


class Pipelined:
    """Planning, computing and landing a file, and :meth:`process_files`, mixed into
    :class:`vaestream.online.learner.OnlineLearner` (it uses the learner's model, trainer, buffers, ledger and
    configuration)."""

    def plan(self, records: np.ndarray, source: str, scale: float | None = None,
             files_done: int | None = None) -> FilePlan:
        """Validate ``records`` and draw the file's minibatches (:meth:`minibatches`, seeded by ``files_done``,
        default: the files in the ledger and pending); nothing of the learner changes (but the model is built on
        the first file). Bad records raise :class:`DataError` naming ``source``."""
        from vaestream.data import validate

        t0 = time.perf_counter()
        records = np.asarray(records)
        if records.ndim < 2:
            raise DataError(f"{source}: expected records [n, ...], got shape {records.shape}")
        scale = validate(records, self._likelihood(), source, scale)
        self._ensure_model(records, scale)
        stored = self._stored(records, scale)
        n = len(stored)
        if files_done is None:
            files_done = len(self.ledger["files"]) + len(self.pending)
        hmask = self._holdout_of(source, n)
        train = stored[~hmask]
        k, m = self.cfg.steps_per_call, self.cfg.batch_size
        batch = self.minibatches(train, files_done) if len(train) else np.zeros((0, m, stored.shape[1]), stored.dtype)
        steps = len(batch)
        padded = np.zeros((-(-n // PAD_RECORDS) * PAD_RECORDS, stored.shape[1]), stored.dtype)
        padded[:n] = stored
        chunks = []
        for s in range(0, max(steps, 1), k):
            chunk = batch[s:s + k]
            if len(chunk) < k:
                chunk = np.concatenate([chunk, np.zeros((k - len(chunk),) + batch.shape[1:], batch.dtype)])
            chunks.append((chunk, max(0, min(k, steps - s))))
        return FilePlan(source, stored, hmask, steps, padded, chunks, time.perf_counter() - t0)

    def compute(self, plan: FilePlan) -> tuple[float, float | None, float]:
        """Score the planned file (test) and train on its minibatches (then): one compiled call for the score and
        the first K steps, the trainer's compiled chunk for the rest (any thread; one at a time). Returns (the
        file's ELBO sum, the mean training ELBO or None, seconds)."""
        import tensorflow as tf

        t0 = time.perf_counter()
        n = len(plan.stored)
        total, pre_sum = 0.0, 0.0
        for i, (chunk, done) in enumerate(plan.chunks):
            if i == 0:
                score, obj = self._fused(tf.constant(plan.padded), tf.constant(n, tf.int32), tf.constant(chunk),
                                         tf.constant(self._scale, tf.float32), tf.constant(done, tf.int32))
                pre_sum, obj = float(score), float(obj)
            else:
                obj = self.trainer.run_steps(chunk, self._scale, steps=done)
            total += obj * done
        return pre_sum, (total / plan.steps if plan.steps else None), time.perf_counter() - t0

    def start(self, plan: FilePlan) -> None:
        """The planned file's records enter the replay buffer and hold-out set (after its minibatches were drawn),
        and the host's step count moves on by its steps."""
        self.buffer.add(plan.stored[~plan.holdout])
        if plan.holdout.any():
            self.holdout.add(plan.stored[plan.holdout])
        plan.step_end = self._step = self._step + plan.steps

    # -- checkpoints in two parts -----------------------------------------------------------------------------
    def capture_checkpoint(self) -> dict:
        """What a checkpoint holds, taken now, between two files' compiled calls: the variables' values (or the
        first, full TF checkpoint itself), copies of the buffer and hold-out rings, the pending files, the drift
        state and the weights a publication needs. :meth:`commit_checkpoint` writes it."""
        values = self._ckpt.values()
        cap = {"t0": time.perf_counter(), "step": self._step, "values": values,
               "path": None if values is not None else self._ckpt.write(self._step, None),
               "buffer": _copy(self.buffer), "holdout": _copy(self.holdout), "pending": list(self.pending),
               "drift": self.drift.state(), "weights": None}
        if self.publisher is not None and self.cfg.publish:
            cap["weights"] = [w.numpy() for w in self.model.weights()]
        return cap

    def commit_checkpoint(self, cap: dict) -> dict:
        """Write a captured checkpoint (the TF checkpoint, then ``state-STEP.npz``, then the ledger naming both,
        each atomically; learning may go on meanwhile), then hand its snapshot to the publisher. Returns the
        ledger."""
        step = cap["step"]
        ck = cap["path"] or self._ckpt.write(step, cap["values"])
        state = f"state-{step}.npz"
        b, h = cap["buffer"], cap["holdout"]
        buf = io.BytesIO()
        # the rings as they lie (slots and write position), so sampling after a resume is the same
        np.savez(buf, buffer=b.data[:b.size], buffer_next=b.next, buffer_capacity=b.capacity,
                 holdout=h.data[:h.size], holdout_next=h.next, holdout_capacity=h.capacity, scale=self._scale)
        atomic_write(self.work / state, buf.getvalue())
        old_state = self._commit_ledger(cap["pending"], step, os.path.basename(ck), state, cap["drift"])
        if old_state and old_state != state and (self.work / old_state).exists():
            (self.work / old_state).unlink()
        self._last_ckpt_time = time.monotonic()
        self._write_log({"event": "checkpoint", "step": step, "seconds": round(time.perf_counter() - cap["t0"], 4)})
        if cap["weights"] is not None:
            cal = b.contents()
            if len(cal) > self.cfg.calibration_records:
                cal = cal[np.linspace(0, len(cal) - 1, self.cfg.calibration_records).astype(np.int64)]
            held = h.contents()
            self.publisher.submit(self.publisher.snapshot(
                self.model, self._inputs(held) if len(held) else None, self._inputs(cal), step,
                len(self.ledger["files"]), self.ledger["records_trained"], weights=cap["weights"]))
        return self.ledger

    # -- several files --------------------------------------------------------------------------------------------
    def process_files(self, paths: Iterable[str | os.PathLike], on_file: Callable[[dict], None] | None = None,
                      max_files: int | None = None, stop: Callable[[], bool] | None = None) -> list[dict]:
        """Learn from ``paths`` in order, as :meth:`process_file` each (files in the ledger skipped, bad ones
        rejected); stops starting files after ``max_files`` records (learnt or rejected) or when ``stop()`` is
        true. ``on_file`` gets each record. Returns the records."""
        out: list[dict] = []
        for path in paths:
            if (max_files is not None and len(out) >= max_files) or (stop is not None and stop()):
                break
            rec = self.process_file(path)
            if rec is not None:
                out.append(rec)
                if on_file:
                    on_file(rec)
        return out


def _copy(ring: ReplayBuffer) -> ReplayBuffer:
    return ReplayBuffer.restore(ring.data[:ring.size].copy(), ring.capacity, ring.next)

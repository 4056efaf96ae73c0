"""Where the online learner's records come from: a file pattern, polled (:meth:`Following.follow`), or a broker
stream read by a consumer group (:meth:`Following.follow_source`).

Both feed :class:`vaestream.online.learner.OnlineLearner` entries of its ledger (a file, or one read's valid
messages of one dtype and shape), stop on their limits or SIGINT/SIGTERM, checkpoint once at the end and wait
for the publications queued. A broker message is acknowledged only once the checkpoint holding its effect is in
the ledger.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

import numpy as np

from vaestream.binio import new_files
from vaestream.data import validate
from vaestream.errors import DataError


class Following:
    """The ways of following a source, mixed into :class:`vaestream.online.learner.OnlineLearner`: they use
    the learner's ledger (``ledger``, ``pending``, ``processed``), its entries (``process_file``,
    ``_learn_entry``, ``_reject``, ``process_files``), ``checkpoint`` and ``wait``."""

    # -- following a broker stream -----------------------------------------------------------------------------
    def committed_ids(self) -> set[str]:
        """The broker message IDs whose effect is in the ledger's checkpoint, or that were rejected."""
        return {i for f in self.ledger["files"] + self.ledger["rejected"] for i in f.get("ids", ())}

    def follow_source(self, url: str, group: str = "follow", max_messages: int | None = None,
                      idle_timeout: float | None = None, stop: threading.Event | None = None,
                      on_file: Callable[[dict], None] | None = None, batch_messages: int = 100,
                      block: float = 1.0, max_deliver: int = 5) -> dict:
        """Learn from a broker stream (``redis://HOST:PORT/STREAM``, :mod:`vaestream.broker`) as the consumer
        group ``group``, until ``max_messages`` messages were read in this call, none came for ``idle_timeout``
        seconds, ``stop`` is set, or SIGINT/SIGTERM.

        Each read (up to ``batch_messages`` messages) is one entry of the ledger, as a file is: its valid
        messages' records are tested, then trained on; the entry names its message IDs. A message is
        acknowledged only once the checkpoint holding its effect is in the ledger, and the ledger's IDs are
        skipped when delivered again, so after a kill every message counts once. A malformed message (or one
        whose records fail validation, or one delivered more than ``max_deliver`` times) is rejected on its own,
        with the reason in the ledger and ``dead_letter.jsonl``, and acknowledged."""
        from vaestream.broker import BrokerReader
        from vaestream.training import StopFlag

        reader = BrokerReader(url, group, committed=self.committed_ids(), block=block,
                              max_deliver=max_deliver).setup()
        unacked: list[str] = []   # learnt, not yet in the ledger's checkpoint
        done = messages = 0
        t0 = last_new = time.monotonic()
        try:
            with StopFlag() as sig:
                while not (sig.set or (stop is not None and stop.is_set())):
                    want = batch_messages if max_messages is None else min(batch_messages, max_messages - messages)
                    if want <= 0:
                        break
                    msgs = reader.read(want)
                    for m, reason in reader.take_poisoned():
                        self._reject_messages(reader, [m.id], m.ref, DataError(reason), on_file)
                    if not msgs:
                        if idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
                            break
                        continue
                    last_new = time.monotonic()
                    messages += len(msgs)
                    done += self._learn_messages(reader, msgs, unacked, on_file)
            if self.pending:
                self.checkpoint()
            if unacked:
                reader.ack(unacked)
            self.wait()
        finally:
            reader.close()
        return {**self._follow_summary(done, t0, messages=messages), "broker": dict(reader.counts)}

    def _reject_messages(self, reader, msg_ids: list[str], ref: str, e: Exception, on_file) -> None:
        rec = self._reject({"path": ref, "size": None, "mtime": None, "ids": msg_ids}, e)
        reader.ack(msg_ids)   # the rejection is in the committed ledger already
        if on_file:
            on_file(rec)

    def _learn_messages(self, reader, msgs: list, unacked: list[str], on_file) -> int:
        """One read: each message decoded and validated (a bad one rejected on its own), the valid ones grouped
        by dtype and record shape, each group one entry of the ledger. IDs learnt go to ``unacked`` and are
        acknowledged once a checkpoint has put them in the ledger. Returns the entries learnt."""
        from vaestream.broker import WireError, decode

        likelihood = self._likelihood()
        groups: dict[tuple, list] = {}
        for m in msgs:
            try:
                x = decode(m)
                validate(x, likelihood, m.ref)
            except (WireError, DataError) as e:
                self._reject_messages(reader, [m.id], m.ref, e, on_file)
                continue
            groups.setdefault((x.dtype.str, x.shape[1:]), []).append((m, x))
        done = 0
        for members in groups.values():
            ids = [m.id for m, _ in members]
            ref = f"{members[0][0].ref}..{ids[-1]}" if len(ids) > 1 else members[0][0].ref
            records = np.concatenate([x for _, x in members])
            rec = self._learn_entry(records, {"path": ref, "size": int(records.nbytes), "mtime": None, "ids": ids})
            if "rejected" in rec:
                reader.ack(ids)
            else:
                unacked += ids
                done += 1
            if on_file:
                on_file(rec)
            if not self.pending and unacked:   # a checkpoint put them in the ledger
                reader.ack(unacked)
                unacked.clear()
        return done

    # -- following a pattern ----------------------------------------------------------------------------------
    def new_files(self, pattern: str | Iterable[str]) -> list[str]:
        """Files matching ``pattern`` (a glob, or several) not yet processed, oldest (mtime) first; files
        still being written are skipped (:func:`vaestream.binio.is_settled`)."""
        return new_files([pattern] if isinstance(pattern, str) else list(pattern), self.processed)

    def follow(self, pattern: str | Iterable[str], poll_interval: float = 1.0, max_files: int | None = None,
               idle_timeout: float | None = None, stop: threading.Event | None = None,
               on_file: Callable[[dict], None] | None = None) -> dict:
        """Poll ``pattern`` and learn from each new file once, until ``max_files`` files were processed in
        this call, nothing new arrived for ``idle_timeout`` seconds, ``stop`` is set, or SIGINT/SIGTERM.
        Checkpoints on the schedule and once at the end. Returns a summary."""
        from vaestream.training import StopFlag

        done, t0, last_new = 0, time.monotonic(), time.monotonic()
        with StopFlag() as sig:
            while not (sig.set or (stop is not None and stop.is_set())):
                files = self.new_files(pattern)
                if files:
                    last_new = time.monotonic()
                done += len(self.process_files(files, on_file, None if max_files is None else max_files - done,
                                               lambda: sig.set or (stop is not None and stop.is_set())))
                if max_files is not None and done >= max_files:
                    break
                if idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
                    break
                if not files:
                    if stop is not None:
                        stop.wait(poll_interval)
                    else:
                        time.sleep(poll_interval)
        if self.pending:
            self.checkpoint()
        self.wait()
        return self._follow_summary(done, t0)

    def _follow_summary(self, done: int, t0: float, **counts) -> dict:
        return {"files": done, **counts, "seconds": round(time.monotonic() - t0, 3),
                "step": int(self.trainer.step.numpy()) if self.trainer is not None else 0,
                "records_trained": self.ledger["records_trained"], "published": self.ledger.get("published")}

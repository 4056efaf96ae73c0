"""A consumer of a Redis stream with explicit acknowledgement (:class:`BrokerReader`) and an acknowledger for
the stage that commits output (:class:`Acker`).

    reader = BrokerReader("redis://127.0.0.1:6379/mnist", group="stream-encode", committed=ledger.committed_ids())
    for msg in reader.read(count=100):
        ...                                  # write the output, commit it (vaestream.broker.ledger)
    reader.ack([msg.id for msg in done])     # or Acker(url, group).ack(ids) in the stage that committed

**Delivery.** The reader is one consumer (``consumer``, default ``worker-0``, a fixed name so that a restarted
job is the same consumer) of a consumer group (created at the stream's start, ``start_id`` ``0``, if it does
not exist). It first reads its own pending entries, those delivered to it before a crash and never
acknowledged (``XREADGROUP`` from ID 0); then, every ``ack_wait / 2`` seconds, it reclaims entries other
consumers of the group have held unacknowledged for ``ack_wait`` seconds (``XAUTOCLAIM``); otherwise it
reads new entries (``XREADGROUP >``), blocking up to ``block`` seconds. ``ack_wait`` must exceed the time
from delivery to acknowledgement (window + allowed lateness + a round), or live entries are reclaimed.

**Filtering.** An entry whose ID is in ``committed`` (the ledger's) is acknowledged and skipped; one already
delivered in this run and not yet acknowledged is skipped; one delivered more than ``max_deliver`` times
(Redis counts every delivery, reads of the pending list and claims included) is *poisoned*: it is not
returned but listed in :attr:`BrokerReader.poisoned` with the reason, for the caller to dead-letter and
acknowledge (a message that keeps crashing the job stops doing so). An entry deleted from the stream while
pending is acknowledged and counted.

**Trimming** (``trim``, on by default; ``trim=0`` in the URL turns it off). Every ``trim_interval`` seconds
a read, and :meth:`BrokerReader.close`, remove the entries no consumer group of the stream still needs
(``XTRIM key MINID ~ FLOOR``, :meth:`BrokerReader.trim`): FLOOR is the minimum over **all** the stream's
groups, not only this one, of the group's oldest pending entry, or, when it has none pending, the entry after
its last delivered one. So an entry stays until every group has read and acknowledged it: another group
(``follow`` beside ``stream-encode``) keeps what it has not read, and a group that has not read at all keeps
the whole stream. A group created later starts from what is left: create the groups that need the history
before the first consumer runs (``XGROUP CREATE STREAM GROUP 0 MKSTREAM``), or read with ``trim=0``.

**Failures.** A lost connection (the broker restarting) is retried with back-off for ``reconnect_timeout``
seconds; then :class:`vaestream.broker.wire.BrokerError` names the URL and the cause.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, TypeVar

from vaestream.broker.wire import BrokerError, BrokerURL, Message, id_key

TRIM_INTERVAL = 1.0
from vaestream.errors import ConfigError

T = TypeVar("T")


def _retrying(url: BrokerURL, what: str, fn: Callable[[], T], timeout: float, on_retry=None) -> T:
    """``fn()``, retried with back-off while the connection fails, for up to ``timeout`` seconds."""
    import redis

    t0 = time.monotonic()
    delay = 0.05
    while True:
        try:
            return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
                OSError) as e:
            if time.monotonic() - t0 > timeout:
                raise BrokerError(f"{url.address}: {what}: broker unreachable for {timeout:g} s ({e})") from e
            if on_retry is not None:
                on_retry(e)
            time.sleep(delay)
            delay = min(1.0, delay * 2)
        except redis.exceptions.ResponseError as e:
            raise BrokerError(f"{url.address}: {what}: {e}") from e


class Acker:
    """Acknowledges IDs to a consumer group (``XACK``) from whatever process commits the output; its own
    client, opened on first use. Picklable (a DoFn's attribute)."""

    def __init__(self, url: str, group: str, reconnect_timeout: float = 30.0):
        self.url = url
        self.u = BrokerURL.parse(url)
        self.group = self.u.group or group
        self.reconnect_timeout = float(self.u.reconnect_timeout or reconnect_timeout)
        self._client = None

    def __getstate__(self):
        return dict(self.__dict__, _client=None)

    def ack(self, ids: Iterable[str]) -> int:
        """Acknowledge ``ids``; returns how many were pending."""
        ids = list(ids)
        if not ids:
            return 0
        if self._client is None:
            self._client = self.u.client()
        return int(_retrying(self.u, "XACK", lambda: self._client.xack(self.u.stream, self.group, *ids),
                             self.reconnect_timeout))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class BrokerReader:
    """A consumer of the stream ``url`` names (see the module docstring).

    Args:
      url: ``redis://HOST:PORT/STREAM[?group=..&consumer=..&max_deliver=..&ack_wait=..&reconnect_timeout=..]``
        (the query wins).
      group: the consumer group (default ``vaestream``).
      consumer: this consumer's name.
      committed: IDs already committed (the ledger's): acknowledged and skipped when delivered.
      start_id: where a new group starts (``0``: the stream's first entry; ``$``: only new entries).
      max_deliver: deliveries after which an entry is poisoned.
      ack_wait: seconds an entry may stay unacknowledged with another consumer before it is reclaimed.
      block: the longest wait for new entries in one :meth:`read` (seconds).
      reconnect_timeout: how long a lost connection is retried.
      trim: trim what every group has acknowledged (the URL's ``trim`` wins; see the module docstring).
      trim_interval: seconds between two trims by :meth:`read`.
    """

    def __init__(self, url: str, group: str = "vaestream", consumer: str = "worker-0",
                 committed: Iterable[str] = (), start_id: str = "0", max_deliver: int = 5, ack_wait: float = 60.0,
                 block: float = 0.5, reconnect_timeout: float = 30.0, trim: bool = True,
                 trim_interval: float = TRIM_INTERVAL):
        self.url = url
        self.u = BrokerURL.parse(url)
        self.group = self.u.group or group
        self.consumer = self.u.consumer or consumer
        self.max_deliver = int(self.u.max_deliver or max_deliver)
        self.ack_wait = float(self.u.ack_wait or ack_wait)
        if self.max_deliver < 1 or not self.ack_wait > 0:
            raise ConfigError(f"{url}: need max_deliver >= 1 and ack_wait > 0")
        self.start_id, self.block = start_id, float(block)
        self.reconnect_timeout = float(self.u.reconnect_timeout or reconnect_timeout)
        self.skip: set[str] = set(committed)
        self.in_flight: set[str] = set()
        self.poisoned: list[tuple[Message, str]] = []
        self.trim_enabled = bool(trim if self.u.trim is None else self.u.trim)
        self.trim_interval = float(trim_interval)
        self._last_trim = time.monotonic()
        self.counts = {"delivered": 0, "redelivered": 0, "skipped_committed": 0, "poisoned": 0, "deleted": 0,
                       "acked": 0, "reconnects": 0, "trimmed": 0}
        self._history = "0"          # reading our own pending entries until this is None
        self._last_claim = time.monotonic()
        self._client = None
        self._ready = False
        self.last_read = "new"       # what the latest read returned: "history", "claimed" or "new" entries

    # -- plumbing -------------------------------------------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        def note(e):
            self.counts["reconnects"] += 1

        return _retrying(self.u, what, fn, self.reconnect_timeout, note)

    def _c(self):
        if self._client is None:
            self._client = self.u.client(timeout=max(5.0, self.block + 5.0))
        return self._client

    def setup(self) -> "BrokerReader":
        """Connect and create the consumer group if it does not exist."""
        import redis

        def create():
            try:
                self._c().xgroup_create(self.u.stream, self.group, self.start_id, mkstream=True)
            except redis.exceptions.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

        self._retry("XGROUP CREATE", create)
        self._ready = True
        if self.skip:   # committed before a crash, perhaps not acknowledged
            self.ack(sorted(self.skip, key=id_key))
        return self

    def server_time(self) -> float:
        """The broker's clock (``TIME``), seconds since the epoch."""
        s, us = self._retry("TIME", lambda: self._c().time())
        return s + us / 1e6

    def backlog(self) -> dict:
        """The group's pending count and, where Redis knows it, its lag (entries not yet delivered)."""
        info = self._retry("XINFO GROUPS", lambda: self._c().xinfo_groups(self.u.stream))
        for g in info:
            if g["name"].decode() == self.group:
                return {"pending": int(g["pending"]), "lag": g.get("lag")}
        return {"pending": 0, "lag": None}

    # -- trimming -------------------------------------------------------------------------------------------
    def trim_floor(self) -> str | None:
        """The lowest entry ID any consumer group of the stream may still need: the minimum over all groups of
        the oldest pending ID, or the ID after the last delivered one when none is pending (None: no group, or
        no stream). Pending entries and last-delivered IDs only move forward, so a floor read group by group
        is never above the true one."""
        import redis

        def floor():
            c = self._c()
            try:
                groups = c.xinfo_groups(self.u.stream)
            except redis.exceptions.ResponseError as e:
                if "no such key" in str(e).lower():
                    return None
                raise
            lo = None
            for g in groups:
                if int(g["pending"]):
                    first = c.xpending(self.u.stream, g["name"])["min"]
                    if first is None:    # acknowledged meanwhile: the last delivered bounds it
                        continue
                    k = id_key(first.decode() if isinstance(first, bytes) else first)
                else:
                    last = g["last-delivered-id"]
                    ms, seq = id_key(last.decode() if isinstance(last, bytes) else last)
                    k = (ms, seq + 1)
                lo = k if lo is None else min(lo, k)
            return None if lo is None else f"{lo[0]}-{lo[1]}"

        return self._retry("XINFO GROUPS", floor)

    def trim(self) -> int:
        """Remove the entries every group of the stream has acknowledged (``XTRIM MINID ~``, whole nodes of the
        stream at once; see the module docstring); returns how many. Nothing when trimming is off."""
        if not self.trim_enabled:
            return 0
        self._last_trim = time.monotonic()
        lo = self.trim_floor()
        if lo is None or lo == "0-1":
            return 0
        n = int(self._retry("XTRIM", lambda: self._c().xtrim(self.u.stream, minid=lo, approximate=True, limit=0)))
        self.counts["trimmed"] += n
        return n

    # -- reading --------------------------------------------------------------------------------------------
    def read(self, count: int = 100, block: float | None = None) -> list[Message]:
        """Up to ``count`` messages to process (own pending entries first, then reclaimed, then new)."""
        if not self._ready:
            self.setup()
        if self.trim_enabled and time.monotonic() - self._last_trim >= self.trim_interval:
            self.trim()
        stream = self.u.stream
        raw: list[tuple] = []
        history = False
        if self._history is not None:
            res = self._retry("XREADGROUP", lambda: self._c().xreadgroup(
                self.group, self.consumer, {stream: self._history}, count=count))
            raw = res[0][1] if res else []
            if raw:
                self._history = raw[-1][0].decode()
                history = True
                self.last_read = "history"
            else:
                self._history = None
        if not raw and time.monotonic() - self._last_claim >= self.ack_wait / 2:
            self._last_claim = time.monotonic()
            self._prune()
            res = self._retry("XAUTOCLAIM", lambda: self._c().xautoclaim(
                stream, self.group, self.consumer, int(self.ack_wait * 1000), "0-0", count=count))
            raw = [e for e in res[1] if e[0].decode() not in self.in_flight]
            history = True
            self.last_read = "claimed"
            for d in (res[2] if len(res) > 2 else []):
                self.counts["deleted"] += 1
                self.ack([d.decode() if isinstance(d, bytes) else d])
        if not raw and self._history is None:
            ms = int(1000 * (self.block if block is None else block))
            res = self._retry("XREADGROUP", lambda: self._c().xreadgroup(
                self.group, self.consumer, {stream: ">"}, count=count, block=ms if ms > 0 else None))
            raw = res[0][1] if res else []
            self.last_read = "new"
        return self._filter(raw, history)

    def _prune(self) -> None:
        """Forget in-flight IDs no longer pending with this consumer (acknowledged by the committing stage)."""
        if not self.in_flight:
            return
        rows = self._retry("XPENDING", lambda: self._c().xpending_range(
            self.u.stream, self.group, "-", "+", len(self.in_flight) + 1, consumername=self.consumer))
        self.in_flight &= {r["message_id"].decode() for r in rows}

    def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        lo, hi = min(ids, key=id_key), max(ids, key=id_key)
        rows = self._retry("XPENDING", lambda: self._c().xpending_range(
            self.u.stream, self.group, lo, hi, len(ids) + 16, consumername=self.consumer))
        return {r["message_id"].decode(): int(r["times_delivered"]) for r in rows}

    def _filter(self, raw: list[tuple], history: bool) -> list[Message]:
        out, drop = [], []
        ids = [e[0].decode() for e in raw]
        counts = self._delivery_counts(ids) if history and ids else {}
        for (eid, fields), i in zip(raw, ids):
            if i in self.skip:
                self.counts["skipped_committed"] += 1
                drop.append(i)
                continue
            if fields is None:                         # deleted from the stream while pending
                self.counts["deleted"] += 1
                drop.append(i)
                continue
            if i in self.in_flight:
                continue
            n = counts.get(i, 1)
            msg = Message(i, dict(fields), n, self.u.stream)
            if n > 1:
                self.counts["redelivered"] += 1
            if n > self.max_deliver:
                self.counts["poisoned"] += 1
                self.poisoned.append((msg, f"{msg.ref}: delivered {n} times (max_deliver {self.max_deliver}) "
                                           f"without its output being committed; dead-lettered"))
                self.in_flight.add(i)
                continue
            self.in_flight.add(i)
            self.counts["delivered"] += 1
            out.append(msg)
        if drop:
            self.ack(drop)
        return out

    def take_poisoned(self) -> list[tuple[Message, str]]:
        """The poisoned messages found since the last call (to dead-letter, then :meth:`ack`)."""
        out, self.poisoned = self.poisoned, []
        return out

    def ack(self, ids: Iterable[str]) -> int:
        """Acknowledge ``ids`` (and forget them as in flight); returns how many were pending."""
        ids = list(ids)
        if not ids:
            return 0
        n = int(self._retry("XACK", lambda: self._c().xack(self.u.stream, self.group, *ids)))
        self.in_flight.difference_update(ids)
        self.counts["acked"] += n
        return n

    def close(self) -> None:
        """Trim what every group has acknowledged (one try: a broker gone is not waited for), then close the
        connection."""
        if self._client is not None:
            if self._ready and self.trim_enabled:
                timeout, self.reconnect_timeout = self.reconnect_timeout, 0.0
                try:
                    self.trim()
                except BrokerError:
                    pass
                finally:
                    self.reconnect_timeout = timeout
            self._client.close()
            self._client = None

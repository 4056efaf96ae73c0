"""The wire format of records on a Redis stream, broker URLs, and :func:`publish`.

**Why Redis Streams.** Debian's ``redis-server`` 7.0 gives what an effectively-once source needs, durable
(``appendonly yes``) streams with consumer groups, explicit acknowledgement (``XACK``), a pending-entries list
with per-entry delivery counts (``XPENDING``), and reclaiming of entries a dead consumer held
(``XAUTOCLAIM``), behind a synchronous client (``redis``) that is simple to use inside Beam DoFns and
threads. NATS JetStream offers the same (``max_deliver``, ``ack_wait``), but its Python client is asyncio
only, which a DoFn or the learner's loop would have to wrap in an event loop of its own.

**URL.** ``redis://HOST:PORT/STREAM[?group=G&consumer=C&max_deliver=N&ack_wait=S&reconnect_timeout=S&trim=0]``:
the path is the stream's key (not a database number); the query sets the consumer group (default: the job's
name), the consumer's name, how often an entry may be delivered before it is dead-lettered, the seconds after
which an entry another consumer holds unacknowledged is reclaimed, how long a lost connection is retried, and
whether the consumer trims the entries every group has acknowledged (``trim=1``, the default;
:meth:`vaestream.broker.BrokerReader.trim`) or leaves the stream whole (``trim=0``).

**A message** is one stream entry (``XADD``) whose fields are

=============  =========================================================================================
``vaestream``  the format version, ``1``
``format``     ``raw`` or ``npy``
``data``       ``raw``: the records' bytes, C order; ``npy``: a ``.npy`` file's bytes (``np.save``)
``dtype``      ``raw`` only: the NumPy dtype string (``|u1``, ``<f4``, ...)
``shape``      ``raw`` only: the array's shape, comma-separated (``100,28,28``)
``batch``      ``1`` (default): the array's first axis is the records; ``0``: the array is one record
``records``    optional: the number of records, checked against the array
``event_time`` optional: the records' event time, seconds since the epoch (decimal), set by the producer
``source``     optional: what the records came from (a file name), for the dead letters
=============  =========================================================================================

Without ``event_time`` the entry's ID is the event time: Redis IDs are ``MS-SEQ``, MS the server's clock in
milliseconds when it appended the entry. So "late" data is a message whose producer event time is behind
the consumer's watermark (which follows the IDs it has read). A record's key is ``ENTRY_ID:INDEX`` (the
index within the message, 9 digits: :func:`vaestream.beam.elements.record_key`'s form); its source is
``STREAM/ENTRY_ID``. A message that cannot be decoded (missing fields, a bad dtype or shape, a payload of
the wrong size, a corrupt ``.npy``) is malformed: :func:`decode` raises :class:`WireError`, and the
consumers dead-letter it with that reason and acknowledge it.
"""

from __future__ import annotations

import dataclasses
import io
import time
import urllib.parse
from typing import Iterator

import numpy as np

from vaestream.errors import ConfigError, DataError

VERSION = b"1"
FORMATS = ("raw", "npy")
KEY_DIGITS = 9


class WireError(DataError):
    """A stream entry is not a well-formed vaestream message (the message names the entry and the problem)."""


class BrokerError(DataError):
    """The broker cannot be reached, or refused a command (the message names the URL and the cause)."""


@dataclasses.dataclass(frozen=True)
class BrokerURL:
    """A parsed ``redis://HOST:PORT/STREAM?...`` (see the module docstring)."""

    host: str
    port: int
    stream: str
    group: str | None = None
    consumer: str | None = None
    max_deliver: int | None = None
    ack_wait: float | None = None
    reconnect_timeout: float | None = None
    trim: bool | None = None

    @classmethod
    def parse(cls, url: str) -> "BrokerURL":
        """Parse ``url``; a :class:`vaestream.errors.ConfigError` names what is wrong with it."""
        u = urllib.parse.urlsplit(url)
        if u.scheme != "redis":
            raise ConfigError(f"{url}: a broker URL is redis://HOST:PORT/STREAM (scheme {u.scheme or 'missing'})")
        stream = urllib.parse.unquote(u.path.lstrip("/"))
        if not stream:
            raise ConfigError(f"{url}: names no stream (redis://HOST:PORT/STREAM)")
        q = dict(urllib.parse.parse_qsl(u.query))
        unknown = set(q) - {"group", "consumer", "max_deliver", "ack_wait", "reconnect_timeout", "trim"}
        if unknown:
            raise ConfigError(f"{url}: unknown parameter(s) {sorted(unknown)} (group, consumer, max_deliver, "
                              f"ack_wait, reconnect_timeout, trim)")
        if q.get("trim", "1") not in ("0", "1"):
            raise ConfigError(f"{url}: trim must be 0 or 1, got {q['trim']!r}")
        try:
            port = u.port or 6379
            md = int(q["max_deliver"]) if "max_deliver" in q else None
            aw = float(q["ack_wait"]) if "ack_wait" in q else None
            rt = float(q["reconnect_timeout"]) if "reconnect_timeout" in q else None
        except ValueError as e:
            raise ConfigError(f"{url}: {e}") from e
        trim = None if "trim" not in q else q["trim"] == "1"
        return cls(u.hostname or "127.0.0.1", port, stream, q.get("group"), q.get("consumer"), md, aw, rt, trim)

    @property
    def address(self) -> str:
        """``redis://HOST:PORT/STREAM`` without the query."""
        return f"redis://{self.host}:{self.port}/{self.stream}"

    def client(self, timeout: float = 10.0):
        """A synchronous ``redis.Redis`` client of this server."""
        import redis

        # 1 MiB socket reads: a read of 400 messages of 100 records is ~31 MB (one recv and buffer write per 64 KiB
        # by default: ~20 % of the client's CPU for it)
        return redis.Redis(host=self.host, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout,
                           socket_read_size=1 << 20)


@dataclasses.dataclass
class Message:
    """One stream entry as a consumer read it: ``id`` (``MS-SEQ``), its ``fields`` (bytes -> bytes) and how
    many times it has been delivered to the group (1 on its first delivery)."""

    id: str
    fields: dict
    delivered: int = 1
    stream: str = ""

    @property
    def ref(self) -> str:
        """``STREAM/ID``: the records' source in codes and dead letters."""
        return f"{self.stream}/{self.id}"

    @property
    def broker_time(self) -> float:
        """The broker's append time, seconds since the epoch (the ID's milliseconds)."""
        return id_time(self.id)

    @property
    def event_time(self) -> float:
        """The producer's ``event_time`` header if it has a valid one, else :attr:`broker_time`."""
        v = self.fields.get(b"event_time")
        if v is not None:
            try:
                t = float(v)
                if np.isfinite(t):
                    return t
            except ValueError:
                pass
        return self.broker_time


def id_time(entry_id: str) -> float:
    """The milliseconds part of a Redis stream ID, in seconds."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream ID as a sortable pair (ms, seq)."""
    a, _, b = entry_id.partition("-")
    return int(a), int(b or 0)


def record_key(entry_id: str, i: int) -> str:
    """The key of record ``i`` of the message ``entry_id``."""
    return f"{entry_id}:{i:0{KEY_DIGITS}d}"


_SUFFIXES: tuple[str, ...] = ()


def record_keys(entry_id: str, n: int) -> list[str]:
    """The keys of records ``0 .. n-1`` of the message ``entry_id`` (:func:`record_key` of each)."""
    global _SUFFIXES
    suffixes = _SUFFIXES
    if n > len(suffixes):   # built whole and swapped in: safe across threads
        suffixes = _SUFFIXES = tuple(f":{i:0{KEY_DIGITS}d}" for i in range(max(n, 1024)))
    return [entry_id + s for s in suffixes[:n]]


def encode(records: np.ndarray, fmt: str = "raw", batch: bool = True, event_time: float | None = None,
           source: str | None = None) -> dict[str, bytes]:
    """The fields of a message carrying ``records`` (``[n, ...]``; with ``batch=False`` one record)."""
    a = np.ascontiguousarray(records)
    if fmt not in FORMATS:
        raise ConfigError(f"message format must be one of {FORMATS}, got {fmt!r}")
    n = int(a.shape[0]) if batch else 1
    f = {"vaestream": VERSION, "format": fmt.encode(), "batch": b"1" if batch else b"0", "records": str(n).encode()}
    if fmt == "raw":
        f.update(data=a.tobytes(), dtype=a.dtype.str.encode(), shape=",".join(map(str, a.shape)).encode())
    else:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        f["data"] = buf.getvalue()
    if event_time is not None:
        f["event_time"] = repr(float(event_time)).encode()
    if source is not None:
        f["source"] = str(source).encode()
    return f


def decode(msg: Message) -> np.ndarray:
    """The records ``[n, ...]`` a message carries; :class:`WireError` (naming ``STREAM/ID``) if malformed."""
    f = msg.fields
    where = msg.ref

    def field(name: str) -> bytes:
        v = f.get(name.encode())
        if v is None:
            raise WireError(f"{where}: malformed message: no '{name}' field (fields: "
                            f"{sorted(k.decode('utf-8', 'replace') for k in f)})")
        return v

    ver = field("vaestream")
    if ver != VERSION:
        raise WireError(f"{where}: malformed message: format version {ver!r}, this reader takes {VERSION!r}")
    fmt = field("format").decode("utf-8", "replace")
    data = field("data")
    if fmt == "raw":
        try:
            dtype = np.dtype(field("dtype").decode())
            shape = tuple(int(s) for s in field("shape").decode().split(",") if s.strip())
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            raise WireError(f"{where}: malformed message: bad dtype or shape ({e})") from e
        if dtype.hasobject or any(s < 0 for s in shape):
            raise WireError(f"{where}: malformed message: dtype {dtype} / shape {shape} cannot hold records")
        want = int(np.prod(shape)) * dtype.itemsize
        if len(data) != want:
            raise WireError(f"{where}: malformed message: {len(data)} bytes of data, shape {shape} of {dtype} "
                            f"needs {want}")
        a = np.frombuffer(data, dtype).reshape(shape)
    elif fmt == "npy":
        try:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise WireError(f"{where}: malformed message: the .npy payload does not parse ({e})") from e
        if not isinstance(a, np.ndarray):
            raise WireError(f"{where}: malformed message: the .npy payload is not one array")
    else:
        raise WireError(f"{where}: malformed message: format {fmt!r}, expected one of {FORMATS}")
    if f.get(b"batch", b"1") == b"0":
        a = a[None]
    elif a.ndim < 2:
        raise WireError(f"{where}: malformed message: a batch of shape {a.shape} (records [n, ...] need 2+ axes; "
                        f"batch=0 for one record)")
    n = f.get(b"records")
    if n is not None and n.isdigit() and int(n) != a.shape[0]:
        raise WireError(f"{where}: malformed message: says {int(n)} records, carries {a.shape[0]}")
    return a


def messages_of(records: np.ndarray, per_message: int) -> Iterator[np.ndarray]:
    """``records`` in consecutive slices of ``per_message``."""
    for i in range(0, len(records), per_message):
        yield records[i:i + per_message]


def publish(url: str, records: np.ndarray, records_per_message: int = 100, rate: float | None = None,
            fmt: str = "raw", event_time: float | None = None, source: str | None = None,
            pipeline: int = 64) -> dict:
    """Append ``records`` to the stream ``url`` names, ``records_per_message`` per message, at most ``rate``
    records/s (None: as fast as the broker takes them; messages go in pipelined groups of ``pipeline``).

    ``event_time``: every message's event-time header (None: the broker's append time). Returns
    ``{"stream", "messages", "records", "seconds", "first_id", "last_id", "records_per_second"}``."""
    import redis

    if records_per_message < 1:
        raise ConfigError(f"records_per_message must be positive, got {records_per_message}")
    if rate is not None and not rate > 0:
        raise ConfigError(f"rate must be positive records/s, got {rate}")
    u = BrokerURL.parse(url)
    a = np.asarray(records)
    if a.ndim < 2:
        raise DataError(f"{source or 'records'}: expected records [n, ...], got shape {a.shape}")
    client = u.client()
    ids: list[str] = []
    t0 = time.perf_counter()
    sent = 0
    group = max(1, pipeline if rate is None else min(pipeline, max(1, int(rate / records_per_message / 20))))
    chunks = list(messages_of(a, records_per_message))
    try:
        for g in range(0, len(chunks), group):
            pipe = client.pipeline(transaction=False)
            for c in chunks[g:g + group]:
                pipe.xadd(u.stream, encode(c, fmt, True, event_time, source))
            ids += [i.decode() for i in pipe.execute()]
            sent += sum(len(c) for c in chunks[g:g + group])
            if rate is not None:
                ahead = sent / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
    except redis.exceptions.RedisError as e:
        raise BrokerError(f"{u.address}: publishing failed after {len(ids)} messages: {e}") from e
    finally:
        client.close()
    dt = time.perf_counter() - t0
    return {"stream": u.address, "messages": len(ids), "records": int(sent), "seconds": round(dt, 3),
            "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None,
            "records_per_second": round(sent / max(dt, 1e-9), 1)}

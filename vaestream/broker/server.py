"""A local ``redis-server`` for tests, benchmarks and trying the broker source out (:class:`RedisServer`).

    with RedisServer(tmp_dir) as srv:            # a free 127.0.0.1 port, append-only file in tmp_dir
        publish(srv.url("mnist"), records)
        srv.restart()                            # same port and data directory: the stream and groups persist

The server runs with ``appendonly yes`` and ``appendfsync always`` (every write is on disk before the reply,
so a restart, even after ``kill -9``, keeps every acknowledged XADD and XACK), no RDB snapshots, bound to
127.0.0.1 only. ``fsync="everysec"`` (Redis's default) syncs once a second instead: a clean restart keeps
everything, a crash of the server loses up to a second; on a disk with slow syncs ``always`` caps appends at
a few thousand requests per second (measured here: 31k records/s at 100 records per message, 3.5k messages/s
at one record each, against 189k and 10.8k without the append-only file). ``scripts/start_broker.sh``
starts the same server from a shell.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from vaestream.errors import ConfigError

SERVER = "redis-server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_path() -> str | None:
    """The ``redis-server`` executable, or None when it is not installed."""
    return shutil.which(SERVER) or next((p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server")
                                         if os.access(p, os.X_OK)), None)


class RedisServer:
    """A ``redis-server`` process on 127.0.0.1 with its data (the append-only file) in ``data_dir``.

    Args:
      data_dir: the server's working directory (created).
      port: the port (None: a free one, kept across :meth:`restart`).
      appendonly: persist with the append-only file (needed for a restart to keep the stream).
      fsync: the append-only file's ``appendfsync``: ``always`` or ``everysec``.
      aof_rewrite_min: the append-only file's ``auto-aof-rewrite-min-size`` (redis's default is ``64mb``). Every
        message is appended to the file, so at 100 MNIST records a message and 100k records/s it grows 78 MB/s:
        at 64 MB redis would fork and rewrite it about once a second (measured: ~0.4 us of the server's CPU a
        record, its forked children's not counted). The default ``1gb`` rewrites it every ~13 s at that rate,
        the file at most ~2 GB. ``None``: redis's own.
    """

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, appendonly: bool = True,
                 fsync: str = "always", aof_rewrite_min: str | None = "1gb"):
        exe = server_path()
        if exe is None:
            raise ConfigError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.exe = exe
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        if fsync not in ("always", "everysec"):
            raise ConfigError(f"fsync must be 'always' or 'everysec', got {fsync!r}")
        self.fsync = fsync
        self.aof_rewrite_min = aof_rewrite_min
        self.proc: subprocess.Popen | None = None

    def client(self):
        """A ``redis.Redis`` client of this server."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def url(self, stream: str, **query: str) -> str:
        """``redis://127.0.0.1:PORT/STREAM[?k=v...]``."""
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"redis://127.0.0.1:{self.port}/{stream}" + (f"?{q}" if q else "")

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """Start the server and wait until it answers PING."""
        import redis

        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--daemonize", "no", "--protected-mode", "yes", "--logfile", "redis.log"]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", self.fsync]
            if self.aof_rewrite_min is not None:
                args += ["--auto-aof-rewrite-min-size", self.aof_rewrite_min]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        t0 = time.monotonic()
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                log = (self.dir / "redis.log")
                tail = log.read_text()[-500:] if log.is_file() else ""
                self.stop()
                raise ConfigError(f"redis-server on 127.0.0.1:{self.port} did not start: {tail}")
            time.sleep(0.02)
        client.close()
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM: a clean shutdown; ``kill``: SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down: float = 0.0, kill: bool = False) -> None:
        """Stop, wait ``down`` seconds, start again on the same port with the same data."""
        self.stop(kill)
        time.sleep(down)
        self.start()

    def __enter__(self) -> "RedisServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

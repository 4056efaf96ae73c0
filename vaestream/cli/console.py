"""What the command line writes to the terminal besides its results: a quiet start-up and progress bars.

TensorFlow 2.21 writes absl log lines while its shared libraries load (``WARNING: All log messages before
absl::InitializeLog() ...``, ``I0000 ... port.cc] oneDNN custom operations are on``, ``cudart_stub.cc] Could
not find cuda drivers``): they are emitted by C++ static initialisers, before any environment variable or
flag is read, so no setting silences them. :func:`quiet` therefore sets ``TF_CPP_MIN_LOG_LEVEL=3`` (the
later lines, e.g. ``E0000 ... failed call to cuInit``) and installs an import hook that, while ``tensorflow``
is first imported, sends file descriptor 2 to a temporary file and afterwards writes back every line that is
not an absl log line (a Python warning or error raised during the import still shows). Beam's import-time
warnings (``apitools not found ...``, ``Resource module is not available ...``, logged through the root
logger) are dropped by a logging filter, and the ``apache_beam`` loggers show errors only. The processes of
a local Dask cluster inherit the settings through the environment (Dask's ``distributed`` loggers at errors
only, this module preloaded in each worker). ``--verbose`` leaves all of it alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile

ABSL_LINE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                       rb"|[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+:\d+\] .*)$")
"""A line absl (TensorFlow's C++ logging) writes, or its pre-initialisation banner."""

NOISY_IMPORTS = ("tensorflow",)
"""Top-level packages whose first import runs under :func:`captured_stderr`."""

BEAM_NOISE = ("apitools not found", "Resource module is not available")
"""Beam's root-logger warnings that say nothing to a user of vaestream (optional Google Cloud and ML extras)."""


class captured_stderr:
    """Within the block, file descriptor 2 (C++ and Python writes alike) goes to a temporary file; on exit the
    captured lines that are not absl log lines (:data:`ABSL_LINE`) are written back to stderr."""

    def __enter__(self):
        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        self._tmp.seek(0)
        kept = [line for line in self._tmp.read().splitlines(keepends=True) if not ABSL_LINE.match(line.rstrip())]
        self._tmp.close()
        if kept:
            sys.stderr.flush()
            os.write(2, b"".join(kept))
        return False


class _QuietLoader(importlib.abc.Loader):
    """Runs a module's real loader with stderr captured, then hands the module its real loader back."""

    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.real
        if module.__spec__ is not None:
            module.__spec__.loader = self.real
        with captured_stderr():
            self.real.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Answers only for the first import of the :data:`NOISY_IMPORTS`, with the spec the rest of
    ``sys.meta_path`` finds and a :class:`_QuietLoader` around its loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in NOISY_IMPORTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


class _DropBeamNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(BEAM_NOISE))


def quiet(verbose: bool = False) -> None:
    """Silence TensorFlow's, absl's and Beam's start-up lines for this process (and TensorFlow's C++ logging
    below errors in the processes it starts), unless ``verbose``. Call it before TensorFlow is imported."""
    if verbose:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # a local Dask cluster's processes inherit these: its own INFO lines off, and this module preloaded in
    # every worker (dask_setup below), so that the worker's first TensorFlow import is quiet too
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    os.environ.setdefault("DASK_DISTRIBUTED__WORKER__PRELOAD", repr([__name__]))
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
    root = logging.getLogger()
    if not any(isinstance(f, _DropBeamNoise) for f in root.filters):
        root.addFilter(_DropBeamNoise())
    logging.getLogger("apache_beam").setLevel(logging.ERROR)


def dask_setup(worker=None) -> None:
    """Dask's preload hook (``distributed.worker.preload``): a worker process of a quiet command is quiet."""
    quiet(verbose=False)


def show_progress(args) -> bool:
    """Whether a command draws progress bars: stderr is a terminal and no ``--no-progress``."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()

"""Old flat module paths, kept for one release (the package is now organised by concept).

``import vaestream.codec`` (and every other path in :data:`MOVED`) still works: a finder at the front of
``sys.meta_path`` answers only for these names (so no stale copy elsewhere on the path, such as an editable
install of another checkout, can answer instead) and hands back
the module at its new path -- the very same module object, so every class has one qualified name (Beam
pickles DoFns by it) -- with a :class:`DeprecationWarning` naming the new path. No file is left at the old
path, so git follows each moved file's history (and merges edits made to it elsewhere) as a rename.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "vaestream.coder": "vaestream.coding.coder",
    "vaestream.container": "vaestream.coding.container",
    "vaestream.codec": "vaestream.coding.codec",
    "vaestream.lossless": "vaestream.coding.lossless",
    "vaestream.export": "vaestream.serving.export",
    "vaestream.serve": "vaestream.serving.server",
    "vaestream.serve_grpc": "vaestream.serving.grpc_server",
    "vaestream.serve_rest": "vaestream.serving.rest_server",
    "vaestream.batching": "vaestream.serving.batching",
    "vaestream.serve_client": "vaestream.serving.client",
    "vaestream.registry": "vaestream.online.registry",
    "vaestream.drift": "vaestream.online.drift",
    "vaestream.beam_streaming": "vaestream.beam.streaming",
    "vaestream.beam_dask": "vaestream.beam.dask",
    "vaestream.cli_core": "vaestream.cli.core",
    "vaestream.cli_coder": "vaestream.cli.coder",
    "vaestream.cli_beam": "vaestream.cli.beam",
    "vaestream.cli_stream": "vaestream.cli.stream",
    "vaestream.cli_deploy": "vaestream.cli.deploy",
}
"""Old module path -> new module path."""


def moved_warning(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} moved to {new}; the old path is kept for one release", DeprecationWarning,
                  stacklevel=stacklevel)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target
        self._real_spec = None

    def create_module(self, spec):
        # importlib's own frames are skipped by warnings, so stacklevel 2 names the importing line
        moved_warning(spec.name, self.target, stacklevel=2)
        module = importlib.import_module(self.target)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_spec  # importlib set the alias' spec on it: give the module its own back


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


def module_getattr(package: str, name: str):
    """For a package's ``__getattr__``: ``package.name`` where ``package.name`` is a moved module path."""
    full = f"{package}.{name}"
    if full in MOVED:
        return importlib.import_module(full)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

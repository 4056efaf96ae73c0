"""The committed-range ledger of a broker consumer, and the named fault-injection points.

A consumer that writes output for broker messages commits each unit of output (a window pane: its codes,
summary and dead letters) in three steps:

1. write every file of the unit under its final name plus ``.pending`` (:meth:`Ledger.staged`);
2. **commit**: write the unit's ledger entry ``OUTPUT/ledger/NAME.json`` (the broker IDs the unit holds and
   its files) atomically (temporary file, fsync, rename), then rename each ``.pending`` file into place;
3. acknowledge the IDs to the broker (``XACK``).

At start-up :meth:`Ledger.recover` rolls every entry forward (renames the ``.pending`` files an entry names
that a crash left behind) and deletes ``.pending`` files no entry names (a unit that never committed: its
messages were not acknowledged, so the broker delivers them again). :meth:`Ledger.committed_ids` are then
acknowledged once more and skipped if they are delivered again: a crash after the commit and before the
acknowledgement does not write the redelivered records twice. Output file names carry the first broker ID of
their unit, so a unit written after a restart never replaces one written before.

**Fault injection** (:func:`fault`): the environment variable ``VAESTREAM_FAULT`` names a point,
``before_rename`` (the files are staged, nothing is committed), ``after_rename`` (committed, not
acknowledged) or ``after_ack``; the process exits at once (``os._exit(86)``, no clean-up) the
``VAESTREAM_FAULT_AT``-th time (default 1) it reaches that point. Tests run a job with it and restart it.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path
from typing import Iterable

from vaestream.binio import atomic_write
from vaestream.errors import DataError

LEDGER_DIR = "ledger"
PENDING = ".pending"
FAULT_POINTS = ("before_rename", "after_rename", "after_ack")
FAULT_EXIT = 86
_hits: dict[str, int] = {}


def fault(point: str) -> None:
    """Exit the process at once if ``VAESTREAM_FAULT`` names ``point`` (see the module docstring)."""
    if os.environ.get("VAESTREAM_FAULT") != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(os.environ.get("VAESTREAM_FAULT_AT", "1")):
        os._exit(FAULT_EXIT)


class Ledger:
    """The ledger of the output directory ``out_dir`` (entries in ``out_dir/ledger/``)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out = Path(out_dir)
        self.dir = self.out / LEDGER_DIR

    @staticmethod
    def staged(path: str | os.PathLike) -> str:
        """Where to write the file that will be ``path`` once committed."""
        return str(path) + PENDING

    def write_staged(self, path: str | os.PathLike, data: bytes) -> None:
        """Write ``data`` durably to :meth:`staged` ``(path)``."""
        with open(self.staged(path), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def commit(self, name: str, files: Iterable[str | os.PathLike], ids: Iterable[str], **info) -> dict:
        """Commit the unit ``name``: its entry (``ids``, ``files`` relative to the output directory, ``info``),
        then its staged files renamed into place. Committing the same entry again is harmless."""
        self.dir.mkdir(parents=True, exist_ok=True)
        rel = [os.path.relpath(str(f), self.out) for f in files]
        entry = {"name": name, "ids": list(ids), "files": rel, "committed_at": time.time(), **info}
        atomic_write(self.dir / f"{name}.json", json.dumps(entry, sort_keys=True) + "\n")
        self._roll_forward(entry)
        return entry

    def _roll_forward(self, entry: dict) -> int:
        n = 0
        for r in entry["files"]:
            final = self.out / r
            pending = Path(self.staged(final))
            if pending.exists():
                os.replace(pending, final)
                n += 1
            elif not final.exists():
                raise DataError(f"{self.dir / (entry['name'] + '.json')}: names {r}, which is neither in place nor "
                                f"staged (output removed by hand?)")
        return n

    def entries(self) -> list[dict]:
        """Every committed entry."""
        out = []
        for f in sorted(glob.glob(str(self.dir / "*.json"))):
            try:
                with open(f) as fh:
                    out.append(json.load(fh))
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{f}: unreadable ledger entry ({e})") from e
        return out

    def committed_ids(self) -> set[str]:
        """The broker IDs of every committed unit."""
        return {i for e in self.entries() for i in e["ids"]}

    def recover(self) -> dict:
        """Roll committed units forward and remove uncommitted staged files; returns what was done."""
        entries = self.entries()
        rolled = sum(self._roll_forward(e) for e in entries)
        named = {str(self.out / r) for e in entries for r in e["files"]}
        removed = 0
        for p in glob.glob(str(self.out / "**" / ("*" + PENDING)), recursive=True):
            if p[:-len(PENDING)] not in named:
                os.remove(p)
                removed += 1
        return {"entries": len(entries), "rolled_forward": rolled, "removed_uncommitted": removed}

"""The ``vaestream`` command line: thin shells over the Python API.

Subcommands are registered by modules listed in :data:`SUBCOMMAND_MODULES`; each has a function
``add_subcommands(subparsers)`` that adds its parsers and sets ``func`` (called with the parsed args, returning
an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = (
    "vaestream.cli_core",      # train, evaluate
    "vaestream.cli_coder",     # compress, decompress, rd
    "vaestream.cli_beam",      # prepare, encode, decode
    "vaestream.cli_deploy",    # export, serve
    "vaestream.cli_stream",    # follow-training helpers
)


def build_parser() -> argparse.ArgumentParser:
    from vaestream import __version__

    parser = argparse.ArgumentParser(prog="vaestream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vaestream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vaestream.errors import VaestreamError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VaestreamError as e:
        print(f"vaestream: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``vaestream`` command line: thin shells over the Python API.

Each subcommand lives in a module with a function ``add_subcommands(subparsers)`` that adds its parsers and
sets ``func`` (called with the parsed args, returning an exit code). :data:`COMMANDS` maps every command to
its module, so a run imports only the module of the command it runs (Beam, the server or the coder are not
imported to train); ``vaestream --help`` imports them all.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "vaestream.cli.core", "evaluate": "vaestream.cli.core", "demo": "vaestream.cli.core",
    "build-tables": "vaestream.cli.coder", "compress": "vaestream.cli.coder", "decompress": "vaestream.cli.coder",
    "rd": "vaestream.cli.coder",
    "prepare": "vaestream.cli.beam", "encode": "vaestream.cli.beam", "decode": "vaestream.cli.beam",
    "export": "vaestream.cli.deploy", "serve": "vaestream.cli.deploy", "client": "vaestream.cli.deploy",
    "follow": "vaestream.cli.stream", "stream-encode": "vaestream.cli.stream", "registry": "vaestream.cli.stream",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` only that command's module is imported and registered."""
    from vaestream import __version__

    parser = argparse.ArgumentParser(prog="vaestream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vaestream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vaestream.errors import VaestreamError

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
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

"""The ``vaestream`` command line: thin shells over the Python API.

Each subcommand lives in a module with a function ``add_subcommands(subparsers)`` that adds its parsers and
sets ``func`` (called with the parsed args, returning an exit code). :data:`COMMANDS` maps every command to
its module, so a run imports only the module of the command it runs (Beam, the server or the coder are not
imported to train); ``vaestream --help`` imports them all, and neither they nor the help import TensorFlow
or Beam.

Flags. Every long option is accepted with ``-`` and with ``_`` between its words (``--latent-dim`` and
``--latent_dim``): :func:`add_twins` registers the other spelling of each after the parsers are built. An
unknown flag gets the sub-command's usage and the nearest known flag. Global flags, accepted before or after
the sub-command: ``--verbose`` (TensorFlow's, absl's and Beam's log lines, quiet by default:
:mod:`vaestream.cli.console`) and ``--no-progress`` (no progress bars; they are drawn only when stderr is a
terminal).

Exit status:

* 0: success;
* 1: a vaestream error (bad input, model or stream): one line ``vaestream: error: ...`` on stderr;
* 2: a usage error (a bad flag or argument): the sub-command's usage and the message;
* 3: a job ran but failed its output contract (it wrote no record, or dead-lettered more than
  ``--max_dead_letter_fraction``): :class:`vaestream.errors.JobFailedError`;
* 130: interrupted (Ctrl-C; training stops at a checkpoint first).

A :class:`vaestream.errors.VaestreamError` exits with its ``exit_code`` attribute (1 unless it sets one).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

COMMANDS = {
    "train": "vaestream.cli.core", "evaluate": "vaestream.cli.core", "demo": "vaestream.cli.core",
    "build-tables": "vaestream.cli.coder", "compress": "vaestream.cli.coder", "decompress": "vaestream.cli.coder",
    "rd": "vaestream.cli.coder", "train-context": "vaestream.cli.coder", "train-joint": "vaestream.cli.coder",
    "prepare": "vaestream.cli.beam", "encode": "vaestream.cli.beam", "decode": "vaestream.cli.beam",
    "export": "vaestream.cli.deploy", "serve": "vaestream.cli.deploy", "client": "vaestream.cli.deploy",
    "publish": "vaestream.cli.broker", "follow": "vaestream.cli.stream", "stream-encode": "vaestream.cli.stream",
    "registry": "vaestream.cli.stream",
}

GLOBAL_FLAGS = {
    "--verbose": "show TensorFlow's, absl's and Beam's log lines (hidden by default)",
    "--no-progress": "no progress bars on stderr (drawn only when stderr is a terminal)",
}
"""Flags every command takes, before or after the sub-command name."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose abbreviations do not count an option's ``_``/``-`` twin as a second match."""

    def _get_option_tuples(self, option_string):
        seen, out = set(), []
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in seen:
                seen.add(id(t[0]))
                out.append(t)
        return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-command parsers of ``parser`` by name (aliases included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def twin(option: str) -> str | None:
    """The other spelling of a long option (``--a-b`` <-> ``--a_b``), or None if it has one word."""
    body = option[2:]
    if not option.startswith("--") or not ("-" in body or "_" in body):
        return None
    if "-" in body and "_" in body:
        return None  # mixed spellings are nobody's twin
    return "--" + (body.replace("-", "_") if "-" in body else body.replace("_", "-"))


def add_twins(parser: argparse.ArgumentParser) -> None:
    """Register the ``_``/``-`` twin of every long option of ``parser`` and of its sub-command parsers (the
    twin parses as the option; help shows the spelling it was defined with)."""
    for p in [parser, *dict.fromkeys(_subparsers(parser).values())]:
        for action in list(p._actions):
            for option in list(action.option_strings):
                other = twin(option)
                if other and other not in p._option_string_actions:
                    p._option_string_actions[other] = action


def add_global_flags(parser: argparse.ArgumentParser) -> None:
    """:data:`GLOBAL_FLAGS` on the main parser and on every sub-command parser that lacks them (there with no
    default, so a sub-command never resets what was given before it)."""
    for flag, help_ in GLOBAL_FLAGS.items():
        parser.add_argument(flag, action="store_true", help=help_)
    for p in dict.fromkeys(_subparsers(parser).values()):
        for flag, help_ in GLOBAL_FLAGS.items():
            if flag not in p._option_string_actions and twin(flag) not in p._option_string_actions:
                p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` only that command's module is imported and registered."""
    from vaestream import __version__

    parser = Parser(prog="vaestream", description="vaestream: train VAEs and compress, encode, serve and stream "
                                                  "data with them. 'vaestream COMMAND --help' for a command's flags.",
                    epilog="Every --a-b flag is also accepted as --a_b. Exit status: 0 ok, 1 vaestream error, "
                           "2 usage error, 3 a job failed its output contract, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"vaestream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).add_subcommands(sub)
    add_global_flags(parser)
    add_twins(parser)
    return parser


def _did_you_mean(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """`` (did you mean --x?)`` for the first unknown flag with a near known one, else ''."""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1, cutoff=0.7)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def _command_of(argv: list[str]) -> str | None:
    """The sub-command named in ``argv``: its first word that is not a flag (None if there is none)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _wants_verbose(argv: list[str]) -> bool:
    """Whether ``--verbose`` is among the flags (read before parsing: the quiet set-up precedes every import)."""
    words = argv[:argv.index("--")] if "--" in argv else argv
    return "--verbose" in words


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status (module docstring)."""
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        print("vaestream: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    from vaestream.cli import console
    from vaestream.errors import VaestreamError

    verbose = _wants_verbose(argv)
    console.quiet(verbose)  # before anything imports TensorFlow
    command = _command_of(argv)
    parser = build_parser(command)
    if command is not None and command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        parser.error(f"unknown command {command!r}" + (f" (did you mean {close[0]}?)" if close else
                                                       f"; the commands: {', '.join(COMMANDS)}"))
    args, unknown = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(parser, unknown)}")
        parser.print_help()
        return 2
    if unknown:
        sub = _subparsers(parser)[args.command]
        sub.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(sub, unknown)}")
    args.verbose = verbose or bool(getattr(args, "verbose", False))
    try:
        return int(args.func(args) or 0)
    except VaestreamError as e:
        print(f"vaestream: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1))


if __name__ == "__main__":
    sys.exit(main())

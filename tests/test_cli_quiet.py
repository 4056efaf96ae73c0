"""The command line as a new user meets it: quiet and fast help, both flag spellings, the sub-command's usage
and a suggestion on a bad flag, help text on every option, no TensorFlow/absl lines on a real run, progress
bars only on a terminal, and an honest summary of a finished training rerun."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest

from vaestream.cli import COMMANDS, build_parser

HEAVY = {"tensorflow", "apache_beam", "keras", "tensorflow_probability"}
ABSL = re.compile(r"absl::InitializeLog|^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]|cuInit|cudart_stub|oneDNN|"
                  r"apitools|Resource module|^WARNING:|^INFO:", re.M)


def _env() -> dict:
    """The environment of a new user's shell: no TF_CPP_MIN_LOG_LEVEL of the test session."""
    env = dict(os.environ)
    for name in ("TF_CPP_MIN_LOG_LEVEL", "DASK_LOGGING__DISTRIBUTED", "DASK_DISTRIBUTED__WORKER__PRELOAD"):
        env.pop(name, None)
    return env


def vaestream(*args, python_flags=(), **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-m", "vaestream.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=_env(), **kw)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_is_quiet():
    proc = vaestream("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "train" in proc.stdout and "--verbose" in proc.stdout
    proc = vaestream("train", "--help")
    assert proc.returncode == 0 and proc.stderr == "" and "--latent-dim" in proc.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_neither_tensorflow_nor_beam(command):
    proc = vaestream(*([command] if command else []), "--help", python_flags=["-X", "importtime"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert len(imported) > 20  # the import log was read
    assert {m.split(".")[0] for m in imported} & HEAVY == set()


def test_every_command_is_registered_under_its_module():
    parsers = _subparsers(build_parser())
    assert set(parsers) == set(COMMANDS)


def test_every_option_of_every_command_has_help():
    missing = {}
    for name, p in _subparsers(build_parser()).items():
        bare = [a.option_strings[0] if a.option_strings else a.dest for a in p._actions
                if not isinstance(a, argparse._HelpAction) and not a.help]
        if bare:
            missing[name] = bare
    assert missing == {}


def test_both_spellings_of_every_long_option():
    parsers = _subparsers(build_parser())
    a = build_parser("train").parse_args(["train", "--data", "d", "--out", "o", "--latent_dim", "3",
                                          "--eval_every", "7", "--no_progress"])
    assert (a.latent_dim, a.eval_every, a.no_progress) == (3, 7, True)
    a = build_parser("serve").parse_args(["serve", "--model-base-path", "m", "--rest-api-port", "0",
                                          "--max-concurrent", "2"])
    assert (a.model_base_path, a.rest_api_port, a.max_concurrent) == ("m", 0, 2)
    for name, p in parsers.items():  # each long option with words parses under both spellings
        for action in p._actions:
            for option in action.option_strings:
                body = option[2:]
                if option.startswith("--") and ("-" in body) != ("_" in body):
                    other = "--" + (body.replace("-", "_") if "-" in body else body.replace("_", "-"))
                    assert p._option_string_actions.get(other) is action, (name, option, other)


def test_an_unknown_flag_gets_the_subcommands_usage_and_a_suggestion():
    proc = vaestream("train", "--data", "d.npy", "--out", "o", "--latent_dimm", "3")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: vaestream train ")
    assert "unrecognized arguments: --latent_dimm 3 (did you mean --latent_dim?)" in proc.stderr
    proc = vaestream("evaluate", "--model", "m")  # a missing argument: the sub-command's usage too
    assert proc.returncode == 2 and proc.stderr.startswith("usage: vaestream evaluate ")
    assert "the following arguments are required: --data" in proc.stderr
    proc = vaestream("--bogus")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: vaestream [-h]")
    proc = vaestream("trian", "--data", "d.npy")
    assert proc.returncode == 2 and "unknown command 'trian' (did you mean train?)" in proc.stderr


def test_train_defaults_are_train_configs():
    from vaestream.cli.core import TRAIN_DEFAULTS
    from vaestream.training import TrainConfig

    assert TRAIN_DEFAULTS == {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k in TRAIN_DEFAULTS}
    a = build_parser("train").parse_args(["train", "--data", "d", "--out", "o"])
    assert (a.batch_size, a.samples, a.estimator, a.checkpoint_every) == (
        TrainConfig.batch_size, TrainConfig.num_samples, TrainConfig.estimator, TrainConfig.checkpoint_every)


def test_global_flags_before_or_after_the_command():
    p = build_parser("evaluate")
    for argv in (["--verbose", "evaluate", "--model", "m", "--data", "d"],
                 ["evaluate", "--model", "m", "--data", "d", "--verbose"]):
        a = p.parse_args(argv)
        assert a.verbose is True and a.no_progress is False
    a = p.parse_args(["--no-progress", "evaluate", "--model", "m", "--data", "d"])
    assert a.no_progress is True and a.verbose is False


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_train):
    """A 5-step training run through the CLI, as a user runs it (stderr not a terminal, no TF_CPP_MIN_LOG_LEVEL)."""
    tmp = tmp_path_factory.mktemp("quiet")
    np.save(tmp / "small.npy", mnist_train[:2000])
    proc = vaestream("train", "--data", tmp / "small.npy", "--out", tmp / "m", "--steps", 5, "--hidden", 32,
                     "--latent-dim", 4, "--json")
    return tmp, proc


def test_a_real_run_prints_no_tensorflow_or_absl_lines(trained):
    _, proc = trained
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""  # no log lines, and no progress bar: stderr is not a terminal
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 5 and summary["already_trained"] is False and summary["examples_per_second"] > 0


def _evaluate_args(tmp) -> list:
    return ["evaluate", "--model", tmp / "m", "--data", tmp / "small.npy", "--n", 100, "--k", 20, "--json"]


def test_verbose_shows_tensorflows_lines_and_a_pipe_gets_no_progress(trained):
    """--verbose lets TensorFlow's lines through; with stderr a pipe, the evaluation that draws a progress bar on
    a terminal (next test) draws none."""
    tmp, _ = trained
    proc = vaestream(*_evaluate_args(tmp), "--verbose")
    assert proc.returncode == 0 and ABSL.search(proc.stderr)
    assert json.loads(proc.stdout)["k"] == 20 and "log p(x)" not in proc.stderr and "100/100" not in proc.stderr


def test_a_finished_rerun_says_already_trained(trained):
    tmp, _ = trained
    proc = vaestream("train", "--data", tmp / "small.npy", "--out", tmp / "m", "--steps", 5, "--hidden", 32,
                     "--latent-dim", 4, "--json")
    assert proc.returncode == 0
    summary = json.loads(proc.stdout)
    assert summary["already_trained"] is True and summary["examples_per_second"] is None and summary["steps"] == 5
    assert proc.stderr.strip().splitlines() == [f"vaestream: {tmp / 'm'} is already trained to step 5: nothing to "
                                                "do (more --steps or --epochs train on from there)"]


def _run_on_a_terminal(args) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (120 columns); returns (exit status, stdout, terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "vaestream.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, env=_env(), text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read()
    rc = proc.wait(timeout=600)
    os.close(master)
    return rc, out, b"".join(chunks).decode(errors="replace")


def test_evaluate_draws_progress_on_a_terminal_only(trained):
    tmp, _ = trained
    args = _evaluate_args(tmp)
    rc, out, term = _run_on_a_terminal(args)
    assert rc == 0 and json.loads(out)["k"] == 20
    assert re.search(r"log p\(x\), k=20: 100%.*100/100", term), term[-1000:]
    assert not ABSL.search(term)
    rc, out, term = _run_on_a_terminal(args + ["--no-progress"])
    assert rc == 0 and json.loads(out)["k"] == 20 and "log p(x)" not in term


def test_learning_curves_mark_every_evaluation(tmp_path, monkeypatch):
    """A one-evaluation run (``demo --epochs 1`` used to log one point) still draws its points."""
    import matplotlib.figure
    from PIL import Image

    from vaestream import plots

    drawn = []
    save = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kw):
        drawn.extend((line.get_marker(), len(line.get_xdata())) for line in fig.axes[0].lines)
        return save(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    log = [{"step": 600, "samples": 60000, "epoch": 1.0, "train_elbo": -250.0, "test_elbo": -252.0}]
    path = plots.learning_curves({"run": log}, tmp_path / "curves.png")
    assert sorted(drawn) == [("o", 1), ("s", 1)]  # train and test, one marked point each
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    blue = (np.abs(rgb - [31, 119, 180]).sum(axis=-1) < 40).sum()  # C0, the run's colour
    assert blue > 40  # the markers and the legend's samples


def test_ctrl_c_exits_130_without_a_traceback(trained):
    import signal
    import time

    tmp, _ = trained  # the module's trained model and its 2,000 records
    p = subprocess.Popen([sys.executable, "-m", "vaestream.cli", "evaluate", "--model", tmp / "m", "--data",
                          tmp / "small.npy", "--k", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env())
    maps = f"/proc/{p.pid}/maps"
    while p.poll() is None and "libtensorflow" not in open(maps).read():  # the command is running
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err == "vaestream: interrupted\n" and out == ""

"""The command line, run for real in subprocesses: train, evaluate (table, --json, --plots), bad input. (The
table and the missing model directory go through the CLI's main in this process: a fresh process proves no more
there.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def vaestream(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "vaestream.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"vaestream {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory, mnist_train):
    tmp = tmp_path_factory.mktemp("cli")
    np.save(tmp / "train.npy", mnist_train[:6000])
    out = vaestream("train", "--data", tmp / "train.npy", "--out", tmp / "model", "--latent-dim", 2, "--hidden", 64,
                    "--epochs", 2, "--eval-every", 25, "--steps-per-call", 25, "--validation", 1000, "--no-progress",
                    "--json")
    return tmp, json.loads(out.stdout.strip().splitlines()[-1])


def test_train_prints_a_summary_and_logs_curves(trained_2d):
    tmp, summary = trained_2d
    assert summary["steps"] == 2 * (5000 // 100)
    assert summary["valid_elbo"] > -250 and summary["train_elbo"] > -250
    lines = (tmp / "model" / "log.jsonl").read_text().splitlines()
    assert len(lines) >= 3 and all("valid_elbo" in json.loads(line) for line in lines)


def test_evaluate_json_and_plots(trained_2d, mnist_dir):
    tmp, _ = trained_2d
    out = vaestream("evaluate", "--model", tmp / "model", "--data", mnist_dir, "--split", "test", "--n", 300,
                    "--k", 50, "--json", "--plots", tmp / "plots")
    r = json.loads(out.stdout)
    assert r["records"] == 300 and r["k"] == 50
    assert r["log_px"] > r["elbo"]  # the importance-sampled bound is tighter
    assert r["elbo_bits_per_dim"] == pytest.approx(-r["elbo"] / (784 * np.log(2)), rel=1e-6)
    names = sorted(p.rsplit("/", 1)[1] for p in r["plots"])
    assert names == ["learning_curves.png", "manifold.png", "reconstructions.png"]
    for p in r["plots"]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 50
            assert np.asarray(im.convert("L")).std() > 5  # not a blank picture


def test_evaluate_prints_a_table(trained_2d, mnist_dir, capsys):
    from vaestream.cli import main

    tmp, _ = trained_2d
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp / "model"), "--data", str(mnist_dir), "--n", "100"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^elbo_bits_per_dim +\d+\.\d{4}$", out, re.M) and re.search(r"^fingerprint +[0-9a-f]{16}$",
                                                                                   out, re.M), out


def test_bad_data_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    from vaestream.cli import main

    bad = tmp_path / "bad.npy"
    x = np.zeros((200, 4), np.float32)
    x[13, 1] = np.nan
    np.save(bad, x)
    proc = vaestream("train", "--data", bad, "--out", tmp_path / "m", "--steps", 1, "--no-progress", check=False)
    assert proc.returncode == 1
    assert "bad.npy: record 13 has NaN" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m" / "ckpt").exists()  # rejected before any training step
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "nowhere"), "--data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vaestream: error: ") and "not a vaestream model directory" in err, err


def test_demo_trains_evaluates_plots_compresses_and_exports(tmp_path, mnist_dir):
    out = vaestream("demo", "--data", mnist_dir, "--out", tmp_path / "demo", "--epochs", 0.5, "--n", 300, "--k", 10,
                    "--no-progress")
    text = out.stdout
    summary = json.loads(text[text.rindex('{\n  "compress"'):])["compress"]
    assert summary["records"] == 300 and summary["ratio"] > 20  # 784 bytes -> a few dozen
    assert summary["bits_per_record"] >= summary["kl_bits_per_record"] * 0.5
    assert summary["psnr_db"] > 12
    assert summary["export_max_abs_diff"] < 1e-5  # the SavedModel alone decodes the same stream
    for name in ("reconstructions.png", "learning_curves.png"):
        assert (tmp_path / "demo" / "plots" / name).stat().st_size > 1000


def test_train_pulls_minibatches_from_prepared_shards(tmp_path, mnist_train):
    from vaestream.beam.jobs.prepare import prepare

    np.save(tmp_path / "raw.npy", mnist_train[:3000])
    man = prepare(str(tmp_path / "raw.npy"), tmp_path / "shards", num_shards=3)
    assert man.records == 3000
    out = vaestream("train", "--data", tmp_path / "shards", "--out", tmp_path / "m", "--latent-dim", 4, "--hidden", 32,
                    "--steps", 60, "--steps-per-call", 20, "--eval-every", 20, "--no-progress", "--json")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 60
    log = [json.loads(line) for line in (tmp_path / "m" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["step"] == 60 and log[-1]["train_elbo"] > log[0]["train_elbo"]

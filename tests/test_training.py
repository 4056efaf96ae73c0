"""AEVB training on real MNIST: it learns, it resumes exactly after a kill, it checkpoints on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from vaestream import ModelConfig, TrainConfig, Trainer, VAE, train
from vaestream.data import make_dataset
from vaestream.errors import ModelError
from vaestream.store import load_model, read_log
from vaestream.training import dataset_elbo


def test_short_training_on_real_mnist_lowers_the_negative_elbo_by_a_clear_margin(small_model, mnist_test):
    test = make_dataset(mnist_test[:2000], "bernoulli", "test")
    untrained = dataset_elbo(VAE(small_model.model.config, seed=1), test)["elbo"]
    trained = dataset_elbo(small_model.model, test)["elbo"]
    assert untrained < -500  # ~ 784 log 2 nats for a near-uniform decoder
    assert trained > -130  # 3 epochs of a 784-200-10 VAE: about -110 nats
    assert -trained < 0.3 * -untrained
    log = small_model.history
    assert log[-1]["step"] == 3 * 600 and "test_elbo" in log[-1] and "train_elbo" in log[-1]


def test_log_is_jsonl_and_model_reloads_bit_identically(small_model):
    lines = (small_model.model_dir / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [r["step"] for r in read_log(small_model.model_dir)]
    reloaded = load_model(small_model.model_dir)
    assert reloaded.fingerprint() == small_model.model.fingerprint()


@pytest.mark.parametrize("settings", [
    dict(optimizer="adagrad", learning_rate=0.02, init="paper", map_prior=True),
    dict(optimizer="adam", estimator="A", num_samples=3, binarize="dynamic"),
])
def test_paper_settings_train(settings, tmp_path, mnist_train):
    binarize = settings.get("binarize", "none")
    ds = make_dataset(mnist_train[:5000], "bernoulli", "mnist", binarize="static" if binarize == "static" else "none")
    ds.binarize = binarize
    res = train(ds, tmp_path / "m", ModelConfig(latent_dim=5, hidden=(100,)),
                TrainConfig(steps=200, eval_every=100, **settings), test_data=ds.take(slice(0, 500)),
                progress=False)
    log = res.history
    assert len(log) == 2 and log[1]["train_elbo"] > log[0]["train_elbo"]


def test_gaussian_decoder_trains_on_grey_levels(tmp_path, mnist_train):
    ds = make_dataset(mnist_train[:5000], "gaussian_sigmoid", "mnist")
    res = train(ds, tmp_path / "g", ModelConfig(latent_dim=5, hidden=(100,), likelihood="gaussian_sigmoid"),
                TrainConfig(steps=300, eval_every=100), progress=False)
    assert res.history[-1]["train_elbo"] > res.history[0]["train_elbo"] + 50


def test_trainer_update_takes_one_step(mnist_test):
    model = VAE(ModelConfig(latent_dim=3, hidden=(32,)))
    trainer = Trainer(model, TrainConfig(), n_train=1000)
    x = (mnist_test[:100].reshape(100, -1) / 255).astype(np.float32)
    before = model.fingerprint()
    trainer.update(x)
    assert int(trainer.step.numpy()) == 1 and model.fingerprint() != before


def test_trainer_update_checks_dtype_and_range_before_a_step(mnist_test):
    """Raw uint8 pixels into a Bernoulli model's Trainer.update: a DataError saying to scale them (once: ELBO
    +179,133 and a gradient step on it); so are values outside [0, 1] and NaN; no step is taken on any."""
    from vaestream.data import model_inputs
    from vaestream.errors import DataError

    model = VAE(ModelConfig(latent_dim=3, hidden=(32,)))
    trainer = Trainer(model, TrainConfig(), n_train=1000)
    raw = mnist_test[:100].reshape(100, -1)
    before = model.fingerprint()
    with pytest.raises(DataError, match=r"Trainer.update: got uint8 records.*model_inputs"):
        trainer.update(raw)
    x = model_inputs(raw)
    bad = x.copy()
    bad[17, 3] = 2.0
    with pytest.raises(DataError, match=r"Trainer.update: record 17 has values in \[0, 2\], outside the support "
                                        r"\[0, 1\] of the bernoulli decoder"):
        trainer.update(bad)
    bad[17, 3] = np.nan
    with pytest.raises(DataError, match="record 17 has NaN"):
        trainer.update(bad)
    assert int(trainer.step.numpy()) == 0 and model.fingerprint() == before
    elbo = trainer.update(x)  # the scaled records: a step, and a Bernoulli ELBO (a log-likelihood bound: < 0)
    assert int(trainer.step.numpy()) == 1 and elbo < 0
    gauss = VAE(ModelConfig(latent_dim=3, hidden=(32,), likelihood="gaussian"))
    Trainer(gauss, TrainConfig(), n_train=1000).update(bad[:10] * 0 + 3.5)  # an unconstrained decoder takes any real


def test_a_model_dir_refuses_another_architecture(small_model, mnist_train):
    ds = make_dataset(mnist_train[:1000], "bernoulli", "m")
    with pytest.raises(ModelError, match="holds a model with config"):
        train(ds, small_model.model_dir, ModelConfig(latent_dim=3, hidden=(7,)), TrainConfig(steps=1),
              progress=False)


SCRIPT = textwrap.dedent("""
    import sys
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.data import make_dataset, read_idx
    x = read_idx(sys.argv[1])[:20000]
    if sys.argv[4:] == ["wait"]:  # started early: train when told to (TensorFlow and the data already loaded)
        sys.stdin.readline()
    res = train(make_dataset(x, "bernoulli", "mnist"), sys.argv[2], ModelConfig(latent_dim=5, hidden=(64,)),
                TrainConfig(steps=int(sys.argv[3]), seed=4, checkpoint_every=50, steps_per_call=25,
                            binarize="none"), progress=False)
    print("DONE", res.steps, res.interrupted, flush=True)
    sys.exit(130 if res.interrupted else 0)
""")

TOTAL = 1500  # ~3 s of steps after the first checkpoint (step 50), when the kill lands


def _start(mnist_dir, out, steps=TOTAL, wait=False):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(mnist_dir / "train-images-idx3-ubyte.gz"), str(out),
                             str(steps), *["wait"] * wait], stdin=subprocess.PIPE if wait else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(out: Path, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if tf.train.latest_checkpoint(str(out / "ckpt")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before a checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def _weights(model_dir):
    return [v.numpy() for v in load_model(model_dir).weights()]


def test_kill_and_resume_reaches_the_same_parameters_as_an_uninterrupted_run(tmp_path, mnist_dir):
    """A run killed (SIGKILL) between checkpoints and restarted in a fresh process ends with the very weights of
    an uninterrupted run (trained here, in this process, while the resumed one runs)."""
    from vaestream.data import read_idx

    killed = _start(mnist_dir, tmp_path / "killed")
    resumed = _start(mnist_dir, tmp_path / "killed", wait=True)  # same directory: resumes from the last checkpoint
    _wait_for_checkpoint(tmp_path / "killed", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(60)
    ckpt = tf.train.latest_checkpoint(str(tmp_path / "killed" / "ckpt"))
    assert int(ckpt.rsplit("-", 1)[1]) < TOTAL, "the run was not interrupted"

    resumed.stdin.write("go\n")
    resumed.stdin.flush()
    x = read_idx(mnist_dir / "train-images-idx3-ubyte.gz")[:20000]  # the uninterrupted run: SCRIPT's call
    res = train(make_dataset(x, "bernoulli", "mnist"), tmp_path / "straight", ModelConfig(latent_dim=5, hidden=(64,)),
                TrainConfig(steps=TOTAL, seed=4, checkpoint_every=50, steps_per_call=25, binarize="none"),
                progress=False)
    assert res.steps == TOTAL and not res.interrupted
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"DONE {TOTAL} False" in out
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "killed")):
        np.testing.assert_array_equal(a, b)


def test_ctrl_c_writes_a_checkpoint_and_stops(tmp_path, mnist_dir):
    proc = _start(mnist_dir, tmp_path / "int", steps=10**6)
    _wait_for_checkpoint(tmp_path / "int", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    steps = int(out.split()[1])
    assert 0 < steps < 10**6
    assert tf.train.latest_checkpoint(str(tmp_path / "int" / "ckpt")).endswith(f"ckpt-{steps}")


def test_beta_binomial_decoder_models_8bit_counts(tmp_path, mnist_train):
    ds = make_dataset(mnist_train[:1000], "beta_binomial", "mnist")
    res = train(ds, tmp_path / "bb", ModelConfig(latent_dim=5, hidden=(64,), likelihood="beta_binomial"),
                TrainConfig(steps=150, eval_every=50, steps_per_call=50), progress=False)
    bpd = [h["train_bits_per_dim"] for h in res.history]
    assert bpd[-1] < bpd[0] and bpd[-1] < 3.0  # a discrete model of 8-bit pixels: bits/dim of real bytes
    m = res.model
    x = ds.batch(slice(0, 4))
    counts = m.observe(x).numpy()
    np.testing.assert_array_equal(counts, mnist_train[:4].reshape(4, -1))
    lp = m.decode(m.encode(x).mean()).log_prob(counts).numpy()
    assert np.isfinite(lp).all() and (lp < 0).all()

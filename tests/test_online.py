"""Online AEVB on a stream of files: learning, replay buffer, ledger, kill and resume, publishing versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _drop_files(folder: Path, records: np.ndarray, n_files: int, per_file: int, bad: dict | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n_files):
        p = folder / f"part-{i:04d}.npy"
        np.save(p, records[i * per_file:(i + 1) * per_file])
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))  # arrival order = file order
        out.append(p)
    for name, content in (bad or {}).items():
        (folder / name).write_bytes(content)
        os.utime(folder / name, (1_700_000_000 + n_files, 1_700_000_000 + n_files))
    return out


def _config():
    from vaestream.config import ModelConfig
    from vaestream.online import OnlineConfig
    from vaestream.training import TrainConfig

    return (ModelConfig(latent_dim=8, hidden=(64,)), TrainConfig(seed=3, jit=True),
            OnlineConfig(batch_size=50, buffer_size=300, holdout_fraction=0.0, checkpoint_every_files=2,
                         steps_per_call=8, seed=5))


def test_replay_buffer_is_a_bounded_ring():
    from vaestream.online import ReplayBuffer

    b = ReplayBuffer(5, 2, np.uint8)
    b.add(np.arange(6, dtype=np.uint8).reshape(3, 2))
    assert len(b) == 3
    b.add(np.arange(6, 14, dtype=np.uint8).reshape(4, 2))
    assert len(b) == 5 and b.data.shape == (5, 2)
    np.testing.assert_array_equal(b.contents()[:, 0], [4, 6, 8, 10, 12])  # the 5 most recent, oldest first
    rng = np.random.default_rng(0)
    assert set(b.sample(rng, 100)[:, 0]) <= {4, 6, 8, 10, 12}
    b.add(np.arange(20, dtype=np.uint8).reshape(10, 2))
    np.testing.assert_array_equal(b.contents()[:, 0], [10, 12, 14, 16, 18])


def test_online_training_lowers_heldout_negative_elbo_and_publishes(mnist_train, mnist_test, tmp_path):
    from vaestream.model import VAE
    from vaestream.online import OnlineConfig, OnlineLearner
    from vaestream.online.publisher import load_published
    from vaestream.online.registry import Registry
    from vaestream.training import dataset_elbo

    mc, tc, _ = _config()
    oc = OnlineConfig(batch_size=50, buffer_size=1000, holdout_fraction=0.1, holdout_size=300,
                      checkpoint_every_files=4, steps_per_call=8, seed=5)
    files = _drop_files(tmp_path / "in", mnist_train, 8, 400)
    held = mnist_test[:500].reshape(500, -1).astype(np.float32) / 255.0
    import dataclasses

    before = dataset_elbo(VAE(dataclasses.replace(mc, input_dim=784, input_shape=(28, 28)), seed=tc.seed), held)
    learner = OnlineLearner(tmp_path / "work", registry=tmp_path / "reg", model_config=mc, train_config=tc,
                            online_config=oc)
    seen, holdouts = [], {}

    def on_file(rec: dict) -> None:  # the learner's hold-out set as each file leaves it (a checkpoint judges it)
        seen.append(rec)
        holdouts[int(learner.trainer.step.numpy())] = learner.holdout.contents().copy()

    summary = learner.follow(str(tmp_path / "in" / "*.npy"), poll_interval=0.05, idle_timeout=0.2,
                             on_file=on_file)
    after = dataset_elbo(learner.model, held)
    assert summary["files"] == 8 and [r["source"] for r in seen] == [str(f) for f in files]
    assert after["elbo"] > before["elbo"] + 100, (before, after)  # -ELBO on unseen MNIST test records falls
    # the prequential bound (each file scored before it is trained on) improves along the stream
    assert seen[-1]["prequential_elbo"] > seen[0]["prequential_elbo"] + 50
    led = json.loads((tmp_path / "work" / "ledger.json").read_text())
    assert len(led["files"]) == 8 and led["records_trained"] + led["records_held_out"] == 8 * 400
    assert led["records_held_out"] == 8 * 40
    # versions were published as the held-out bound improved: each decision is checked against ELBOs computed
    # here, of the registry's SavedModels, on the hold-out set of the checkpoint that was judged
    reg = Registry(tmp_path / "reg")
    log = reg.log()
    assert reg.versions() == [r["version"] for r in log] and len(log) >= 2
    published = [load_published(reg, r["version"], learner.model.config) for r in log]
    assert all(m is not None and m.fingerprint() == r["fingerprint"] for m, r in zip(published, log))
    # later versions reuse version 1's saved graph (new variables and assets only); each one's coder tables are
    # its own weights' (the quantize signature = the NumPy coder on that version's posterior means)
    from vaestream.coding import tables as tables_mod
    from vaestream.serving.export import ExportedModel

    pb = (reg.get(log[0]["version"]).path / "saved_model.pb").read_bytes()
    for m, r in zip(published, log):
        path = reg.get(r["version"]).path
        assert (path / "saved_model.pb").read_bytes() == pb
        t = tables_mod.CoderTables.load(path / "assets" / "coder_tables.npz")
        assert t.fingerprint == r["fingerprint"] == ExportedModel(path).fingerprint
        mean = m.encoder_params_exact(held[:64])[0].numpy()
        np.testing.assert_array_equal(ExportedModel(path).quantize(held[:64]), tables_mod.quantize(mean, t))
    assert (learner.model_dir / "coder_tables.npz").read_bytes() == \
        (reg.get(log[-1]["version"]).path / "assets" / "coder_tables.npz").read_bytes()
    for i, r in enumerate(log):
        h = holdouts[r["step"]].astype(np.float32) * np.float32(1.0 / 255.0)
        mine = dataset_elbo(published[i], h, seed=oc.seed, jit_compile=False)["elbo"]
        assert mine == pytest.approx(r["holdout_elbo"], rel=1e-4), (i, mine, r)
        if i == 0:
            assert r["previous_elbo"] is None
            continue
        prev = dataset_elbo(published[i - 1], h, seed=oc.seed, jit_compile=False)["elbo"]
        assert prev == pytest.approx(r["previous_elbo"], rel=1e-4), (i, prev, r)
        assert mine > prev + oc.publish_min_improvement, (i, mine, prev)
    # and on records no version saw (the MNIST test set), each version is better than the one before
    unseen = [dataset_elbo(m, held, seed=oc.seed, jit_compile=False)["elbo"] for m in published]
    assert all(b > a for a, b in zip(unseen, unseen[1:])), unseen
    assert led["published"]["version"] == reg.versions()[-1]
    assert reg.latest().fingerprint == learner.model.fingerprint()
    drift = [json.loads(s) for s in (tmp_path / "work" / "drift.jsonl").read_text().splitlines()]
    assert len(drift) == 8 and all("bits_per_record" in d for d in drift)


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    from tests.test_online import _config
    from vaestream.online import OnlineLearner
    mc, tc, oc = _config()
    learner = OnlineLearner({work!r}, model_config=mc, train_config=tc, online_config=oc)
    count = []
    def on_file(rec):
        count.append(rec)
        if len(count) == 3:  # file 3 is trained but not yet checkpointed (checkpoints every 2 files): kill -9
            os.kill(os.getpid(), signal.SIGKILL)
    learner.follow({pattern!r}, poll_interval=0.05, idle_timeout=0.2, on_file=on_file)
""")


def test_kill_resumes_without_losing_or_double_counting_files(mnist_train, tmp_path):
    from vaestream.online import OnlineLearner

    files = _drop_files(tmp_path / "in", mnist_train, 6, 200, bad={"part-bad.npy": b"not numpy"})
    pattern = str(tmp_path / "in" / "*.npy")
    mc, tc, oc = _config()
    # the uninterrupted run
    ref = OnlineLearner(tmp_path / "ref", model_config=mc, train_config=tc, online_config=oc)
    ref.follow(pattern, poll_interval=0.05, idle_timeout=0.2)
    # a run killed (SIGKILL) after its third file, between checkpoints
    work = tmp_path / "work"
    script = _KILLED_RUN.format(root=str(ROOT), work=str(work), pattern=pattern)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    led = json.loads((work / "ledger.json").read_text())
    assert [Path(f["path"]).name for f in led["files"]] == ["part-0000.npy", "part-0001.npy"]
    assert (work / "model" / "ckpt").is_dir()
    # resume: the ledger's checkpoint is restored and the files after it are processed exactly once
    resumed = OnlineLearner(work, model_config=mc, train_config=tc, online_config=oc)
    assert int(resumed.trainer.step.numpy()) == led["step"]
    assert len(resumed.buffer) == 300 and resumed.buffer.next == (2 * 200) % 300  # a wrapped ring, restored as it lay
    resumed.follow(pattern, poll_interval=0.05, idle_timeout=0.2)
    led = json.loads((work / "ledger.json").read_text())
    names = [Path(f["path"]).name for f in led["files"]]
    assert names == [f.name for f in files]                     # each file once, in arrival order
    assert led["records_trained"] == 6 * 200                     # nothing lost, nothing counted twice
    assert [Path(f["path"]).name for f in led["rejected"]] == ["part-bad.npy"]
    bad = str(tmp_path / "in" / "part-bad.npy")  # the reason names the file and its problem, as does the dead letter
    assert led["rejected"][0]["reason"].startswith(f"{bad}: not a readable NumPy file ("), led["rejected"][0]
    dead = [json.loads(s) for s in (work / "dead_letter.jsonl").read_text().splitlines()]
    assert [(d["source"], d["reason"]) for d in dead] == [(bad, led["rejected"][0]["reason"])]
    ref_led = json.loads((tmp_path / "ref" / "ledger.json").read_text())
    assert led["step"] == ref_led["step"]
    # the resumed run took exactly the steps of the uninterrupted one: the same model, bit for bit
    assert resumed.model.fingerprint() == ref.model.fingerprint()
    # a further restart finds nothing new
    again = OnlineLearner(work, model_config=mc, train_config=tc, online_config=oc)
    assert again.new_files(pattern) == []


def test_push_api_and_bad_records(tmp_path, mnist_train):
    from vaestream.errors import DataError
    from vaestream.online import OnlineLearner

    mc, tc, oc = _config()
    learner = OnlineLearner(tmp_path / "w", model_config=mc, train_config=tc, online_config=oc)
    rec = learner.push(mnist_train[:300], source="batch-1")
    assert rec["records"] == 300 and rec["steps"] == 6 and np.isfinite(rec["train_elbo"])
    with pytest.raises(DataError, match="batch-2"):
        learner.push(np.full((10, 28, 28), np.nan, np.float32), source="batch-2")
    with pytest.raises(DataError, match="784"):
        learner.push(np.zeros((10, 30), np.uint8), source="batch-3")


def test_follow_cli_and_train_follow_hook(tmp_path, mnist_train, capsys):
    from vaestream.cli import main

    _drop_files(tmp_path / "in", mnist_train, 3, 100, bad={"zz-bad.npy": b"nope"})
    rc = main(["follow", str(tmp_path / "in" / "*.npy"), "--work", str(tmp_path / "w"), "--hidden", "32",
               "--latent-dim", "4", "--batch-size", "50", "--buffer-size", "200", "--poll-interval", "0.05",
               "--idle-timeout", "0.2", "--json"])
    assert rc == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert [os.path.basename(r["source"]) for r in lines[:4]] == ["part-0000.npy", "part-0001.npy", "part-0002.npy",
                                                                    "zz-bad.npy"]
    assert "rejected" in lines[3] and lines[-1]["files"] == 4
    # `vaestream train --follow`: the --data set once, then the files
    np.save(tmp_path / "initial.npy", mnist_train[1000:1300])
    train_follow = ["train", "--data", str(tmp_path / "initial.npy"), "--out", str(tmp_path / "t"), "--latent-dim", "4",
                    "--hidden", "32", "--batch-size", "50", "--follow", str(tmp_path / "in" / "part-*.npy"),
                    "--poll-interval", "0.05", "--idle-timeout", "0.2"]
    for _ in range(2):  # a second run finds everything in the ledger
        assert main(train_follow) == 0
    led = json.loads((tmp_path / "t" / "ledger.json").read_text())
    assert [f["path"] for f in led["files"]][0] == f"data:{tmp_path / 'initial.npy'}"
    assert [os.path.basename(f["path"]) for f in led["files"]][1:] == ["part-0000.npy", "part-0001.npy",
                                                                        "part-0002.npy"]
    assert led["records_trained"] + led["records_held_out"] == 300 + 3 * 100 and led["records_held_out"] == 30



def test_online_model_equals_batch_fit_over_the_same_minibatches(mnist_train, tmp_path):
    """N records through the learner (test-then-train scoring, replay, padded chunks, checkpoints) leave the
    model that a batch ``fit`` reaches over the same minibatch sequence from the same seed, chunked otherwise."""
    import dataclasses

    from vaestream.model import VAE
    from vaestream.online import OnlineLearner
    from vaestream.training import fit, prepare_model_dir, sequence_chunks

    import tensorflow as tf

    from vaestream.objective import elbo

    mc, tc, oc = _config()                  # M = 50, K = 8, buffer 300, a checkpoint every 2 files
    learner = OnlineLearner(tmp_path / "online", model_config=mc, train_config=tc, online_config=oc)

    @tf.function(jit_compile=True)
    def bound(model, x):                    # the prequential score's estimator: B, L = 1, z seeded (seed, 0)
        return elbo(model, x, estimator="B", num_samples=1, seed=tf.constant([oc.seed, 0]), closed_form=True,
                    rng_alg="threefry")["elbo"]

    sizes = [230, 170, 300, 120, 260]       # 5 steps (all new), then 7, 12, 5, 11 (25 new + 25 replayed)
    seq, start = [], 0
    for i, n in enumerate(sizes):
        x = mnist_train[start:start + n]
        start += n
        seq.append(learner.minibatches(x.reshape(n, -1), i))  # the plan, from the buffer as it is now
        if i:  # test, then train: the file's score is the bound of the model *before* its steps (the file
            # padded to a multiple of 256 records in the compiled call, as here)
            padded = np.zeros((-(-n // 256) * 256, 784), np.float32)
            padded[:n] = x.reshape(n, -1) / np.float32(255.0)
            expected = float(tf.reduce_sum(bound(learner.model, tf.constant(padded))[:n])) / n
        rec = learner.process_records(x, source=f"part-{i}")
        assert rec["steps"] == len(seq[-1])
        if i:
            assert rec["prequential_elbo"] == pytest.approx(expected, rel=1e-5), (i, rec, expected)
    seq = np.concatenate(seq)
    assert seq.shape == (40, 50, 784) and int(learner.trainer.step.numpy()) == 40
    assert len(learner.buffer) == 300 and len(learner.ledger["files"]) == 4  # the fifth is pending
    cfg = dataclasses.replace(learner.train_config, steps=len(seq), steps_per_call=7)
    config = prepare_model_dir(tmp_path / "batch", mc, (28, 28), cfg, "sequence")
    res = fit(tmp_path / "batch", config, cfg, oc.buffer_size, 1.0 / 255.0, sequence_chunks(seq, 7), {},
              progress=False)
    assert res.steps == 40
    init = VAE(config, seed=tc.seed, init=tc.init)
    for a, b, w0 in zip(learner.model.weights(), res.model.weights(), init.weights()):
        a, b, w0 = a.numpy(), b.numpy(), w0.numpy()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert np.abs(a - w0).max() > 1e-3   # both moved far from the initial weights


def test_warm_up_and_publish_share(mnist_train, tmp_path):
    """The publisher traced ahead (``warm_up``) publishes no version of its own; with a publish share below 1
    it pauses between evaluations, and ``wait`` still judges (and publishes) the last checkpoint at once."""
    import dataclasses

    from vaestream.online import OnlineLearner
    from vaestream.online.publisher import load_published
    from vaestream.online.registry import Registry

    mc, tc, oc = _config()
    oc = dataclasses.replace(oc, holdout_fraction=0.1, holdout_size=200, publish_share=0.01)
    learner = OnlineLearner(tmp_path / "work", registry=tmp_path / "reg", model_config=mc, train_config=tc,
                            online_config=oc)
    learner.process_records(mnist_train[:300], source="part-0")
    assert learner.warm_up(mnist_train[:300]) > 0
    reg = Registry(tmp_path / "reg")
    assert reg.versions() == []
    for i in range(1, 6):   # checkpoints after files 1, 3, 5: the later ones queue behind the pause
        learner.process_records(mnist_train[300 * i:300 * (i + 1)], source=f"part-{i}")
    learner.close()
    evals = [json.loads(s) for s in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "evaluate"]
    assert evals[-1]["step"] == int(learner.trainer.step.numpy())   # the last checkpoint was judged
    assert reg.versions() and reg.latest().fingerprint == learner.model.fingerprint()
    m = load_published(reg, reg.versions()[-1], learner.model.config)
    for a, b in zip(m.weights(), learner.model.weights()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    from vaestream.errors import ConfigError

    with pytest.raises(ConfigError, match="publish_share"):
        dataclasses.replace(oc, publish_share=0.0)


def test_publish_interval_judges_the_newest_checkpoint_after_the_pause(mnist_train, tmp_path):
    """With a publish interval, checkpoints during the pause after an evaluation are not judged one by one: the
    newest replaces the waiting one, and ``close`` judges it at once."""
    import dataclasses
    import time

    from vaestream.errors import ConfigError
    from vaestream.online import OnlineLearner

    mc, tc, oc = _config()
    oc = dataclasses.replace(oc, holdout_fraction=0.1, holdout_size=200, publish_interval=1e6)
    learner = OnlineLearner(tmp_path / "work", registry=tmp_path / "reg", model_config=mc, train_config=tc,
                            online_config=oc)

    def evaluations() -> list[dict]:
        log = [json.loads(s) for s in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
        return [e for e in log if e["event"] == "evaluate"]

    for i in range(2):  # the first checkpoint (every 2 files) is judged at once
        learner.process_records(mnist_train[300 * i:300 * (i + 1)], source=f"part-{i}")
    deadline = time.monotonic() + 120
    while not evaluations() and time.monotonic() < deadline:
        time.sleep(0.05)
    first = evaluations()
    assert len(first) == 1
    for i in range(2, 6):  # two more checkpoints inside the interval: none is judged yet
        learner.process_records(mnist_train[300 * i:300 * (i + 1)], source=f"part-{i}")
    assert len(evaluations()) == 1
    learner.close()
    evals = evaluations()
    assert len(evals) == 2 and evals[-1]["step"] == int(learner.trainer.step.numpy()) > first[0]["step"]
    with pytest.raises(ConfigError, match="publish_interval"):
        dataclasses.replace(oc, publish_interval=-1.0)


"""The online learner's ``process_files`` (a file in parts, a checkpoint captured then committed) and its cached
checkpoints: the same learning as ``process_file`` one file after the other, and checkpoints that restore bit for
bit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _files(folder: Path, records: np.ndarray, sizes: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out, start = [], 0
    for i, n in enumerate(sizes):
        p = folder / f"part-{i:04d}.npy"
        np.save(p, records[start:start + n])
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))
        out.append(p)
        start += n
    return out


def _learner(work: Path):
    from vaestream.config import ModelConfig
    from vaestream.online import OnlineConfig, OnlineLearner
    from vaestream.training import TrainConfig

    return OnlineLearner(work, model_config=ModelConfig(latent_dim=8, hidden=(64,)), train_config=TrainConfig(seed=3),
                         online_config=OnlineConfig(batch_size=50, buffer_size=300, holdout_fraction=0.1,
                                                    holdout_size=100, checkpoint_every_files=2, steps_per_call=8,
                                                    seed=5))


def _file_lines(work: Path) -> list[dict]:
    drop = ("seconds", "seconds_prepare", "seconds_score_train")
    return [{k: v for k, v in e.items() if k not in drop}
            for e in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if e["event"] == "file"]


def test_process_files_learns_as_process_file_one_by_one_and_resumes_from_a_cached_checkpoint(mnist_train, tmp_path):
    """``process_files`` gives the model, scores, ledger and replay state of ``process_file`` one file after
    the other, bit for bit; its later checkpoints (one ``SaveV2`` with the first one's keys and object graph)
    restore the same model in a new learner, which then goes on as an uninterrupted one."""
    sizes = [230, 170, 300, 120, 260, 200, 180]   # 7 files: checkpoints after files 2, 4, 6 (and the last by hand)
    files = _files(tmp_path / "in", mnist_train, sizes)
    bad = tmp_path / "in" / "part-0003-bad.npy"
    bad.write_bytes(b"not numpy")
    order = files[:3] + [bad] + files[3:]
    one = _learner(tmp_path / "one")
    recs_one = [one.process_file(p) for p in order]
    seen = []
    many = _learner(tmp_path / "many")
    recs_many = many.process_files(order, on_file=seen.append)
    assert [r.get("prequential_elbo") for r in recs_many] == [r.get("prequential_elbo") for r in recs_one]
    assert seen == recs_many and "rejected" in recs_many[3]
    assert many.model.fingerprint() == one.model.fingerprint()
    assert int(many.trainer.step.numpy()) == int(one.trainer.step.numpy()) == many._step
    np.testing.assert_array_equal(many.buffer.contents(), one.buffer.contents())
    np.testing.assert_array_equal(many.holdout.contents(), one.holdout.contents())
    assert _file_lines(tmp_path / "many") == _file_lines(tmp_path / "one")
    led_one, led_many = (json.loads((tmp_path / w / "ledger.json").read_text()) for w in ("one", "many"))
    assert [f["path"] for f in led_many["files"]] == [f["path"] for f in led_one["files"]]
    for key in ("step", "checkpoint", "state", "records_trained", "records_held_out", "drift"):
        assert led_many[key] == led_one[key], key
    assert [Path(f["path"]).name for f in led_many["rejected"]] == [bad.name]
    with np.load(tmp_path / "many" / led_many["state"]) as a, np.load(tmp_path / "one" / led_one["state"]) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    # the ledger's checkpoint (the third: written by the cached SaveV2) restores the same model and step
    assert many._ckpt.cached and many._ckpt.full_saves == 1
    resumed = _learner(tmp_path / "many")
    assert int(resumed.trainer.step.numpy()) == led_many["step"] > 0
    assert len(many.pending) == 1   # the last file is not in the ledger: the resumed learner learns it again
    assert resumed.process_files(order) and resumed.model.fingerprint() == many.model.fingerprint()
    # and the manager's view of the directory: the newest checkpoint is the ledger's, three are kept
    import tensorflow as tf

    ckpt_dir = tmp_path / "many" / "model" / "ckpt"
    assert Path(tf.train.latest_checkpoint(str(ckpt_dir))).name == led_many["checkpoint"]
    assert len(list(ckpt_dir.glob("ckpt-*.index"))) == 3


def test_a_cached_checkpoint_restores_every_variable_bit_for_bit(tmp_path):
    """After the first (full) save, ``CachedCheckpoints`` writes the same keys and object graph by one ``SaveV2``:
    ``tf.train.Checkpoint.restore`` of it matches every object and gives back the values of the moment its values
    were taken (not those at the write), and the state file names it; the oldest beyond ``max_to_keep`` go."""
    import tensorflow as tf

    from vaestream.config import ModelConfig
    from vaestream.model import VAE
    from vaestream.online.checkpoints import OBJECT_GRAPH_KEY, CachedCheckpoints, resolve_checkpoint_keys
    from vaestream.training import TrainConfig, Trainer

    cfg = ModelConfig(latent_dim=4, hidden=(32,), input_dim=784, input_shape=(28, 28))
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 256, (4, 20, 784), dtype=np.uint8)

    def trainer():
        return Trainer(VAE(cfg, seed=1), TrainConfig(batch_size=20, seed=1), 1000)

    tr = trainer()
    tr.run_steps(chunk, 1 / 255.0)
    ck = CachedCheckpoints(tr.checkpoint(), tmp_path / "ckpt", max_to_keep=2)
    first = ck.save(4)
    assert ck.cached and ck.full_saves == 1
    full_keys = sorted(tf.train.load_checkpoint(first).get_variable_to_shape_map())
    tr.run_steps(chunk, 1 / 255.0)
    values = ck.values()
    expected = {k: v.copy() for k, v in zip(ck._template["keys"], values)}
    tr.run_steps(chunk, 1 / 255.0)           # the variables move on before the write
    second = ck.write(8, values)
    ck.write(12, ck.values())
    assert ck.full_saves == 1
    reader = tf.train.load_checkpoint(second)
    assert sorted(reader.get_variable_to_shape_map()) == full_keys and OBJECT_GRAPH_KEY in full_keys
    for k, v in expected.items():
        np.testing.assert_array_equal(reader.get_tensor(k), v)
    fresh = trainer()
    restoring = fresh.checkpoint()
    restoring.restore(second).assert_existing_objects_matched()
    assert int(fresh.step.numpy()) == 8 and int(restoring.save_counter.numpy()) == 1  # (made on first use)
    found = resolve_checkpoint_keys(restoring, reader.get_tensor(OBJECT_GRAPH_KEY))
    assert sorted(found) == sorted(expected)
    for k, v in expected.items():   # every variable of the new trainer (model, Adam's slots, step) as taken
        np.testing.assert_array_equal(tf.convert_to_tensor(found[k]).numpy(), v)
    for a, b in zip(fresh.model.weights(), VAE(cfg, seed=1).weights()):
        assert not np.array_equal(a.numpy(), b.numpy())
    assert Path(tf.train.latest_checkpoint(str(tmp_path / "ckpt"))).name == "ckpt-12"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.index")) == ["ckpt-12.index", "ckpt-8.index"]

"""Training across 2 local worker processes with MultiWorkerMirroredStrategy (gRPC on localhost) on real MNIST
shards: the chief's checkpoint loads and has learned; resume continues from it; the bound is close to a
single-process run's on the same shards and seed."""

from __future__ import annotations

import numpy as np
import pytest

from vaestream.beam.jobs import prepare
from vaestream import ModelConfig, TrainConfig, store
from vaestream.distributed import free_ports, train_distributed
from vaestream.training import dataset_elbo

CONFIG = ModelConfig(latent_dim=10, hidden=(200,))


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, mnist_train):
    d = tmp_path_factory.mktemp("mw")
    np.save(d / "x.npy", mnist_train[:8000])
    out = d / "shards"
    prepare.run(["--input", str(d / "x.npy"), "--output", str(out), "--num_shards", "4"])
    return out


def test_free_ports_are_distinct():
    ports = free_ports(4)
    assert len(set(ports)) == 4 and all(p > 0 for p in ports)


def test_two_workers_train_and_resume(small_shards, tmp_path, mnist_test):
    test = mnist_test[:1000].reshape(1000, -1).astype(np.float32) / 255.0
    model_dir = tmp_path / "mw"
    rec = train_distributed(small_shards, model_dir, CONFIG, TrainConfig(steps=300, seed=1, batch_size=100),
                            num_workers=2)
    assert rec["step"] == 300 and rec["workers"] == 2 and rec["examples_per_second"] > 0
    model = store.load_model(model_dir)  # the chief's checkpoint
    trained = dataset_elbo(model, test)["elbo"]
    from vaestream.model import VAE

    untrained = dataset_elbo(VAE(CONFIG.__class__.from_dict(store.read_config(model_dir).to_dict()), seed=1), test)["elbo"]
    assert trained > untrained + 100, (trained, untrained)
    assert not list(model_dir.glob(".worker-*"))
    # resume: 100 more steps from the chief's checkpoint
    rec2 = train_distributed(small_shards, model_dir, CONFIG, TrainConfig(steps=400, seed=1, batch_size=100),
                             num_workers=2)
    assert rec2["step"] == 400 and rec2["steps_this_run"] == 100
    # exact resume: 300 + 100 steps == 400 uninterrupted steps, bit for bit
    straight = tmp_path / "straight"
    train_distributed(small_shards, straight, CONFIG, TrainConfig(steps=400, seed=1, batch_size=100), num_workers=2)
    a, b = store.load_model(model_dir), store.load_model(straight)
    for va, vb_ in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_array_equal(va.numpy(), vb_.numpy())
    # single process, same shards and seed, 300 steps: the same bound within a tolerance
    from vaestream.shards import train_from_shards

    single = train_from_shards(small_shards, tmp_path / "single", CONFIG,
                               TrainConfig(steps=300, seed=1, batch_size=100, eval_records=1000), progress=False)
    one = dataset_elbo(single.model, test)["elbo"]
    print(f"ELBO on 1000 test records after 300 steps: 2 workers {trained:.2f}, 1 process {one:.2f}, "
          f"untrained {untrained:.2f}; examples/s: 2 workers {rec['examples_per_second']}, "
          f"1 process (XLA while_loop) {single.examples_per_second:.1f}")
    assert abs(trained - one) < 10.0, (trained, one)


def test_cli_train_distributed(small_shards, tmp_path, capsys):
    import json

    from vaestream.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--data", str(small_shards), "--out", str(out), "--latent-dim", "5", "--hidden", "50",
               "--steps", "40", "--distributed", "2", "--json", "--no-progress"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["step"] == 40 and s["workers"] == 2
    assert store.load_model(out).config.latent_dim == 5

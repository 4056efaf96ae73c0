"""Training across 2 local worker processes with MultiWorkerMirroredStrategy (gRPC on localhost) on real MNIST
shards: the chief's checkpoint loads and has learned; resume continues from it exactly; the bound is close to a
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


def test_two_workers_train_from_the_cli_resume_from_the_api_and_match_one_process(small_shards, tmp_path,
                                                                                  mnist_test, capsys):
    """One scenario, so the worker processes start only three times: ``vaestream train --distributed 2``
    trains 60 steps; ``train_distributed`` resumes the chief's checkpoint to 80; that equals an
    uninterrupted 80-step run bit for bit; its bound is close to a single-process run's (same seed, shards)."""
    import json

    from vaestream.cli import main
    from vaestream.model import VAE
    from vaestream.shards import train_from_shards

    test = mnist_test[:1000].reshape(1000, -1).astype(np.float32) / 255.0
    model_dir = tmp_path / "mw"
    rc = main(["train", "--data", str(small_shards), "--out", str(model_dir), "--latent-dim", "10", "--hidden",
               "200", "--steps", "60", "--seed", "1", "--batch-size", "100", "--distributed", "2", "--json",
               "--no-progress"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["step"] == 60 and rec["workers"] == 2 and rec["examples_per_second"] > 0
    assert store.read_config(model_dir) == CONFIG
    model = store.load_model(model_dir)  # the chief's checkpoint
    untrained = dataset_elbo(VAE(CONFIG, seed=1), test)["elbo"]
    assert dataset_elbo(model, test)["elbo"] > untrained + 100
    assert not list(model_dir.glob(".worker-*"))
    # resume: 20 more steps from the chief's checkpoint
    rec2 = train_distributed(small_shards, model_dir, CONFIG, TrainConfig(steps=80, seed=1, batch_size=100),
                             num_workers=2)
    assert rec2["step"] == 80 and rec2["steps_this_run"] == 20
    trained = dataset_elbo(store.load_model(model_dir), test)["elbo"]
    # exact resume: 60 + 20 steps == 80 uninterrupted steps, bit for bit
    straight = tmp_path / "straight"
    train_distributed(small_shards, straight, CONFIG, TrainConfig(steps=80, seed=1, batch_size=100), num_workers=2)
    a, b = store.load_model(model_dir), store.load_model(straight)
    for va, vb_ in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_array_equal(va.numpy(), vb_.numpy())
    # single process, same shards and seed, 80 steps: the same bound within a tolerance (not the same bits:
    # other noise draws, per-worker minibatches and reduction order; measured 0.2-1.2 nats apart at 300 steps)
    single = train_from_shards(small_shards, tmp_path / "single", CONFIG,
                               TrainConfig(steps=80, seed=1, batch_size=100, eval_records=1000), progress=False)
    one = dataset_elbo(single.model, test)["elbo"]
    print(f"ELBO on 1000 test records after 80 steps: 2 workers {trained:.2f}, 1 process {one:.2f}, "
          f"untrained {untrained:.2f}; examples/s: 2 workers {rec2['examples_per_second']}, "
          f"1 process (XLA while_loop) {single.examples_per_second:.1f}")
    assert abs(trained - one) < 10.0, (trained, one)

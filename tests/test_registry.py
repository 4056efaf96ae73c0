"""Model registry: numbered versions, codes that name their model, old codes decodable after new versions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vaestream.coding import container


def _train_more(model_dir, records: np.ndarray, steps: int, seed: int) -> None:
    """A few more AEVB steps on the model of ``model_dir``, saved as its latest checkpoint (a new model state)."""
    import tensorflow as tf

    from vaestream import store
    from vaestream.training import TrainConfig, Trainer

    model = store.load_model(model_dir)
    trainer = Trainer(model, TrainConfig(seed=seed, jit=False), len(records))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(records), size=(steps, 100))
    trainer.run_steps(records[idx].reshape(steps, 100, -1), 1.0 / 255.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(model_dir / store.CKPT), 3)
    manager.save(checkpoint_number=10_000 + seed)


@pytest.fixture(scope="module")
def registry_with_versions(small_model, mnist_test, tmp_path_factory):
    """A registry with versions 1..3 of one model as it trains on, plus version 1's codes of 50 records."""
    from vaestream.coding import codec
    from vaestream.online.registry import Registry

    root = tmp_path_factory.mktemp("registry")
    work = root / "model"
    shutil.copytree(small_model.model_dir, work)
    reg = Registry(root / "reg")
    cal = mnist_test[:1000]
    v1 = reg.publish(work, calibration=cal, metadata={"note": "first"})
    c1 = codec.load(work)
    x = mnist_test[2000:2050]
    blob1 = c1.compress(x)
    expect1 = c1.decompress(blob1)
    codes1 = c1.encode(x)
    for seed in (2, 3):
        _train_more(work, mnist_test, 20, seed)
        reg.publish(work, calibration=cal)
    return {"reg": reg, "v1": v1, "blob1": blob1, "expect1": expect1, "codes1": codes1, "x": x, "work": work,
            "cal": cal}


def test_versions_are_numbered_and_logged(registry_with_versions):
    reg = registry_with_versions["reg"]
    assert reg.versions() == [1, 2, 3]
    fps = reg.index()
    assert len(set(fps.values())) == 3 and all(len(f) == 64 for f in fps.values())
    log = reg.log()
    assert [r["version"] for r in log] == [1, 2, 3]
    assert log[0]["note"] == "first" and log[0]["fingerprint"] == fps[1]
    assert reg.latest().version == 3


def test_version1_codes_decode_after_version3(registry_with_versions):
    from vaestream.coding import container

    r = registry_with_versions
    reg, blob1 = r["reg"], r["blob1"]
    header = container.read_header(__import__("io").BytesIO(blob1))
    # the code names the model that wrote it
    assert header.fingerprint.hex() == reg.index()[1][:2 * container.FINGERPRINT_BYTES]
    assert reg.version_of(blob1).version == 1
    x_hat = reg.decode(blob1)
    # the same integer codes as the writer's, decoded by version 1's own decoder (its SavedModel)
    np.testing.assert_array_equal(reg.codec(1).decompress_codes(blob1)[0], r["codes1"])
    np.testing.assert_allclose(x_hat, r["expect1"], rtol=0, atol=1e-5)
    # and the newest version codes the same records differently (the model moved on)
    c3 = reg.codec(3)
    assert c3.fingerprint == reg.index()[3] != reg.index()[1]
    blob3 = c3.compress(r["x"])
    assert reg.version_of(blob3).version == 3
    assert not np.array_equal(reg.decode(blob3), x_hat)


def test_missing_version_is_a_clear_error(registry_with_versions, tmp_path):
    from vaestream.coding import codec
    from vaestream.errors import BitstreamError, ModelMismatchError

    r = registry_with_versions
    reg = r["reg"]
    unpublished = tmp_path / "m"
    shutil.copytree(r["work"], unpublished)
    _train_more(unpublished, r["cal"], 5, 9)
    c = codec.load(unpublished, calibration=r["cal"])
    blob = c.compress(r["x"][:3])
    with pytest.raises(ModelMismatchError, match="no model version with fingerprint") as e:
        reg.decode(blob, name="orphan.vaez")
    assert c.fingerprint[:2 * container.FINGERPRINT_BYTES] in str(e.value) and "orphan.vaez" in str(e.value)
    with pytest.raises(BitstreamError):
        reg.decode(r["blob1"][:20])
    with pytest.raises(ModelMismatchError):
        reg.find("ab" * 16)


def test_publishing_the_same_model_twice_returns_its_version(registry_with_versions):
    r = registry_with_versions
    assert r["reg"].publish(r["work"]).version == 3
    assert r["reg"].versions() == [1, 2, 3]


def test_decode_means_of_beam_code_records(registry_with_versions):
    from vaestream.serving import export

    r = registry_with_versions
    reg = r["reg"]
    m1 = export.load_export(reg.get(1).path)
    x = r["x"].reshape(len(r["x"]), -1).astype(np.float32) / 255.0
    mean, _ = m1.encode(x)
    got = reg.decode_means(mean, reg.index()[1])
    np.testing.assert_allclose(got, m1.decode(mean)["x_mean"], rtol=1e-6)


def test_registry_cli_lists_and_decodes(registry_with_versions, tmp_path, capsys):
    from vaestream.cli import main

    r = registry_with_versions
    f = tmp_path / "codes.vaez"
    f.write_bytes(r["blob1"])
    assert main(["registry", "list", str(r["reg"].root)]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert [d["version"] for d in lines] == [1, 2, 3]
    out = tmp_path / "x.npy"
    assert main(["registry", "decode", str(r["reg"].root), str(f), "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["version"] == 1 and res["records"] == 50
    np.testing.assert_allclose(np.load(out), r["expect1"], rtol=0, atol=1e-5)
    assert main(["registry", "list", str(tmp_path)]) == 1  # not a registry: an error, not a crash

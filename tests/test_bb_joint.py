"""Joint fine-tuning of a bits-back member with its pixel context model (vaestream.coder_training.joint), on the
session's beta-binomial model and its K = 4 context model, both trained on real MNIST."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vaestream.coder_training import context as context_training
from vaestream.coder_training import joint as joint_training
from vaestream.coding import family, open_stream
from vaestream.coding.bitsback import context as context_mod
from vaestream.coding.bitsback.tables import level_rows, pixel_levels
from vaestream.coding.bitsback.coder import LosslessCoder
from vaestream.errors import ConfigError, ModelError
from vaestream.store import load_model

K = 4


@pytest.fixture(scope="module")
def joint(ctx_member, mnist_train, mnist_test, tmp_path_factory):
    """The member and its context model fine-tuned together: 1,000 training images, 2 epochs (measured: held-out
    bits x0.948, their KL part x0.62, real bytes on 500 other records x0.950; 2,000 images: x0.92, x0.54, x0.92)."""
    model, d, cm = ctx_member
    before = model.fingerprint()
    rows = []
    member, jcm = joint_training.train_joint(model, mnist_train[:1000], cm, epochs=2, held_out=mnist_test[:300],
                                             seed=0, log=rows.append)
    assert model.fingerprint() == before  # the source member is left as it was
    out = joint_training.save_member(tmp_path_factory.mktemp("joint") / "bitsback-k4", member, jcm)
    return member, jcm, out, rows


def test_joint_training_lowers_the_code_length_and_the_latent_pays_less(joint):
    member, cm, _, rows = joint
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    first, last = rows[0], rows[-1]
    assert last["held_out_bits"] < 0.97 * first["held_out_bits"]
    assert last["held_out_kl_bits"] < 0.9 * first["held_out_kl_bits"]
    info = cm.meta["joint"]
    assert info["held_out_bits_before"] == first["held_out_bits"] and info["held_out_bits"] == last["held_out_bits"]
    assert cm.meta["model_fingerprint"] == member.fingerprint() and not cm.has_reconstruction


def test_the_float_training_loss_is_the_code_length_the_exact_coder_computes(joint, mnist_test):
    """At the posterior mean, the coder's integer rows (grid tables, fixed-point features) and training's float
    beta-binomial and network give the same pixel code length, to the grid's step."""
    import tensorflow as tf

    member, cm, _, _ = joint
    c = LosslessCoder(member, levels=K)
    lv = pixel_levels(K)[1][mnist_test[:200].reshape(200, -1).astype(np.int64)].astype(np.int32)
    mean, _ = c._posterior(lv)
    base = level_rows(c._likelihood(np.rint(mean).astype(np.int64)), K)
    rows = cm.rows_all(base, lv.reshape(-1)).reshape(-1, K)
    exact = -np.sum(np.log2(rows[np.arange(len(rows)), lv.reshape(-1)])) / len(lv)
    values = pixel_levels(K)[0].astype(np.float32) / 255
    mu, _ = member.encoder_params(tf.constant(values[lv]))
    p = member.decoder_params(mu)
    logp, e = joint_training.level_log_probs(p["log_alpha"], p["log_beta"], K)
    ws = [tf.constant(w) for w, _ in cm.layers]
    bs = [tf.constant(b) for _, b in cm.layers]
    trained = float(np.mean(context_training.context_code_bits(ws, bs, cm.window, tf.reshape(lv, (-1, 28, 28)),
                                                               logp, tf.reshape(e, (-1, 28, 28)))))
    assert trained == pytest.approx(exact, rel=5e-3)
    # the base rows alone agree too: the float pmf summed over each level's counts is the grid's row
    np.testing.assert_allclose(np.exp(logp.numpy()).reshape(-1, K), base, atol=0.02)


def test_the_new_member_codes_in_fewer_real_bits_and_round_trips_in_a_family(joint, ctx_member, mnist_test):
    member, cm, out, _ = joint
    model, d, src = ctx_member
    x = mnist_test[300:800]  # held out from training and from the measurements above
    old = LosslessCoder(model, levels=K, contexts={K: src}).compress(x)
    loaded = load_model(out)
    assert loaded.fingerprint() == member.fingerprint()
    contexts = context_mod.load_contexts(out)
    assert contexts[K].digest() == cm.digest()
    coder = LosslessCoder(loaded, levels=K, contexts=contexts)
    new = coder.compress(x)
    assert len(new) < 0.98 * len(old)
    assert np.array_equal(LosslessCoder(loaded, contexts=contexts).decompress(new), coder.quantize(x))
    # beside the source in a family directory, it is a member; the family finds it by the stream
    fam = out.parent
    assert out in family.members(fam)
    assert np.array_equal(open_stream(new, fam).decompress(new), coder.quantize(x))
    assert json.loads((out / joint_training.JOINT_FILE).read_text())["from_model"] == model.fingerprint()


def test_joint_training_refuses_what_it_cannot_fine_tune(joint, ctx_member, small_model, mnist_train):
    member, cm, out, _ = joint
    model, _, src = ctx_member
    with pytest.raises(ModelError):  # a context model of another member
        joint_training.train_joint(model, mnist_train[:64], cm, epochs=1)
    with pytest.raises(ConfigError):  # not a bits-back (beta-binomial) member
        joint_training.train_joint(small_model.model, mnist_train[:64], src, epochs=1)
    with pytest.raises(ConfigError):
        joint_training.train_joint(model, mnist_train[:64], src, epochs=0)
    with pytest.raises(ConfigError):  # never over a model directory
        joint_training.save_member(out, member, cm)


def test_train_joint_on_the_command_line_writes_a_member_with_a_learned_reconstruction(recon_member, mnist_dir,
                                                                                       mnist_test, tmp_path, capsys):
    from vaestream.cli import main

    recon_dir = recon_member[1]
    out = tmp_path / "bitsback-k4"
    assert main(["train-joint", "--model", str(recon_dir), "--data", str(mnist_dir), "--n", "256", "--levels", "4",
                 "--out", str(out), "--epochs", "1", "--held-out", "100", "--recon-epochs", "1"]) == 0
    lines = [json.loads(v) for v in capsys.readouterr().out.strip().splitlines()]
    assert [r.get("epoch") for r in lines[:2]] == [0, 1] and lines[2]["recon"]["epoch"] == 1
    assert lines[-1]["member"] == str(out) and lines[-1]["reconstruction"]["init"]
    np.save(tmp_path / "x.npy", mnist_test[:50])
    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.vaez"), "--model", str(out), "--levels", "4",
                 "--reconstruction", "learned"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["context"] is True
    assert main(["decompress", str(tmp_path / "x.vaez"), str(tmp_path / "y.npy"), "--model", str(out)]) == 0
    y = np.load(tmp_path / "y.npy").reshape(50, -1)
    cell = pixel_levels(4)[1]
    assert np.array_equal(cell[y.astype(np.int64)], cell[mnist_test[:50].reshape(50, -1).astype(np.int64)])
    capsys.readouterr()
    assert main(["train-joint", "--model", str(recon_dir), "--data", str(mnist_dir), "--n", "64", "--levels", "5",
                 "--out", str(tmp_path / "k5")]) == 1  # the source has no context model for K = 5
    assert "train the context model for K = 5" in capsys.readouterr().err and not (tmp_path / "k5").exists()

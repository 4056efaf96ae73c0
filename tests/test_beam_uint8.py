"""The decode job's uint8 output rounded inside the compiled decoder (``LoadedVAE.decode_uint8``): the same bits
as rounding the float decoder means in NumPy, for any batch length, and through the job."""

from __future__ import annotations

import numpy as np

from vaestream import beam as vb
from vaestream.beam.model_handler import round_uint8
from vaestream.beam.transforms import quantize_batch


def test_decode_uint8_is_numpy_rounding_of_decode_bit_for_bit(small_model):
    """Random latents, some wide (saturating pixels at 0 and 255, halves rounding to
    even): decode_uint8 equals round_uint8(decode) for every record, at batch lengths 1, 63, 64, 700 and
    4096; the numpy rounding is np.clip(np.round(255 x), 0, 255) (half to even: 0.5 -> 0, 2.5 -> 2)."""
    model = vb.LoadedVAE.load(str(small_model.model_dir))
    rng = np.random.default_rng(3)
    nz = model.config.latent_dim
    z = np.concatenate([rng.normal(0, 1, (3000, nz)), rng.normal(0, 6, (2000, nz))]).astype(np.float32)
    want = round_uint8(model.decode(z))
    assert want.dtype == np.uint8 and want.min() == 0 and want.max() == 255  # both ends reached
    got = np.concatenate([model.decode_uint8(z[s:s + 4096]) for s in range(0, len(z), 4096)])
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)
    for n in (1, 63, 64, 700):
        assert np.array_equal(model.decode_uint8(z[:n]), want[:n])
    assert np.array_equal(round_uint8(np.array([0.5, 2.5, 254.5, 300.0, -4.0], np.float32) / 255.0),
                          np.array([0, 2, 254, 255, 0], np.uint8))


def test_uint8_handler_batches_are_the_quantized_float_batches(small_model, mnist_test):
    """The decode handler with output_dtype uint8 gives, per element, the records that the float handler's
    batches give after quantize_batch (same bits, same keys, scale 1/255), and quantize_batch keeps them."""
    model_dir = str(small_model.model_dir)
    model = vb.LoadedVAE.load(model_dir)
    mean, log_scale = model.encode(mnist_test[:900], 1 / 255)
    batch = [vb.CodeBatch("a", vb.KeyRange("a", 0, 500), mean[:500], log_scale[:500], model.fingerprint),
             vb.CodeBatch("b", vb.KeyRange("b", 7, 407), mean[500:], log_scale[500:], model.fingerprint)]
    floats = vb.VAEModelHandler(model_dir, mode="decode").run_inference(batch, model)
    fused = vb.VAEModelHandler(model_dir, mode="decode", output_dtype="uint8").run_inference(batch, model)
    for f, u in zip(floats, fused):
        q = quantize_batch(f, "uint8")
        assert u.records.dtype == np.uint8 and u.records.shape == (len(f), 28, 28)
        assert np.array_equal(u.records, q.records) and list(u.keys) == list(f.keys) and u.scale == q.scale
        kept = quantize_batch(u, "uint8")
        assert kept.records is u.records  # no copy of a batch that is uint8 already

"""The building blocks of the networks, below :mod:`vaestream.model` and :mod:`vaestream.conv` (both use them):
:class:`Dense` and :class:`MLP` layers, the activation functions by name, and :func:`blocked`, the fixed row
blocks that make a record's outputs independent of its batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from vaestream.errors import ConfigError

# Rows per block of :func:`blocked` (see there). Part of the codec's contract: changing it changes decoded
# float32 values in the last bits, so it is fixed, not configurable.
BLOCK_ROWS = 64

ACTIVATION_FNS = {  # config.activation -> the TF function
    "tanh": tf.tanh,
    "relu": tf.nn.relu,
    "softplus": tf.nn.softplus,
    "elu": tf.nn.elu,
    "sigmoid": tf.sigmoid,
}


def blocked(fn, t: tf.Tensor, block: int = BLOCK_ROWS, *, stacked: bool = False):
    """``fn`` applied to ``t [B, n]`` in fixed blocks of ``block`` rows, so every row's result is a pure function
    of that row: ``blocked(fn, t)[i]`` is bit-identical for any B and any position of the row in the batch.

    Why: a float32 GEMM's summation order depends on its shape. oneDNN picks other kernels (GEMV, small-M
    paths, other blockings) for other batch lengths, so ``decoder(z)[i]`` for B = 7 differs from B = 64 in the
    last bits (measured on the 784-500-20 decoder: 480-1,351 of 64 x 784 values differ for B in {1, 2, 7, 8,
    32, 63}, and up to 1.5M values at B = 8,192). Run on a block of fixed shape, a row always goes through the
    same kernel and the same K-blocking; rows are padded with zeros to a multiple of ``block`` and the padding
    is sliced off. Row position and batch length then never matter, in any process. Why 64: at 64 rows oneDNN
    treats the block as one M-block, and a row's result was measured identical at every one of the 64
    positions (six decoder architectures, 1, 2 and 8 threads); at 128 rows, with 2+ threads, the block is split
    and rows near the split differ by position (30k-170k of 128 x 784 values), so 128 is not safe.

    Two ways to run the blocks, with the same guarantee:

    * ``stacked=True`` (what the networks use, :meth:`VAE.encoder_params_exact` / ``decoder_params_exact``):
      ``fn`` gets all blocks at once as ``[nblocks, block, n]`` and must treat each block as its own GEMM
      (``tf.matmul`` of a 3-D tensor by a 2-D weight is one BatchMatMul whose every batch member is a
      ``[block, n_in] x [n_in, n_out]`` GEMM: measured bit-identical for any number of blocks, at every
      position, and at 1, 2 and 8 threads). One kernel launch per layer instead of one per block: 0.88 of the
      plain GEMM's decode throughput at B = 1,000 on the 784-500-20 decoder, vs 0.69 for the loop.
    * ``stacked=False``: ``fn`` maps one ``[block, n]`` block, run by ``tf.map_fn`` (any ``fn``; slower).

    Threads: oneDNN splits a GEMM's rows and columns over threads, and for narrow layers (few output columns,
    e.g. an encoder's 2 Nz outputs) also the K sum, so with the map_fn loop *encoder* outputs were seen to
    differ with the intra-op thread count (AVX-512 machine); the decoders' layers are wide (hidden sizes, D
    outputs) and their blocked outputs were measured identical at 1, 2, 8 and 16 threads (784-500-20 and
    784-500-500-50; tests/test_determinism.py checks 1 and 8 threads against the default). With the stacked
    BatchMatMul both encoder and decoder outputs were identical at 1, 2 and 8 threads (AMX machine, 1 and 32
    blocks); only the decoder's is part of the contract. Same TensorFlow build and CPU kind assumed: another ISA
    runs other kernels. Cost: see benchmarks/RESULTS_coder.md (bench_decode_determinism.py).

    ``fn`` returns a tensor or a dict / tuple of tensors with the block's leading row dimension(s). Returns
    the same structure with ``B`` rows. Works eagerly and inside ``tf.function`` (SavedModel exports).
    """
    t = tf.convert_to_tensor(t)
    b = tf.shape(t)[0]
    nblocks = (b + block - 1) // block
    padded = tf.pad(t, [[0, nblocks * block - b]] + [[0, 0]] * (t.shape.rank - 1))
    blocks = tf.reshape(padded, tf.concat([[nblocks, block], tf.shape(t)[1:]], 0))
    if stacked:
        out = fn(blocks)
    else:
        spec = tf.nest.map_structure(lambda o: tf.TensorSpec(o.shape, o.dtype),
                                     fn(tf.zeros([block] + t.shape[1:].as_list(), t.dtype)))
        out = tf.map_fn(fn, blocks, fn_output_signature=spec)

    def unblock(o):
        return tf.reshape(o, tf.concat([[nblocks * block], tf.shape(o)[2:]], 0))[:b]

    return tf.nest.map_structure(unblock, out)


class Dense(tf.Module):
    """y = x W + b, with W of shape ``[n_in, n_out]``."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, init: str, name: str):
        super().__init__(name=name)
        if init == "paper":  # "initialized by random sampling from N(0, 0.01)" (Kingma's code: std 0.01)
            w = rng.normal(0.0, 0.01, size=(n_in, n_out))
            b = rng.normal(0.0, 0.01, size=(n_out,))
        elif init == "glorot":
            limit = math.sqrt(6.0 / (n_in + n_out))
            w = rng.uniform(-limit, limit, size=(n_in, n_out))
            b = np.zeros((n_out,))
        else:
            raise ConfigError(f"init {init!r} is not one of ('glorot', 'paper')")
        self.w = tf.Variable(w.astype(np.float32), name="w")
        self.b = tf.Variable(b.astype(np.float32), name="b")

    def __call__(self, x: tf.Tensor, blockwise: bool = False) -> tf.Tensor:
        """``x [..., n_in]`` -> ``[..., n_out]``. ``blockwise``: ``x`` is ``[nblocks, block, n_in]`` and each block
        is its own GEMM (one BatchMatMul; see :func:`blocked`), else the leading dimensions are flattened into
        one GEMM."""
        if x.shape.rank == 2 or blockwise:
            return tf.matmul(x, self.w) + self.b
        return tf.tensordot(x, self.w, axes=[[x.shape.rank - 1], [0]]) + self.b


class MLP(tf.Module):
    """Hidden layers with a shared activation, then one linear output layer of ``n_out`` units."""

    def __init__(self, sizes: Sequence[int], n_out: int, activation: str, rng: np.random.Generator,
                 init: str, name: str):
        super().__init__(name=name)
        self.activation = activation
        self.hidden = [Dense(a, b, rng, init, name=f"h{i}") for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
        self.out = Dense(sizes[-1], n_out, rng, init, name="out")

    def __call__(self, x: tf.Tensor, blockwise: bool = False) -> tf.Tensor:
        act = ACTIVATION_FNS[self.activation]
        x = tf.convert_to_tensor(x, tf.float32)
        for layer in self.hidden:
            x = act(layer(x, blockwise))
        return self.out(x, blockwise)

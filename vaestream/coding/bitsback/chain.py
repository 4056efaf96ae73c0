"""The schedule of a bits-back chain (:mod:`vaestream.coding.bitsback.coder`): its group sizes, the slower ramp a
frame coded with a pixel context model needs, and the deterministic initial stack it starts from."""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from vaestream.coding.bitsback.latents import posterior_kl_nats


def group_sizes(n: int, group: int, ramp: int = 0) -> list[int]:
    """The chain's group sizes for ``n`` records: a ramp from 1 up to ``group``, then ``group`` (the last one
    shorter): only the first group, one record, borrows initial bits. Each ramp step grows the size ``s`` by
    ``max(1, s >> ramp)``: ``ramp`` 0 doubles it (1, 2, 4, ...), ``ramp`` r by a factor of about 1 + 2^-r
    (:func:`chain_ramp` says why a chain may need that)."""
    sizes, s, left = [], 1, n
    while left > 0:
        k = min(s, left)
        sizes.append(k)
        left -= k
        s = min(s + max(1, s >> ramp), group)
    return sizes


MAX_RAMP = 7
"""The slowest ramp a frame may ask for: sizes grow by 1/128 per group."""


def chain_ramp(mean: np.ndarray, std: np.ndarray, latent_bits: int, range_bits: int, margin: float = 0.75) -> int:
    """The ramp (:func:`group_sizes`) a frame coded with a pixel context model needs, from its posteriors
    (``mean``, ``std`` in buckets, ``[n * Nz]`` each, as
    :meth:`vaestream.coding.bitsback.coder.LosslessCoder._posterior` gives them).

    Group ``t + 1`` pops its latents from the top of the stack: first the ~``g_t (H + KL)`` bits group ``t``'s
    latents wrote with the prior (``H`` the posterior's entropy on the grid, ``KL`` its divergence from the
    prior, bits per record), then group ``t``'s pixels. A context model pushes a picture's first (background)
    positions, position-major, within 2^-20 of probability 1: thousands of symbols that add almost no bits and
    leave the ANS state's low bits unmixed, so latents popped there miss Q (Fashion-MNIST, K = 3, doubling
    groups: z-scores spread 1.6-2.2, 315 instead of 292 bits per image). So a group may outgrow the previous
    one only by what the prior code leaves over, ``g_{t+1} H <= g_t (H + KL)``: a factor ``1 + 2^-r <= 1 +
    margin KL / H``. Returns the smallest such ``r`` (0 when doubling is safe, at most :data:`MAX_RAMP`)."""
    kl = float(np.sum(posterior_kl_nats(mean, std, latent_bits, range_bits))) / np.log(2.0)
    h = float(np.sum(np.maximum(np.log2(np.asarray(std) * np.sqrt(2.0 * np.pi * np.e)), 0.0)))
    if h <= 0.0 or margin * kl >= h:
        return 0
    return int(min(MAX_RAMP, np.ceil(np.log2(h / (margin * max(kl, 1e-9))))))


def seed_words(count: int) -> np.ndarray:
    """The deterministic initial ANS stack: ``count`` uint32 words, SHA-256 in counter mode over a fixed label
    (the same on every machine and NumPy version), each with its lowest bit set so none is zero."""
    blocks = (hashlib.sha256(b"vaestream lossless seed" + struct.pack("<I", i)).digest()
              for i in range((count + 7) // 8))
    words = np.frombuffer(b"".join(blocks), "<u4")[:count].astype(np.uint32)
    return words | np.uint32(1)

"""Pixel context models: a spatially autoregressive likelihood for near-lossless bits-back coding.

The bits-back member codes a level image (each count rounded to one of K levels,
:mod:`vaestream.coding.bitsback.coder`) with pixels independent given z: ``P(l | z) = prod_p P_base(l_p | z)``, the
beta-binomial's mass over each level's counts. A :class:`ContextModel` (one per K) makes it autoregressive in
raster order,

    P(l | z) = prod_p P(l_p | z, l_<p),     log P(l_p = k | z, l_<p) = log softmax_k( log P_base(k | z) + f_k(c_p) ),

where ``f`` is a small MLP and ``c_p`` the *context* of pixel p (:meth:`ContextModel.features`):

* the levels of its causal neighbours in a ``window x window`` square (the rows above, and the pixels to its
  left): one-hot, all zero outside the picture;
* its own base log-probabilities ``log P_base(. | z)`` (K values);
* the base expected level ``sum_k k P_base(k | z)`` of every pixel of the full window (z is known before any
  pixel is decoded, so the window may look ahead there).

The decoder network's z describes the picture's shape; the context describes what it cannot, the texture and
the exact course of edges. On 2,000 Fashion-MNIST test images at K = 6 a 7 x 7 context took the pixels' code
from 510 to ~390 bits per image (benchmarks/RESULTS_coder.md). The member itself was trained for
pixels independent given z; :mod:`vaestream.coder_training.joint` fine-tunes it together with its context model, so
that its z stops paying for what the context predicts.

**Coding.** The encoder knows every level, so it computes every pixel's context at once and pushes the
group's pixels in one call, in *position-major* order (pixel 0 of every record of the group, then pixel 1, ...).
The decoder pops them one position at a time for the whole group, each position's rows computed from the
levels it has already popped: ``H x W`` small network calls per group instead of one.

**Determinism.** The decoder must rebuild exactly the encoder's rows. Every input of ``f`` is an integer in
units of 2^-8 (one-hot levels as 256; log-probabilities and expectations rounded to 2^-8, through elementwise
ufuncs only), ``f`` runs as an :class:`vaestream.coding.bitsback.exact_mlp.ExactMLP` (exact products: the same result
for one row or a million), the logits are rounded to 2^-12 and the softmax is elementwise with a sum over K in
a fixed order. A pixel's rows therefore depend only on its own context, never on the batch, the group size or
the thread count (tested).

**Learned reconstruction.** A context model may also carry a *reconstruction network* ``r`` (trained by
:func:`vaestream.coder_training.context.train_reconstruction`), for ``reconstruction="learned"``: the decoder,
once a level image is decoded, returns for each pixel

    n_hat_p = clip( rint( m_p + RECON_SCALE r(d_p) ),  the counts of level l_p ),

where ``m_p = E[n_p | l_p, z]`` is the base model's mean within the level (``reconstruction="mean"``) and ``d_p``
the levels (one-hot) and the means ``m`` of the *whole* ``window x window`` square around p (decoding is over, so
the window may look ahead). It is an MMSE estimate of the count from its neighbourhood: Fashion-MNIST at K = 4,
25.4 -> 26.5 dB at the same bits (benchmarks/RESULTS_coder.md). The bits do not change; the output stays within
the level's counts. It is evaluated like ``f`` (integer features, exact products), so a pixel's output depends on
its neighbourhood alone.

**Identity.** A stream coded with a context model carries ``sha256(model fingerprint | context digest)`` as its
fingerprint (:func:`stream_fingerprint`), so it is decoded only by a coder that holds that very context model;
every frame also flags it. The digest is the likelihood network's, or, for a ``reconstruction="learned"``
stream, that and the reconstruction network's: adding a reconstruction network to a context model leaves the
streams it coded before decodable. The files live beside the model: ``MODEL_DIR/context/levels-K.npz``
(:meth:`ContextModel.save`, :func:`load_contexts`); ``vaestream train-context`` trains them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from vaestream.coding.bitsback.tables import level_spans
from vaestream.errors import ConfigError, ModelError

FEATURE_BITS = 8
"""Context features are integers in units of 2^-FEATURE_BITS."""
LOGIT_BITS = 12
"""Logits are rounded to 2^-LOGIT_BITS before the softmax."""
MIN_LOG_PROB = -30.0 * np.log(2.0)
"""Base probabilities are floored at 2^-30 before their log is taken."""
CONTEXT_DIR = "context"
DEFAULT_WINDOW = 7
DEFAULT_HIDDEN = (96, 96)
ACTIVATION = "elu"
RECON_SCALE = 32.0
"""The reconstruction network's output is a correction to E[n | level, z] in units of 32 counts."""
DEFAULT_RECON_WINDOW = 7
DEFAULT_RECON_HIDDEN = (64, 64)


def context_path(model_dir: str | os.PathLike, levels: int) -> Path:
    """Where the context model for K = ``levels`` of ``model_dir`` lives."""
    return Path(model_dir) / CONTEXT_DIR / f"levels-{int(levels)}.npz"


def causal_offsets(window: int) -> list[tuple[int, int]]:
    """The (dy, dx) of a pixel's causal neighbours in a ``window x window`` square, raster order: the rows
    above it, then the pixels to its left."""
    c = window // 2
    return [(dy, dx) for dy in range(-c, 0) for dx in range(-c, c + 1)] + [(0, dx) for dx in range(-c, 0)]


def window_offsets(window: int) -> list[tuple[int, int]]:
    """The (dy, dx) of every pixel of a ``window x window`` square around a pixel, raster order."""
    c = window // 2
    return [(dy, dx) for dy in range(-c, c + 1) for dx in range(-c, c + 1)]


def num_features(window: int, levels: int) -> int:
    """Context features per pixel: K per causal neighbour, one per pixel of the window, K of its own."""
    return len(causal_offsets(window)) * int(levels) + int(window) ** 2 + int(levels)


def recon_features(window: int, levels: int) -> int:
    """Reconstruction features per pixel: K per pixel of the window (one-hot levels), one per pixel of the
    window (E[n | level, z])."""
    return int(window) ** 2 * (int(levels) + 1)


def one_hot(levels: np.ndarray, k: int) -> np.ndarray:
    """Levels (int, -1 for none) ``[...]`` -> float64 one-hot ``[..., k]`` (all zero for -1), by a look-up."""
    eye = _EYES.get(k)
    if eye is None:
        eye = _EYES[k] = np.vstack([np.zeros((1, k)), np.eye(k)])
    return np.take(eye, levels + 1, axis=0)


_EYES: dict[int, np.ndarray] = {}


def split_first_layer(layers, n_lookup: int):
    """A network ``layers`` in exact arithmetic, its first layer split in two: the first ``n_lookup`` input rows,
    those of one-hot features, as a look-up table (``rint(W 2^s) 2^8``, a one-hot being 2^8, plus a zero row
    for "none"), and the other rows, integers ``rint(W 2^s)`` for a product. Their sum is the first layer's exact
    product whatever the split (see :class:`vaestream.coding.bitsback.exact_mlp.ExactMLP`). Returns ``(lookup, dense, s,
    b1 float64, the activation, ExactMLP of the other layers)``."""
    from vaestream.coding.bitsback.exact_mlp import ExactMLP, activation, quantize_weights

    w1q, s, _ = quantize_weights(layers[0][0])
    lookup = np.vstack([np.ldexp(w1q[:n_lookup], FEATURE_BITS), np.zeros((1, w1q.shape[1]))])
    return (lookup, np.ascontiguousarray(w1q[n_lookup:]), s, layers[0][1].astype(np.float64),
            activation(ACTIVATION), ExactMLP.from_layers(layers[1:], ACTIVATION))


def base_terms(level_probs: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The base model's rows ``P_base(k | z)`` (float ``[N, K]``, one row per pixel) -> (``log P`` as integers
    in units of 2^-8, int64 ``[N, K]``; the expected level ``sum_k k P`` in units of 2^-8, int64 ``[N]``).
    Elementwise ufuncs and a sum in a fixed order only, so the result for a pixel depends on its row alone."""
    p = np.asarray(level_probs, np.float64)
    logp = np.rint(np.ldexp(np.maximum(np.log(np.maximum(p, 2.0 ** -30)), MIN_LOG_PROB), FEATURE_BITS))
    e = np.zeros(p.shape[0], np.float64)
    for k in range(1, int(levels)):
        e = e + k * p[:, k]
    return logp.astype(np.int64), np.rint(np.ldexp(e, FEATURE_BITS)).astype(np.int64)


@dataclass
class ContextModel:
    """The context network for K = ``levels`` on pictures of ``shape`` (see the module docstring).

    ``layers``: ``[(W [n_in, n_out], b [n_out]), ...]`` float32, ELU between them; the last layer gives K
    logit offsets. ``window`` (odd) is the side of the square the context is taken from. ``recon``, if given:
    the reconstruction network's layers (``recon_features(recon_window, K)`` inputs, one output; see the
    module docstring), trained by :func:`vaestream.coder_training.context.train_reconstruction`."""

    levels: int
    shape: tuple[int, int]
    window: int
    layers: list[tuple[np.ndarray, np.ndarray]]
    meta: dict = field(default_factory=dict)
    recon: list[tuple[np.ndarray, np.ndarray]] | None = None
    recon_window: int = DEFAULT_RECON_WINDOW

    def __post_init__(self):
        self.levels, self.window = int(self.levels), int(self.window)
        self.shape = tuple(int(s) for s in self.shape)
        if self.window < 3 or self.window % 2 == 0:
            raise ConfigError(f"context window must be odd and at least 3, got {self.window}")
        if len(self.shape) != 2:
            raise ConfigError(f"context models are for pictures [H, W], got shape {self.shape}")
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in self.layers]
        if self.layers[0][0].shape[0] != self.num_features or self.layers[-1][0].shape[1] != self.levels:
            raise ModelError(f"context model for K = {self.levels}: layer shapes {[w.shape for w, _ in self.layers]} "
                             f"do not fit {self.num_features} features and {self.levels} levels")
        self.recon_window = int(self.recon_window)
        if self.recon is not None:
            self.recon = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in self.recon]
            n_in = recon_features(self.recon_window, self.levels)
            if (self.recon_window < 1 or self.recon_window % 2 == 0 or self.recon[0][0].shape[0] != n_in
                    or self.recon[-1][0].shape[1] != 1):
                raise ModelError(f"reconstruction network for K = {self.levels}: layer shapes "
                                 f"{[w.shape for w, _ in self.recon]} do not fit a {self.recon_window} x "
                                 f"{self.recon_window} window ({n_in} features) and one output")
        self.offsets = causal_offsets(self.window)
        self.full_offsets = window_offsets(self.window)
        c = self.window // 2
        # the offsets as index arrays into the padded pictures (causal; whole window)
        self._causal_at = tuple(np.array(a) + c for a in zip(*self.offsets))
        self._window_at = tuple(np.array(a) + c for a in zip(*self.full_offsets))
        self._lookup_base = np.arange(len(self.offsets)) * self.levels
        self._exact = None
        self._recon_exact = None
        self._plain = None
        self._digest = None

    @property
    def num_features(self) -> int:
        """Context features per pixel (:func:`num_features`)."""
        return num_features(self.window, self.levels)

    # -- identity and files --------------------------------------------------------------------------------
    def digest(self) -> str:
        """SHA-256 (hex) of the description and every weight's little-endian float32 bytes, the reconstruction
        network's included (what a ``reconstruction="learned"`` stream names)."""
        if self._digest is None:
            self._digest = self._compute_digest()
        return self._digest

    def likelihood_digest(self) -> str:
        """The digest of the likelihood network alone (what other streams coded with this model name): adding a
        reconstruction network to a context model leaves the streams it coded before decodable."""
        return self.without_reconstruction().digest()

    def without_reconstruction(self) -> "ContextModel":
        """This context model without its reconstruction network (itself if it has none)."""
        if self.recon is None:
            return self
        if self._plain is None:
            meta = {k: v for k, v in self.meta.items() if k != "reconstruction"}
            self._plain = ContextModel(self.levels, self.shape, self.window, self.layers, meta)
        return self._plain

    def _compute_digest(self) -> str:
        desc = {"levels": self.levels, "shape": list(self.shape), "window": self.window, "activation": ACTIVATION,
                "feature_bits": FEATURE_BITS, "logit_bits": LOGIT_BITS}
        if self.recon is not None:
            desc.update(recon_window=self.recon_window, recon_scale=RECON_SCALE)
        h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
        for w, b in self.layers + (self.recon or []):
            for a in (w, b):
                a = np.ascontiguousarray(a, "<f4")
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
        return h.hexdigest()

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write ``MODEL_DIR/context/levels-K.npz`` (atomically) and return its path."""
        path = context_path(model_dir, self.levels)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"w{i}": w for i, (w, _) in enumerate(self.layers)}
        arrays.update({f"b{i}": b for i, (_, b) in enumerate(self.layers)})
        if self.recon is not None:
            arrays.update({f"rw{i}": w for i, (w, _) in enumerate(self.recon)})
            arrays.update({f"rb{i}": b for i, (_, b) in enumerate(self.recon)})
        info = {"levels": self.levels, "shape": list(self.shape), "window": self.window, "meta": self.meta,
                "recon_window": self.recon_window}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, info=np.frombuffer(json.dumps(info).encode(), np.uint8), **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ContextModel":
        """Read a context model written by :meth:`save`; a damaged file raises :class:`ModelError`."""
        try:
            with np.load(path) as z:
                info = json.loads(bytes(z["info"]).decode())
                n = sum(1 for k in z.files if k.startswith("w"))
                layers = [(z[f"w{i}"], z[f"b{i}"]) for i in range(n)]
                nr = sum(1 for k in z.files if k.startswith("rw"))
                recon = [(z[f"rw{i}"], z[f"rb{i}"]) for i in range(nr)] or None
            return cls(info["levels"], tuple(info["shape"]), info["window"], layers, info.get("meta", {}), recon,
                       info.get("recon_window", DEFAULT_RECON_WINDOW))
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: not a readable context model ({e})") from None

    # -- the network ---------------------------------------------------------------------------------------
    def features(self, lv_pad: np.ndarray, e_pad: np.ndarray, logp: np.ndarray, rows: np.ndarray,
                 cols: np.ndarray) -> np.ndarray:
        """Context features of the pixels at (``rows``, ``cols``) (int arrays ``[P]``) of every record:
        float64 ``[g * P, F]``, integers in units of 2^-8, record-major.

        ``lv_pad``: int ``[g, H + 2c, W + 2c]``, the levels padded by c = window // 2 with -1 (so are pixels not
        yet decoded); ``e_pad``: int64 likewise, the expected levels (0 in the padding); ``logp``: int64
        ``[g, P, K]``, the pixels' own base log-probabilities."""
        c, k = self.window // 2, self.levels
        g, n = lv_pad.shape[0], len(rows)
        out = np.empty((g, n, self.num_features), np.float64)
        one = float(1 << FEATURE_BITS)
        at = 0
        for dy, dx in self.offsets:
            nb = lv_pad[:, rows + c + dy, cols + c + dx]                       # [g, P], -1: none
            out[:, :, at:at + k] = (nb[:, :, None] == np.arange(k)) * one
            at += k
        for dy, dx in self.full_offsets:
            out[:, :, at] = e_pad[:, rows + c + dy, cols + c + dx]
            at += 1
        out[:, :, at:] = logp
        return out.reshape(g * n, -1)

    def _net(self):
        """The network in exact arithmetic (:func:`split_first_layer`): the causal one-hot rows as a look-up
        (``wc[o K + level]``, with a zero row for "no neighbour"), the rest as a product."""
        if self._exact is None:
            self._exact = split_first_layer(self.layers, len(self.offsets) * self.levels)
        return self._exact

    def _dense_part(self, e_pad: np.ndarray, logp: np.ndarray) -> np.ndarray:
        """The first layer's integer product over the inputs known from z alone (the window's expected levels,
        the pixel's own log-probs), for every pixel: float64 ``[g, D, hidden]``."""
        wr = self._net()[1]
        rr, cc = np.divmod(np.arange(self.shape[0] * self.shape[1]), self.shape[1])
        dy, dx = self._window_at
        win = e_pad[:, rr[:, None] + dy[None, :], cc[:, None] + dx[None, :]]          # [g, D, window^2]
        x = np.concatenate([win, logp], axis=2).astype(np.float64)
        return (x.reshape(-1, x.shape[2]) @ wr).reshape(x.shape[0], x.shape[1], -1)

    def _finish(self, h1: np.ndarray, logp: np.ndarray) -> np.ndarray:
        """First-layer integer sums ``[N, hidden]`` and base log-probs ``[N, K]`` -> rows ``[N, K]``."""
        _, _, s, b1, act, rest = self._net()
        off = rest(act(np.ldexp(h1, -(FEATURE_BITS + s)) + b1), real_input=True)
        lq = np.rint(np.ldexp(off, LOGIT_BITS)).astype(np.int64) + (logp << (LOGIT_BITS - FEATURE_BITS))
        lq -= lq.max(axis=1, keepdims=True)
        ex = np.exp(np.ldexp(lq.astype(np.float64), -LOGIT_BITS))
        tot = ex[:, 0].copy()
        for j in range(1, self.levels):
            tot = tot + ex[:, j]
        return ex / tot[:, None]

    def _causal_index(self, nb: np.ndarray) -> np.ndarray:
        """Neighbour levels ``[..., n_offsets]`` (-1: none) -> rows of the look-up table."""
        return np.where(nb >= 0, self._lookup_base + nb, len(self.offsets) * self.levels)

    # -- whole groups ----------------------------------------------------------------------------------------
    def _pads(self, level_probs: np.ndarray, g: int, lv: np.ndarray | None):
        h, w = self.shape
        c = self.window // 2
        logp, e = base_terms(level_probs, self.levels)
        e_pad = np.zeros((g, h + 2 * c, w + 2 * c), np.int64)
        e_pad[:, c:c + h, c:c + w] = e.reshape(g, h, w)
        lv_pad = np.full((g, h + 2 * c, w + 2 * c), -1, np.int64)
        if lv is not None:
            lv_pad[:, c:c + h, c:c + w] = lv.reshape(g, h, w)
        return lv_pad, e_pad, logp.reshape(g, h * w, self.levels)

    def rows_all(self, level_probs: np.ndarray, levels_img: np.ndarray, chunk: int = 16) -> np.ndarray:
        """Every pixel's rows for known level images (the encoder): ``level_probs`` ``[g * D, K]`` (the base
        rows), ``levels_img`` int ``[g * D]`` -> float64 ``[g, D, K]``."""
        h, w = self.shape
        d = h * w
        g = len(levels_img) // d
        lv_pad, e_pad, logp = self._pads(level_probs, g, levels_img)
        wc = self._net()[0]
        dy, dx = self._causal_at
        rr, cc = np.divmod(np.arange(d), w)
        out = np.empty((g, d, self.levels), np.float64)
        for s in range(0, g, chunk):
            sl = slice(s, s + chunk)
            h1 = self._dense_part(e_pad[sl], logp[sl])
            nb = lv_pad[sl][:, rr[:, None] + dy[None, :], cc[:, None] + dx[None, :]]         # [n, D, offsets]
            onehot = one_hot(nb, self.levels).reshape(-1, len(self.offsets) * self.levels)
            h1 += (onehot @ wc[:-1]).reshape(h1.shape)  # = the look-up's sum, exactly
            out[sl] = self._finish(h1.reshape(-1, h1.shape[2]), logp[sl].reshape(-1, self.levels)).reshape(
                -1, d, self.levels)
        return out

    def decode_group(self, level_probs: np.ndarray, g: int, pop: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Decode one group's level images position by position: ``pop(rows [g, K]) -> levels [g]`` takes each
        position's symbols off the stream. Returns int32 ``[g * D]``, record-major."""
        h, w = self.shape
        c = self.window // 2
        lv_pad, e_pad, logp = self._pads(level_probs, g, None)
        dense = self._dense_part(e_pad, logp)
        wc = self._net()[0]
        dy, dx = self._causal_at
        for p in range(h * w):
            i, j = divmod(p, w)
            h1 = dense[:, p] + wc[self._causal_index(lv_pad[:, i + dy, j + dx])].sum(axis=1)
            lv_pad[:, i + c, j + c] = pop(self._finish(h1, logp[:, p]))
        return lv_pad[:, c:c + h, c:c + w].reshape(-1).astype(np.int32)

    # -- learned reconstruction ------------------------------------------------------------------------------
    @property
    def has_reconstruction(self) -> bool:
        """Whether this context model carries a reconstruction network (``reconstruction="learned"``)."""
        return self.recon is not None

    def with_reconstruction(self, recon, recon_window: int, meta: Mapping | None = None) -> "ContextModel":
        """This context model with the reconstruction network ``recon`` (layers) on a ``recon_window`` square; the
        likelihood's layers are unchanged, the digest is not (it covers both networks)."""
        return ContextModel(self.levels, self.shape, self.window, self.layers,
                            {**self.meta, **({"reconstruction": dict(meta)} if meta else {})}, recon, recon_window)

    def reconstruct(self, levels_img: np.ndarray, means: np.ndarray, chunk: int = 16) -> np.ndarray:
        """Decoded level images ``levels_img`` (int ``[g * D]``, record-major) and their base means ``means`` =
        E[n | level, z] (uint8 ``[g * D]``, :func:`vaestream.coding.bitsback.tables.level_means`) -> the learned
        reconstruction, uint8 ``[g * D]``, each count among its level's counts (see the module docstring).

        Exact: integer features (one-hot levels as a look-up, the means in counts), exact products, elementwise
        rounding and clipping, so a pixel's output depends on its window alone, not on ``g`` or ``chunk``."""
        if self.recon is None:
            raise ConfigError(f"the context model for K = {self.levels} has no reconstruction network "
                              "(vaestream train-context trains one)")
        if self._recon_exact is None:
            n_look = self.recon_window ** 2 * self.levels
            c = self.recon_window // 2
            at = tuple(np.array(a) + c for a in zip(*window_offsets(self.recon_window)))
            self._recon_exact = (split_first_layer(self.recon, n_look), at, *level_spans(self.levels))
        (look, dense_w, s, b1, act, rest), (dy, dx), lo, hi = self._recon_exact
        h, w = self.shape
        c, k = self.recon_window // 2, self.levels
        lv = np.asarray(levels_img, np.int64).reshape(-1, h, w)
        m = np.asarray(means, np.int64).reshape(-1, h, w)
        g = lv.shape[0]
        rr, cc = np.divmod(np.arange(h * w), w)
        out = np.empty((g, h * w), np.uint8)
        for s0 in range(0, g, chunk):
            n = min(chunk, g - s0)
            lv_pad = np.full((n, h + 2 * c, w + 2 * c), -1, np.int64)
            lv_pad[:, c:c + h, c:c + w] = lv[s0:s0 + n]
            m_pad = np.zeros((n, h + 2 * c, w + 2 * c), np.float64)
            m_pad[:, c:c + h, c:c + w] = m[s0:s0 + n]
            nb = lv_pad[:, rr[:, None] + dy[None, :], cc[:, None] + dx[None, :]].reshape(n * h * w, -1)
            mw = m_pad[:, rr[:, None] + dy[None, :], cc[:, None] + dx[None, :]].reshape(n * h * w, -1)
            h1 = one_hot(nb, k).reshape(n * h * w, -1) @ look[:-1] + mw @ dense_w
            y = rest(act(np.ldexp(h1, -(FEATURE_BITS + s)) + b1), real_input=True)[:, 0]
            own = lv[s0:s0 + n].reshape(-1)
            est = np.rint(m[s0:s0 + n].reshape(-1) + RECON_SCALE * y)
            out[s0:s0 + n] = np.clip(est, lo[own], hi[own]).astype(np.uint8).reshape(n, h * w)
        return out.reshape(-1)


def load_contexts(model_dir: str | os.PathLike) -> dict[int, ContextModel]:
    """Every context model beside the model in ``model_dir`` (``{K: ContextModel}``; empty if none)."""
    d = Path(model_dir) / CONTEXT_DIR
    out = {}
    if d.is_dir():
        for p in sorted(d.glob("levels-*.npz")):
            cm = ContextModel.load(p)
            out[cm.levels] = cm
    return out


def stream_fingerprint(model_fingerprint: str, context: ContextModel, learned: bool = False) -> str:
    """The fingerprint a stream coded with ``context`` carries: SHA-256 (hex) of the model's and the context's
    likelihood's digest, or with ``learned`` (``reconstruction="learned"``) of its full digest, reconstruction
    network included."""
    digest = context.digest() if learned else context.likelihood_digest()
    return hashlib.sha256(f"vaestream bits-back context|{model_fingerprint}|{digest}".encode()).hexdigest()


def stream_context(fingerprint: bytes, model_fingerprint: str,
                   contexts: Mapping[int, ContextModel] | None) -> tuple[bool, ContextModel | None]:
    """Whom a stream header's ``fingerprint`` (its first bytes) names: ``(True, None)`` the model itself,
    ``(True, cm)`` the model with the context model ``cm`` of ``contexts`` (with its reconstruction network if
    the stream names it, else :meth:`ContextModel.without_reconstruction`), ``(False, None)`` neither."""
    fp = bytes(fingerprint).hex()
    if model_fingerprint.startswith(fp):
        return True, None
    for cm in (contexts or {}).values():
        if cm.has_reconstruction and stream_fingerprint(model_fingerprint, cm, learned=True).startswith(fp):
            return True, cm
        if stream_fingerprint(model_fingerprint, cm).startswith(fp):
            return True, cm.without_reconstruction()
    return False, None

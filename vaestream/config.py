"""Model configuration: the one place that says what a model is.

A :class:`ModelConfig` is stored as ``config.json`` in every model directory and inside every export;
the model fingerprint hashes it together with the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from vaestream.errors import ConfigError

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_sigmoid", "beta_binomial")
"""Observation models p(x|z) (the paper's Appendix C):

* ``bernoulli`` — Bernoulli MLP decoder, for binary (or binarised) data in {0, 1}.
* ``gaussian_sigmoid`` — Gaussian MLP decoder whose mean goes through a sigmoid, for data in [0, 1]
  (as the paper's Frey Face model).
* ``gaussian`` — Gaussian MLP decoder with an unconstrained (linear) mean, for real-valued data.
* ``beta_binomial`` — a discrete model of 8-bit data: each pixel count n = round(255 x) in {0..255} is
  BetaBinomial(255, alpha(z), beta(z)); the likelihood the lossless (bits-back) coder needs.
"""

DISCRETE_LEVELS = 255
"""The ``beta_binomial`` decoder models counts 0..255 (8-bit data scaled to [0, 1] as x = n / 255)."""

ACTIVATIONS = ("tanh", "relu", "softplus", "elu", "sigmoid", "gdn")
"""Hidden activations; ``gdn`` (generalised divisive normalisation, :class:`vaestream.conv.GDN`) is for conv models
with a spatial latent."""

ARCHITECTURES = ("mlp", "conv")
"""``mlp``: the paper's MLP encoder and decoder. ``conv``: strided convolutions for picture records, then
the same dense layers to the same vector latent, or (``latent_channels``) a spatial latent map
(:mod:`vaestream.conv`)."""

ENTROPY_MODELS = ("factorized", "hyperprior")
"""Learned entropy models of a conv RD model with a spatial latent (:mod:`vaestream.entropy_models`):
``factorized`` (one learned density per latent map) or ``hyperprior`` (mean-scale: a hyper-latent per record
predicting each position's mean and scale). "" (the default): the latent's prior is N(0, I) and the codec's
per-position tables code it (:mod:`vaestream.coding.tables`)."""

_ADDED_DEFAULTS = {"arch": "mlp", "channels": (), "lmbda": None, "latent_channels": 0, "entropy_model": "",
                   "rd_lambdas": ()}
"""Fields added after models were first stored: left out of :meth:`ModelConfig.to_dict` while at these
values, so the config JSON, and with it the fingerprint of every model stored before them, is unchanged."""


def latent_grid(input_shape: tuple[int, ...], channels: tuple[int, ...]) -> tuple[int, int]:
    """(h, w) of the conv encoder's last feature map for pictures of ``input_shape``: each of the
    ``len(channels)`` stride-2 convolutions (SAME padding) halves H and W, rounding up (:mod:`vaestream.conv`
    builds its encoder on this grid)."""
    if len(input_shape) not in (2, 3):
        raise ConfigError(f"a conv model needs a picture input_shape (H, W) or (H, W, C), got {input_shape}")
    h, w = int(input_shape[0]), int(input_shape[1])
    for _ in channels:
        h, w = -(-h // 2), -(-w // 2)
    return h, w


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a VAE.

    Attributes:
      input_dim: D, the number of dimensions of a record (784 for MNIST).
      input_shape: the shape of one record, for pictures (e.g. ``(28, 28)``); its product is ``input_dim``.
      latent_dim: Nz, the number of latent dimensions.
      hidden: hidden-layer widths of the encoder MLP; the decoder mirrors them (the paper: one layer of 500).
      activation: hidden activation (the paper: ``tanh``); ``gdn`` for a conv model with a spatial latent.
      likelihood: one of :data:`LIKELIHOODS`.
      min_log_scale: floor of the Gaussian decoder's per-pixel log standard deviation (keeps the density
        bounded on data with constant pixels).
      arch: one of :data:`ARCHITECTURES`.
      channels: ``conv`` only: channels of the stride-2 convolutions of the encoder, in order (the decoder
        mirrors them); e.g. ``(32, 64)`` maps 28 x 28 to 7 x 7 x 64 before the dense layers ``hidden``.
      latent_channels: ``conv`` only: 0 (a vector latent behind the dense layers ``hidden``) or C > 0: a
        *spatial* latent, C maps over the encoder's last feature grid (a 3 x 3 convolution to the mean and
        log sigma maps; ``hidden`` must be empty and ``latent_dim`` = h * w * C, see :attr:`latent_shape`).
      lmbda: the rate-distortion trade-off lambda the model was trained for (loss = rate in bits +
        lambda x MSE, :func:`vaestream.objective.rd_loss`); None for a model trained on the ELBO. Models of
        one family differ in it, and ``vaestream compress --psnr`` reads it from here.
      top_latent_dim: 0 (the paper's model: one stochastic layer z, prior N(0, I)) or N2 > 0: a second,
        top stochastic layer z2 of N2 dimensions, x -> z -> z2 (a Markov chain, as Bit-Swap's): the prior of
        z becomes p(z | z2) = N(m(z2), diag s(z2)^2) with p(z2) = N(0, I), and the posterior q(z | x) q(z2 | z).
        ``latent_dim`` stays the size of z, the code the encoder returns.
      top_hidden: hidden widths of the two small MLPs between z and z2 (q(z2|z) and p(z|z2)).
      entropy_model: "" or one of :data:`ENTROPY_MODELS`: a learned entropy model of the spatial latent, trained
        end to end with the transform (``objective="rd"``; needs ``arch="conv"``, ``latent_channels``,
        activation ``relu`` and likelihood ``gaussian``, so that decoding is exact integer arithmetic).
      rd_lambdas: with ``entropy_model``: the lambdas of the model's rate levels, largest (finest) first; one
        model codes at each of them (a gain vector per level, :mod:`vaestream.entropy_models`).

    A config with ``top_latent_dim == 0`` stores no ``top_*`` keys, so one-layer models keep their
    ``config.json`` and their fingerprints.
    """

    input_dim: int = 784
    input_shape: tuple[int, ...] = (28, 28)
    latent_dim: int = 20
    hidden: tuple[int, ...] = (500,)
    activation: str = "tanh"
    likelihood: str = "bernoulli"
    min_log_scale: float = -4.0
    top_latent_dim: int = 0
    top_hidden: tuple[int, ...] = (256,)
    arch: str = "mlp"
    channels: tuple[int, ...] = ()
    lmbda: float | None = None
    latent_channels: int = 0
    entropy_model: str = ""
    rd_lambdas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "top_hidden", tuple(int(h) for h in self.top_hidden))
        if self.top_latent_dim < 0 or any(h < 1 for h in self.top_hidden):
            raise ConfigError(f"top_latent_dim must be >= 0 and top_hidden widths positive, got "
                              f"{self.top_latent_dim}, {self.top_hidden}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.lmbda is not None:
            object.__setattr__(self, "lmbda", float(self.lmbda))
            if not (self.lmbda > 0 and self.lmbda < float("inf")):
                raise ConfigError(f"lmbda must be a positive number, got {self.lmbda}")
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch {self.arch!r} is not one of {ARCHITECTURES}")
        if self.arch == "conv":
            if len(self.input_shape) not in (2, 3) or not self.channels or any(c < 1 for c in self.channels):
                raise ConfigError(f"arch 'conv' needs a picture input_shape (H, W) or (H, W, C) and positive "
                                  f"channels, got {self.input_shape} and {self.channels}")
        elif self.channels:
            raise ConfigError(f"channels {self.channels} are for arch 'conv', not {self.arch!r}")
        object.__setattr__(self, "latent_channels", int(self.latent_channels))
        if self.latent_channels:
            if self.arch != "conv" or self.latent_channels < 0:
                raise ConfigError(f"latent_channels {self.latent_channels} (a spatial latent) needs arch 'conv' and "
                                  "a positive number of latent maps")
            h, w, c = self.latent_shape
            if self.latent_dim != h * w * c:
                raise ConfigError(f"a spatial latent of {c} maps over the encoder's {h} x {w} grid has "
                                  f"{h * w * c} dimensions, but latent_dim is {self.latent_dim}")
            if self.hidden:
                raise ConfigError(f"hidden {self.hidden}: a spatial latent (latent_channels {self.latent_channels}) "
                                  "has no dense layers; pass hidden=()")
        if self.hierarchical and self.arch != "mlp":
            raise ConfigError(f"a second stochastic layer (top_latent_dim {self.top_latent_dim}) is for arch 'mlp', "
                              f"not {self.arch!r}")
        if self.input_dim < 1 or self.latent_dim < 1:
            raise ConfigError(f"input_dim and latent_dim must be positive, got {self.input_dim}, {self.latent_dim}")
        prod = 1
        for s in self.input_shape:
            prod *= s
        if prod != self.input_dim:
            raise ConfigError(f"input_shape {self.input_shape} has {prod} elements, input_dim is {self.input_dim}")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden widths must be positive, got {self.hidden}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.activation == "gdn" and not self.latent_channels:
            raise ConfigError("activation 'gdn' normalises feature maps: it needs arch 'conv' with a spatial latent "
                              "(latent_channels > 0); dense layers take a pointwise activation")
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood {self.likelihood!r} is not one of {LIKELIHOODS}")
        self._check_entropy_model()

    def _check_entropy_model(self) -> None:
        object.__setattr__(self, "rd_lambdas", tuple(float(v) for v in self.rd_lambdas))
        if not self.entropy_model:
            if self.rd_lambdas:
                raise ConfigError("rd_lambdas (rate levels) are for a learned entropy model (entropy_model)")
            return
        if self.entropy_model not in ENTROPY_MODELS:
            raise ConfigError(f"entropy_model {self.entropy_model!r} is not one of {ENTROPY_MODELS}")
        if not self.latent_channels or self.activation != "relu" or self.likelihood != "gaussian":
            raise ConfigError(f"entropy_model {self.entropy_model!r} needs arch 'conv' with a spatial latent "
                              "(latent_channels), activation 'relu' and likelihood 'gaussian' (its decoder is "
                              f"exact integer arithmetic); got latent_channels {self.latent_channels}, activation "
                              f"{self.activation!r}, likelihood {self.likelihood!r}")
        lams = self.rd_lambdas
        if not lams or any(not (0 < v < float("inf")) for v in lams) or list(lams) != sorted(set(lams), reverse=True):
            raise ConfigError(f"entropy_model needs rd_lambdas: distinct positive lambdas, largest first; got {lams}")

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        """A spatial latent's ``(h, w, latent_channels)``: the encoder's last feature grid (each stride-2
        convolution halves H and W, rounding up) and the number of latent maps; None for a vector latent.
        The code is that map flattened in (h, w, c) order: ``latent_dim = h * w * latent_channels``."""
        if not self.latent_channels:
            return None
        return latent_grid(self.input_shape, self.channels) + (self.latent_channels,)

    def for_input_shape(self, input_shape: tuple[int, ...]) -> "ModelConfig":
        """This config for records of ``input_shape`` (``input_dim`` its product; a spatial latent's
        ``latent_dim`` follows the new grid)."""
        shape = tuple(int(s) for s in input_shape)
        kw: dict[str, Any] = {"input_dim": math.prod(shape), "input_shape": shape}
        if self.latent_channels:
            h, w = latent_grid(shape, self.channels)
            kw["latent_dim"] = h * w * self.latent_channels
        return dataclasses.replace(self, **kw)

    @property
    def hierarchical(self) -> bool:
        """Whether the model has a second, top stochastic layer (``top_latent_dim > 0``)."""
        return self.top_latent_dim > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["hidden"] = list(self.hidden)
        d["channels"] = list(self.channels)
        d["rd_lambdas"] = list(self.rd_lambdas)
        if self.top_latent_dim:
            d["top_hidden"] = list(self.top_hidden)
        else:  # a one-layer model's config.json (and fingerprint) as before the option existed
            del d["top_latent_dim"], d["top_hidden"]
        for k, default in _ADDED_DEFAULTS.items():
            if getattr(self, k) == default:
                del d[k]
        return d

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), also what the fingerprint hashes."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"model config is not valid JSON: {e}") from e

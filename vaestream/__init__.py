"""vaestream: streaming / online data compression with Auto-Encoding Variational Bayes."""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

from vaestream import _moved

_moved.install()  # before anything imports an old module path
from vaestream.coding.codec import load
from vaestream.config import ModelConfig
from vaestream.errors import (BitstreamError, ConfigError, DataError, ModelError, ModelMismatchError,
                              VaestreamError)
from vaestream.model import VAE
from vaestream.store import load_model
from vaestream.training import TrainConfig, Trainer, train

__version__ = "0.1.0"


def __getattr__(name: str):
    """``vaestream.coding.codec`` and the other moved module paths (see :mod:`vaestream._moved`), with a warning."""
    return _moved.module_getattr(__name__, name)


__all__ = ["codec", "load", "ModelConfig", "VAE", "TrainConfig", "Trainer", "train", "load_model", "VaestreamError", "DataError",
           "ConfigError", "ModelError", "BitstreamError", "ModelMismatchError"]

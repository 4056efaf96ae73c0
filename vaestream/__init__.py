"""vaestream: streaming / online data compression with Auto-Encoding Variational Bayes."""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

from vaestream import codec
from vaestream.codec import load
from vaestream.config import ModelConfig
from vaestream.errors import (BitstreamError, ConfigError, DataError, ModelError, ModelMismatchError,
                              VaestreamError)
from vaestream.model import VAE
from vaestream.store import load_model
from vaestream.training import TrainConfig, Trainer, train

__version__ = "0.1.0"

__all__ = ["codec", "load", "ModelConfig", "VAE", "TrainConfig", "Trainer", "train", "load_model", "VaestreamError", "DataError",
           "ConfigError", "ModelError", "BitstreamError", "ModelMismatchError"]

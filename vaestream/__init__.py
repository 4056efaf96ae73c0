"""vaestream: streaming / online data compression with Auto-Encoding Variational Bayes.

The package imports lazily: ``import vaestream`` (and ``vaestream --help``) loads neither TensorFlow nor Beam;
``vaestream.VAE``, ``vaestream.train`` and the other names below import their module on first use.
"""

import importlib as _importlib
import importlib.util as _importlib_util
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter, whenever it is imported

from vaestream.errors import (BitstreamError, ConfigError, DataError, ModelError, ModelMismatchError,  # noqa: E402
                              VaestreamError)

__version__ = "0.1.0"

_LAZY = {"load": "vaestream.coding.codec", "ModelConfig": "vaestream.config", "VAE": "vaestream.model",
         "load_model": "vaestream.store", "TrainConfig": "vaestream.training", "Trainer": "vaestream.training",
         "train": "vaestream.training", "open_stream": "vaestream.coding.streams"}
"""Public name -> the module that defines it, imported on first access."""


def __getattr__(name: str):
    """The lazily imported public names (:data:`_LAZY`) and the sub-modules."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(module), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    if _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        return _importlib.import_module(f"{__name__}.{name}")  # a sub-module, as ``import vaestream`` used to load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["load", "open_stream", "ModelConfig", "VAE", "TrainConfig", "Trainer", "train", "load_model",
           "VaestreamError", "DataError", "ConfigError", "ModelError", "BitstreamError", "ModelMismatchError"]

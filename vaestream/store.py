"""Model directories: ``config.json`` plus TensorFlow checkpoints under ``ckpt/``.

A model directory is what ``vaestream train`` writes and what every other command reads::

    MODEL_DIR/config.json        the ModelConfig (the one source of truth for the architecture)
    MODEL_DIR/train_config.json  how it was trained
    MODEL_DIR/ckpt/              tf.train.CheckpointManager checkpoints (model, optimizer, step)
    MODEL_DIR/log.jsonl          one JSON line per evaluation (step, samples, train/valid/test bound)
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from vaestream.config import ModelConfig
from vaestream.errors import ModelError
from vaestream.model import VAE

CONFIG = "config.json"
TRAIN_CONFIG = "train_config.json"
CKPT = "ckpt"
LOG = "log.jsonl"


def save_config(model_dir: str | Path, config: ModelConfig) -> None:
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    (Path(model_dir) / CONFIG).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def read_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise ModelError(f"{model_dir}: not a vaestream model directory (no {CONFIG})")
    return ModelConfig.from_json(path.read_text())


def load_model(model_dir: str | Path, checkpoint: str | None = None) -> VAE:
    """The VAE of a model directory, restored from its latest checkpoint (or ``checkpoint``)."""
    config = read_config(model_dir)
    model = VAE(config)
    path = checkpoint or tf.train.latest_checkpoint(str(Path(model_dir) / CKPT))
    if path is None:
        raise ModelError(f"{model_dir}: no checkpoint in {Path(model_dir) / CKPT}")
    try:
        tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        raise ModelError(f"{path}: checkpoint does not match {Path(model_dir) / CONFIG} ({e})") from e
    return model


def read_log(model_dir: str | Path) -> list[dict]:
    """The evaluation log of a model directory, one dict per line."""
    path = Path(model_dir) / LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

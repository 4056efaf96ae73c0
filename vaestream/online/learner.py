"""Online AEVB: keep training a VAE as new data files appear, and publish numbered model versions.

    learner = OnlineLearner("runs/online", registry="runs/registry", model_config=ModelConfig(hidden=(200,)))
    learner.follow("incoming/*.npy", poll_interval=1.0)        # or: learner.push(records) from your own code

**Minibatches from a replay buffer.** AEVB is a stochastic minibatch method, so it continues on a stream
as it does on a fixed set. For each new file of n records (after holding some out, below) the learner takes

    S = ceil(passes * n / m_new)        steps,     m_new = round(new_fraction * M)

each on a minibatch of M records: m_new drawn (without replacement, cycling) from the new file and M - m_new
drawn uniformly from a bounded replay buffer of the most recent ``buffer_size`` records (a ring: the oldest
are overwritten), so the model follows the stream without forgetting the recent past. The file's records
then enter the buffer. Memory is bounded by the buffer (uint8 for 8-bit data) and the hold-out set.

**Held-out bound and versions.** A deterministic fraction of every file (``holdout_fraction``, chosen by a
hash of the file and record index) is never trained on; the most recent ``holdout_size`` of those form the
held-out set (or the caller gives a fixed one). At each checkpoint (at most one a ``publish_interval``, 1 s, the
period at which model servers poll for versions) the learner computes the held-out mean
ELBO of the current model and of the last published one *on the same set*; when the current one is higher
by more than ``publish_min_improvement`` nats/record, it builds coder tables from the replay buffer and
publishes the model as the next version of the registry (:class:`vaestream.online.registry.Registry`, an export
base of :mod:`vaestream.serving.export`).

**At training speed.** A file's S minibatches are drawn as one array (:meth:`OnlineLearner.minibatches`) and go
through the compiled loop of batch training (:meth:`vaestream.training.Trainer.run_steps`), K =
``steps_per_call`` steps per call, the last chunk padded to K. The first call of a file is one XLA program that
first scores the whole file (the prequential bound, the file padded to a multiple of 256 records and masked)
and then takes the first K steps: one host call and one result copy per file for both, and one compile per
padded file size for the whole stream. The evaluation and export of a checkpoint run on a copy of its weights
on a background thread (:class:`vaestream.online.publisher.Publisher`: ~0.1 s per version, each after the first
reusing its saved graph; ``publish_share`` bounds its busy time, :meth:`OnlineLearner.warm_up` traces its programs
ahead); a checkpoint itself (model, optimizer, buffer, ledger) is a few tens of ms, its TF checkpoint after the
first one written by a cached ``SaveV2`` (:mod:`vaestream.online.checkpoints`; a file's parts and a checkpoint's
capture and commit: :mod:`vaestream.online.pipeline`). The rate of new records is bounded by the mix: each new
record costs ``passes / new_fraction`` training examples (2 with the defaults) and one forward pass for its
prequential score.

**Exactly-once input.** ``WORK/ledger.json`` lists the files whose effect is in the checkpoint it names,
and the replay buffer and hold-out set of that moment (``WORK/state-STEP.npz``). It is replaced atomically
after the checkpoint and state are written, so after a kill the learner restores *the ledger's* checkpoint
and state (not a newer, unledgered checkpoint) and processes every file not in the ledger: no file is lost
and none is counted twice. Minibatch sampling is seeded by ``(seed, files processed)`` and the z noise by
the step (:class:`vaestream.training.Trainer`), so the resumed run takes the same steps as an
uninterrupted one. A malformed file is recorded in the ledger as rejected (with the reason, also in
``WORK/dead_letter.jsonl``) and never retried.

**Drift.** Before training on a file the learner scores it with the current model (test-then-train: the
prequential mean ELBO and bits/record) and feeds that to a :class:`vaestream.online.drift.DriftMonitor`
(``WORK/drift.jsonl``), one window per file.

Layout of the work directory::

    WORK/model/            a vaestream model directory (config.json, train_config.json, ckpt/, coder_tables.npz)
    WORK/ledger.json       processed files, counters, the checkpoint and state file they belong to
    WORK/state-STEP.npz    replay buffer and hold-out records at that checkpoint
    WORK/log.jsonl         one line per file (records, steps, prequential bound, seconds) and per evaluation
    WORK/drift.jsonl       the drift monitor's windows
    WORK/dead_letter.jsonl rejected files and why
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vaestream import store
from vaestream.binio import atomic_write
from vaestream.config import ModelConfig
from vaestream.data import read_array, validate
from vaestream.online.checkpoints import CachedCheckpoints
from vaestream.online.following import Following
from vaestream.online.pipeline import Pipelined, file_id
from vaestream.online.publisher import Publisher, load_published
from vaestream.online.replay import ReplayBuffer
from vaestream.online.drift import DriftConfig, DriftMonitor
from vaestream.errors import ConfigError, DataError, ModelError

LEDGER = "ledger.json"
LOG = "log.jsonl"
DRIFT_LOG = "drift.jsonl"
DEAD_LETTER = "dead_letter.jsonl"
MODEL = "model"


@dataclasses.dataclass
class OnlineConfig:
    """How to learn from a stream (see the module docstring).

    Attributes:
      batch_size: M, records per minibatch.
      new_fraction: the share of a minibatch drawn from the newest file (the rest from the replay buffer).
      passes: how many times, in expectation, each new record is used (sets the steps per file).
      buffer_size: records in the replay buffer.
      holdout_fraction: the share of each file held out (0: none; then give a fixed hold-out set).
      holdout_size: the most recent held-out records kept.
      steps_per_call: minibatches per compiled training call.
      checkpoint_every_files / checkpoint_seconds: checkpoint (and ledger) after this many files or seconds,
        whichever comes first.
      publish: publish versions when the held-out bound improves (needs a registry).
      publish_min_improvement: nats/record the held-out bound must gain over the published version.
      calibration_records: buffer records used to build the coder tables of a publication.
      background_publish: evaluate and publish a copy of each checkpoint's weights on a background thread
        while learning goes on (see :meth:`OnlineLearner.checkpoint`); False: inline, as part of the
        checkpoint.
      publish_share: the most of the wall time the background publisher is busy (it pauses between
        evaluations so that its work stays under this share of one core; 1: no pause).
      publish_interval: the least seconds between the starts of two evaluations by the background publisher
        (a model server polls for new versions every second, TF Serving's and ``vaestream serve``'s default, so
        versions closer than that would mostly never be served); checkpoints in between replace the waiting
        one, and :meth:`OnlineLearner.wait` / ``close`` judge the last one at once. 0: every checkpoint.
      seed: seeds minibatch sampling and hold-out selection.
    """

    batch_size: int = 100
    new_fraction: float = 0.5
    passes: float = 1.0
    buffer_size: int = 10000
    holdout_fraction: float = 0.05
    holdout_size: int = 2000
    steps_per_call: int = 10
    checkpoint_every_files: int = 1
    checkpoint_seconds: float = 60.0
    publish: bool = True
    publish_min_improvement: float = 0.0
    calibration_records: int = 5000
    background_publish: bool = True
    publish_share: float = 1.0
    publish_interval: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.buffer_size < self.batch_size or self.steps_per_call < 1:
            raise ConfigError("need batch_size >= 1, buffer_size >= batch_size, steps_per_call >= 1")
        if not 0 < self.new_fraction <= 1 or not self.passes > 0 or not 0 <= self.holdout_fraction < 1:
            raise ConfigError("need 0 < new_fraction <= 1, passes > 0, 0 <= holdout_fraction < 1")
        if not 0 < self.publish_share <= 1 or not self.publish_interval >= 0:
            raise ConfigError("publish_share must be in (0, 1] and publish_interval >= 0")
        if self.checkpoint_every_files < 1:
            raise ConfigError("checkpoint_every_files must be positive")


def _holdout_mask(name: str, n: int, fraction: float, seed: int) -> np.ndarray:
    """A deterministic choice of round(fraction * n) records of file ``name`` (same on every run)."""
    k = int(round(fraction * n))
    mask = np.zeros(n, bool)
    if k:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{os.path.basename(name)}".encode()).digest()[:8], "little")
        mask[np.random.default_rng(h).choice(n, size=k, replace=False)] = True
    return mask


class OnlineLearner(Following, Pipelined):
    """Trains one VAE on a stream of records (see the module docstring).

    Args:
      work_dir: the work directory; if it holds a ledger the learner resumes from it.
      registry: the registry directory to publish versions to (None: never publish).
      model_config: the architecture of a new model (``input_dim``/``input_shape`` are taken from the
        first file); ignored when resuming or when ``initial_model`` is given.
      train_config: a :class:`vaestream.training.TrainConfig` (optimizer, step size, estimator, L,
        binarisation; ``batch_size`` is taken from ``online_config``).
      online_config: an :class:`OnlineConfig`.
      holdout: a fixed hold-out set ``[N, D]`` (model inputs in the model's range, or uint8); replaces the
        per-file hold-out.
      initial_model: a model directory to start from (its latest checkpoint is copied in), e.g. a model
        trained offline.
      drift: the :class:`vaestream.online.drift.DriftConfig` of the per-file drift signal.
    """

    def __init__(self, work_dir: str | os.PathLike, registry: str | os.PathLike | None = None,
                 model_config: ModelConfig | None = None, train_config=None,
                 online_config: OnlineConfig | None = None, holdout: np.ndarray | None = None,
                 initial_model: str | os.PathLike | None = None, drift: DriftConfig | None = None):
        from vaestream.training import TrainConfig

        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.model_dir = self.work / MODEL
        self.cfg = online_config or OnlineConfig()
        tc = train_config or TrainConfig()
        self.train_config = dataclasses.replace(tc, batch_size=self.cfg.batch_size,
                                                steps_per_call=self.cfg.steps_per_call)
        self._model_config = model_config
        self._initial_model = Path(initial_model) if initial_model is not None else None
        self.registry = None
        if registry is not None:
            from vaestream.online.registry import Registry

            self.registry = Registry(registry)
        self._fixed_holdout = None if holdout is None else np.asarray(holdout)
        self.ledger: dict[str, Any] = {"files": [], "rejected": [], "records_trained": 0, "records_held_out": 0,
                                       "step": 0, "checkpoint": None, "state": None, "published": None,
                                       "drift": None}
        self.pending: list[dict] = []        # files processed since the last checkpoint
        self.model = None
        self.trainer = None
        self.buffer: ReplayBuffer | None = None
        self.holdout: ReplayBuffer | None = None
        self._published = None               # (version, VAE) of the published version, when resuming
        self._lock = threading.RLock()       # ledger and log writes (the publishing thread makes both)
        self._last_ckpt_time = time.monotonic()
        self._step = 0
        self._log = None
        self.drift = DriftMonitor(drift, self.work / DRIFT_LOG)
        self._resume()
        self.publisher = None if self.registry is None else Publisher(
            self.work, self.model_dir, self.registry, self.cfg.seed, self.cfg.publish_min_improvement,
            self.cfg.background_publish, self._write_log, self._record_publication, self._published, self._lock,
            share=self.cfg.publish_share, interval=self.cfg.publish_interval)

    # -- state ------------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.work / LEDGER
        if not path.is_file():
            if self._initial_model is not None:
                self._build(store.read_config(self._initial_model), restore_from=self._initial_model)
            return
        try:
            self.ledger = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: corrupt ledger ({e})") from e
        if not (self.model_dir / store.CONFIG).is_file():  # only rejections so far: no model yet
            if self._initial_model is not None:
                self._build(store.read_config(self._initial_model), restore_from=self._initial_model)
            return
        config = store.read_config(self.model_dir)
        self._build(config)
        ck = self.ledger.get("checkpoint")
        if ck:
            self.trainer.checkpoint().restore(str(self.model_dir / store.CKPT / ck)).assert_existing_objects_matched()
            # make the ledger's checkpoint the latest again (a newer, unledgered one may exist after a kill)
            self._ckpt.write(int(self.trainer.step.numpy()), None)
            self._step = int(self.trainer.step.numpy())
        st = self.ledger.get("state")
        if st:
            with np.load(self.work / st) as z:
                self.buffer = ReplayBuffer.restore(z["buffer"], int(z["buffer_capacity"]), int(z["buffer_next"]))
                self.holdout = ReplayBuffer.restore(z["holdout"], int(z["holdout_capacity"]),
                                                    int(z["holdout_next"]))
                self._scale = float(z["scale"])
        self.drift = DriftMonitor(self.drift.config, self.work / DRIFT_LOG, self.ledger.get("drift"))
        pub = self.ledger.get("published")
        if pub and self.registry is not None:
            m = load_published(self.registry, pub["version"], self.model.config)
            self._published = None if m is None else (pub["version"], m)

    def _build(self, config: ModelConfig, restore_from: Path | None = None) -> None:
        import tensorflow as tf

        from vaestream.model import VAE
        from vaestream.training import Trainer

        if (self.model_dir / store.CONFIG).is_file():
            stored = store.read_config(self.model_dir)
            if stored != config:
                raise ModelError(f"{self.model_dir}: holds a model with config {stored.to_dict()}, not "
                                 f"{config.to_dict()}")
        else:
            store.save_config(self.model_dir, config)
            (self.model_dir / store.TRAIN_CONFIG).write_text(
                json.dumps(dataclasses.asdict(self.train_config), indent=2) + "\n")
        self.model = VAE(config, seed=self.train_config.seed, init=self.train_config.init)
        if restore_from is not None:
            src = store.load_model(restore_from)
            for v, w in zip(self.model.weights(), src.weights()):
                v.assign(w)
        self.trainer = Trainer(self.model, self.train_config, self.cfg.buffer_size)
        jit = self.train_config.jit and config.arch != "conv"
        self._fused = tf.function(self._score_and_train, jit_compile=jit, reduce_retracing=True)
        self._ckpt = CachedCheckpoints(self.trainer.checkpoint(), self.model_dir / store.CKPT, max_to_keep=3)
        self._step = int(self.trainer.step.numpy())   # the host's count (the variable moves on in the calls)

    def _ensure_model(self, records: np.ndarray, scale: float) -> None:
        if self.model is None:
            shape = tuple(records.shape[1:])
            cfg = dataclasses.replace(self._model_config or ModelConfig(), input_dim=int(np.prod(shape)),
                                      input_shape=shape)
            self._build(cfg)
        d = self.model.config.input_dim
        if int(np.prod(records.shape[1:])) != d:
            raise DataError(f"records of shape {tuple(records.shape[1:])}, the model takes {d} values "
                            f"{self.model.config.input_shape}")
        if self.buffer is None:
            dtype = np.uint8 if (records.dtype == np.uint8 and scale == 1.0 / 255.0) else np.float32
            self._scale = 1.0 / 255.0 if dtype == np.uint8 else 1.0
            self.buffer = ReplayBuffer(self.cfg.buffer_size, d, dtype)
            self.holdout = ReplayBuffer(self.cfg.holdout_size, d, dtype)
            if self._fixed_holdout is not None:
                h = self._fixed_holdout.reshape(len(self._fixed_holdout), -1)
                hs = validate(h, self.model.config.likelihood, "holdout")
                self.holdout = ReplayBuffer(len(h), d, dtype)
                self.holdout.add(self._stored(h, hs))

    def _stored(self, records: np.ndarray, scale: float) -> np.ndarray:
        """Records in the buffer's dtype: uint8 kept as is, anything else as float32 model inputs."""
        flat = records.reshape(len(records), -1)
        if self.buffer.data.dtype == np.uint8:
            if flat.dtype == np.uint8 and scale == 1.0 / 255.0:
                return flat
            x = flat.astype(np.float64) * scale * 255.0
            if np.any(np.abs(x - np.round(x)) > 1e-6) or x.min() < 0 or x.max() > 255:
                raise DataError("records are not 8-bit values like the stream's first file; start a new work "
                                "directory for float data")
            return np.round(x).astype(np.uint8)
        return (flat.astype(np.float32) * np.float32(scale)).astype(np.float32)

    def _likelihood(self) -> str:
        """The likelihood records are validated for: the model's, or that of the model to be built."""
        return self.model.config.likelihood if self.model is not None else \
            (self._model_config or ModelConfig()).likelihood

    def _inputs(self, stored: np.ndarray) -> np.ndarray:
        return stored.astype(np.float32) * np.float32(self._scale)

    @property
    def processed(self) -> set[str]:
        """Absolute paths of the files processed (checkpointed or pending) or rejected."""
        return {f["path"] for f in self.ledger["files"]} | {f["path"] for f in self.ledger["rejected"]} | \
            {f["path"] for f in self.pending}

    def _write_log(self, rec: dict) -> None:
        with self._lock, open(self.work / LOG, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")

    # -- learning ---------------------------------------------------------------------------------------------
    def push(self, records: np.ndarray, source: str = "push", scale: float | None = None) -> dict:
        """Learn from records ``[n, *input_shape]`` or ``[n, D]`` (uint8 images or float model inputs).

        Returns the file record logged: ``{"source", "records", "trained", "held_out", "steps",
        "prequential_elbo", "bits_per_record", "train_elbo", "seconds", "drift_flagged"}``.
        """
        plan = self.plan(records, source, scale)
        out = self.compute(plan)      # test, then train (one compiled call): the score is the drift signal
        self.start(plan)
        return self.finish(plan, out)

    def finish(self, plan, out: tuple[float, float | None, float]) -> dict:
        """The file record of a computed plan (``out``: :meth:`compute`'s result): the drift monitor's window and
        the log line."""
        pre_sum, train_elbo, seconds = out
        n = len(plan.stored)
        pre = {"elbo": pre_sum / n}
        d = self.drift.observe(os.path.basename(plan.source), elbo_sum=pre["elbo"] * n, records=n,
                               step=plan.step_end)
        held = int(plan.holdout.sum())
        rec = {"source": plan.source, "records": n, "trained": n - held, "held_out": held,
               "steps": plan.steps, "prequential_elbo": pre["elbo"], "bits_per_record": -pre["elbo"] / math.log(2),
               "train_elbo": train_elbo, "seconds": round(plan.seconds + seconds, 4),
               "seconds_prepare": round(plan.seconds, 4), "seconds_score_train": round(seconds, 4),
               "drift_flagged": d["flagged"], "step": plan.step_end}
        self._write_log({"event": "file", **rec})
        return rec

    def _holdout_of(self, source: str, n: int) -> np.ndarray:
        if self._fixed_holdout is None and self.cfg.holdout_fraction > 0 and n >= 2:
            return _holdout_mask(source, n, self.cfg.holdout_fraction, self.cfg.seed)
        return np.zeros(n, bool)

    def minibatches(self, train: np.ndarray, files_done: int) -> np.ndarray:
        """The minibatches the learner takes on a file's training records ``train`` ``[n, D]`` (stored dtype),
        given the replay buffer as it is now: ``[S, M, D]`` with ``S = ceil(passes * n / m_new)``; row s holds
        ``m_new`` records of ``train`` (a seeded permutation, cycled) then ``M - m_new`` drawn uniformly from the
        buffer (``m_new = M`` while the buffer is empty, or before the first file). One array for the whole
        file, drawn with one permutation per pass and one vectorised buffer sample; seeded by
        ``(seed, files_done)``."""
        cfg = self.cfg
        n, m = len(train), cfg.batch_size
        empty = self.buffer is None or len(self.buffer) == 0
        m_new = m if empty else max(1, min(m, int(round(cfg.new_fraction * m))))
        steps = max(1, int(math.ceil(cfg.passes * n / m_new)))
        rng = np.random.default_rng([cfg.seed, files_done])
        reps = int(math.ceil(steps * m_new / n))
        order = np.concatenate([rng.permutation(n) for _ in range(reps)])[:steps * m_new]
        batch = np.empty((steps, m, train.shape[1]), train.dtype)
        batch[:, :m_new] = train[order].reshape(steps, m_new, -1)
        if m_new < m:
            batch[:, m_new:] = self.buffer.sample(rng, steps * (m - m_new)).reshape(steps, m - m_new, -1)
        return batch

    def _score_and_train(self, records, n, chunk, scale, k_total):
        """(compiled) The prequential ELBO sum of ``records[:n]`` under the current weights, then ``k_total``
        training steps on ``chunk`` (the trainer's compiled loop, after the score): one XLA program per
        (padded file size, chunk shape)."""
        import tensorflow as tf

        from vaestream.objective import elbo

        x = tf.reshape(tf.cast(records, tf.float32) * scale, [tf.shape(records)[0], -1])
        t = elbo(self.model, x, estimator="B", num_samples=1, seed=tf.constant([self.cfg.seed, 0], tf.int32),
                 closed_form=True, rng_alg=self.trainer.rng_alg)
        score = tf.reduce_sum(tf.where(tf.range(tf.shape(x)[0]) < n, t["elbo"], 0.0))
        with tf.control_dependencies([score]):
            obj = tf.cond(k_total > 0, lambda: self.trainer._run_steps(chunk, scale, k_total),
                          lambda: tf.constant(0.0))
        return score, obj

    def process_file(self, path: str | os.PathLike) -> dict | None:
        """Learn from one file (any format :func:`vaestream.data.read_array` reads); it goes to the ledger.

        A file already in the ledger is skipped (returns None). A malformed file is rejected: recorded in the
        ledger and in ``dead_letter.jsonl`` with the reason (returns the rejection record).
        """
        fid = file_id(str(path))
        if fid["path"] in self.processed:
            return None
        try:
            records = read_array(path)
        except DataError as e:
            return self._reject(fid, e)
        return self._learn_entry(records, fid)

    def process_records(self, records: np.ndarray, source: str) -> dict | None:
        """Learn from records that are not a file (e.g. an initial data set), once: ``source`` names them in the
        ledger, and a source already there is skipped (returns None). Bad records raise :class:`DataError`."""
        fid = {"path": str(source), "size": int(np.asarray(records).nbytes), "mtime": None}
        if fid["path"] in self.processed:
            return None
        rec = self.push(records, source=fid["path"])
        self._commit_entry(fid, rec)
        return rec

    def _learn_entry(self, records: np.ndarray, fid: dict) -> dict:
        try:
            rec = self.push(records, source=fid["path"])
        except DataError as e:
            return self._reject(fid, e)
        self._commit_entry(fid, rec)
        return rec

    def _commit_entry(self, fid: dict, rec: dict) -> None:
        self.pending.append(dict(fid, records=rec["records"], trained=rec["trained"], held_out=rec["held_out"]))
        if self._checkpoint_due():
            self.checkpoint()

    def _checkpoint_due(self) -> bool:
        return len(self.pending) >= self.cfg.checkpoint_every_files or \
            time.monotonic() - self._last_ckpt_time >= self.cfg.checkpoint_seconds

    def _reject(self, fid: dict, e: Exception) -> dict:
        rej = dict(fid, reason=str(e), time=time.time())
        self.ledger["rejected"].append(rej)
        with open(self.work / DEAD_LETTER, "a") as f:
            f.write(json.dumps({"source": fid["path"], "key": fid["path"], "reason": str(e)}) + "\n")
        self._write_log({"event": "rejected", **rej})
        # a rejection changes no model state: record it in the committed ledger at once
        with self._lock:
            committed = json.loads((self.work / LEDGER).read_text()) if (self.work / LEDGER).is_file() \
                else dict(self.ledger, rejected=[])
            committed["rejected"] = committed.get("rejected", []) + [rej]
            atomic_write(self.work / LEDGER, json.dumps(committed, indent=1, sort_keys=True) + "\n")
        return {"source": fid["path"], "rejected": str(e)}

    # -- checkpoints, evaluation, publishing ------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """Save the model, optimizer, buffer and hold-out set, then commit the pending files to the ledger
        (atomically), then evaluate and maybe publish. Returns the ledger.

        With ``background_publish`` the weights just saved are copied and handed to a background thread that
        evaluates and exports them while learning goes on; the checkpoint never waits for it. If the thread is
        still busy with an earlier checkpoint, or less than ``publish_interval`` s have passed since it started
        one, this one waits in its place (a newer checkpoint replaces a waiting, not yet started one: the newest
        weights are the ones judged). :meth:`wait`, :meth:`close` and the end of :meth:`follow` end the pause
        and wait until the queue is empty."""
        if self.model is None:
            return self.ledger
        return self.commit_checkpoint(self.capture_checkpoint())

    def _commit_ledger(self, files: list[dict], step: int, ck: str, state: str, drift: dict) -> str | None:
        """Put ``files`` (the first of the pending ones) in the ledger with the checkpoint ``ck`` and state file
        ``state`` (atomically); returns the state file the ledger named before."""
        with self._lock:
            led = dict(self.ledger)
            led["files"] = self.ledger["files"] + files
            led["records_trained"] = self.ledger["records_trained"] + sum(f["trained"] for f in files)
            led["records_held_out"] = self.ledger["records_held_out"] + sum(f["held_out"] for f in files)
            led["step"], led["checkpoint"], led["state"] = step, ck, state
            led["drift"] = drift
            old_state = self.ledger.get("state")
            atomic_write(self.work / LEDGER, json.dumps(led, indent=1, sort_keys=True) + "\n")
            self.ledger, self.pending = led, self.pending[len(files):]
        return old_state

    def warm_up(self, records: np.ndarray) -> float:
        """Trace the publisher's evaluation, coder tables and export on ``records`` (a sample of the stream, e.g.
        its first file; nothing is learned from them) before the stream starts, so that the first publication
        does not trace while learning goes on. A one-off cost, like the first file's XLA compile; needs a model
        (``initial_model``, or a file learned). Returns the seconds it took (0 without a registry)."""
        if self.publisher is None or self.model is None:
            return 0.0
        records = np.asarray(records)
        x = records.reshape(len(records), -1).astype(np.float32)
        if records.dtype == np.uint8:
            x *= np.float32(1.0 / 255.0)
        return self.publisher.warm(self.model.config, [w.numpy() for w in self.model.weights()], x)

    def wait(self) -> dict | None:
        """Wait until the evaluations / publications queued by checkpoints are done (the publishing thread's
        exceptions are raised here); returns the ledger's publication record (None: nothing published)."""
        if self.publisher is not None:
            self.publisher.wait()
        return self.ledger.get("published")

    def close(self) -> None:
        """Wait for background work and stop its thread (the learner stays usable)."""
        if self.publisher is not None:
            self.publisher.close()

    def _record_publication(self, rec: dict) -> None:
        with self._lock:
            self.ledger["published"] = rec
            atomic_write(self.work / LEDGER, json.dumps(self.ledger, indent=1, sort_keys=True) + "\n")

    def _heldout_inputs(self) -> np.ndarray | None:
        if self.holdout is None or len(self.holdout) == 0:
            return None
        return self._inputs(self.holdout.contents())

    def evaluate(self) -> dict:
        """Held-out mean ELBO (nats/record) of the current model and, if any, of the published version."""
        from vaestream.training import dataset_elbo

        x = self._heldout_inputs()
        if x is None:
            return {"holdout_records": 0}
        if self.publisher is not None:
            return self.publisher.evaluate(self.model, x, int(self.trainer.step.numpy()))
        return {"holdout_records": len(x), "step": int(self.trainer.step.numpy()),
                "holdout_elbo": dataset_elbo(self.model, x, seed=self.cfg.seed)["elbo"]}

    def maybe_publish(self) -> dict | None:
        """Publish the current model (as of now, on this thread) if its held-out bound beats the published
        version's (see the module docstring). Returns the publication record, or None."""
        if self.publisher is None or not self.cfg.publish or self.model is None:
            return None
        self.publisher.wait()
        return self.publisher.evaluate_and_publish(self._snapshot())

    def _snapshot(self) -> dict:
        cal = self.buffer.contents()
        if len(cal) > self.cfg.calibration_records:
            cal = cal[np.linspace(0, len(cal) - 1, self.cfg.calibration_records).astype(np.int64)]
        return self.publisher.snapshot(self.model, self._heldout_inputs(), self._inputs(cal),
                                       int(self.trainer.step.numpy()), len(self.ledger["files"]),
                                       self.ledger["records_trained"])

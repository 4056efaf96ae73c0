"""AEVB training: minibatches of M records, L samples each, the SGVB estimator, Adam or Adagrad.

The training loop is a compiled (XLA) ``tf.while_loop`` over a chunk of minibatches, so Python runs once
per chunk, not once per step. Everything random is a function of ``(seed, step)`` (the data order of
epoch e is a PCG64 permutation seeded by ``(seed, e)``; the z samples and dynamic binarisation of step s use
stateless seeds ``(seed, s)``, drawn with Threefry under XLA and Philox without), so a run resumed from a
checkpoint takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from vaestream import store
from vaestream.config import ModelConfig
from vaestream.data import BOUNDED_LIKELIHOODS, Dataset
from vaestream.entropy_models.hyperprior import rd_loss as learned_rd_loss
from vaestream.errors import ConfigError, DataError, ModelError
from vaestream.model import VAE
from vaestream.objective import ESTIMATORS, RD_LIKELIHOODS, bits_per_dim, elbo, rd_loss

OPTIMIZERS = ("adam", "adagrad")
OBJECTIVES = ("elbo", "rd")
DEFAULT_LR = {"adam": 1e-3, "adagrad": 0.02}  # the paper chose Adagrad step sizes from {0.01, 0.02, 0.1}


@dataclasses.dataclass
class TrainConfig:
    """How to train.

    Attributes:
      batch_size: M, records per minibatch (the paper: 100).
      num_samples: L, z samples per record (the paper: 1).
      estimator: SGVB estimator ``"A"`` or ``"B"`` (analytic KL).
      objective: ``"elbo"`` (AEVB, the default) or ``"rd"``: minimise rate (bits) + lambda x MSE
        (:func:`vaestream.objective.rd_loss`), lambda being the model config's ``lmbda``.
      optimizer: ``"adam"`` or ``"adagrad"``; ``learning_rate`` None takes :data:`DEFAULT_LR`.
      lr_decay_rate, lr_decay_steps: exponential step-size decay, lr * rate^(step / decay_steps)
        (1.0: constant).
      max_seconds: a time budget: stop (with a checkpoint) after the chunk that passes it.
      map_prior: add log p(theta) with p(theta) = N(0, I) to the objective (weight decay; the paper's
        approximate MAP), scaled by 1/N per record.
      init: ``"glorot"`` or ``"paper"`` (N(0, 0.01^2)).
      steps / epochs: how long; ``steps`` wins when both are given.
      binarize: ``none``, ``static`` or ``dynamic`` (Bernoulli decoder only).
      validation: records held out of the training data for the validation bound (deterministic split).
      eval_every: steps between evaluations (logged to ``log.jsonl``); 0 evaluates only at the end.
      eval_steps: further steps to evaluate after (e.g. log-spaced, for curves against training samples);
        an evaluation falls at the end of the compiled chunk that passes the step.
      eval_records: at most this many training records enter the logged train bound.
      checkpoint_every: steps between checkpoints (one is also written at the end and on Ctrl-C/SIGTERM).
      steps_per_call: minibatches per compiled call.
      jit: compile the training step with XLA.
    """

    # the objective and its optimiser
    batch_size: int = 100
    num_samples: int = 1
    estimator: str = "B"
    objective: str = "elbo"
    optimizer: str = "adam"
    learning_rate: float | None = None
    lr_decay_rate: float = 1.0
    lr_decay_steps: int = 100_000
    max_seconds: float | None = None
    map_prior: bool = False
    init: str = "glorot"
    seed: int = 0
    # how long, on which records
    steps: int | None = None
    epochs: float | None = None
    binarize: str = "none"
    validation: int = 0
    # evaluation, checkpoints, compilation
    eval_every: int = 0
    eval_steps: tuple[int, ...] = ()
    eval_records: int = 10000
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    steps_per_call: int = 50
    jit: bool = True

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator {self.estimator!r} is not one of {ESTIMATORS}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.batch_size < 1 or self.num_samples < 1 or self.steps_per_call < 1:
            raise ConfigError("batch_size, num_samples and steps_per_call must be positive")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.optimizer]

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        epochs = 1.0 if self.epochs is None else self.epochs
        return int(math.ceil(epochs * (n_train // self.batch_size)))


def make_optimizer(cfg: TrainConfig) -> keras.optimizers.Optimizer:
    lr = cfg.lr
    if cfg.lr_decay_rate != 1.0:
        lr = keras.optimizers.schedules.ExponentialDecay(cfg.lr, cfg.lr_decay_steps, cfg.lr_decay_rate)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.Adagrad(lr)


class Trainer(tf.Module):
    """The optimisation state of one model: optimizer slots and the step counter, checkpointed together.

    ``run_steps(chunk, scale)`` takes K minibatches at once (``[K, M, D]``, any numeric dtype; inputs are
    ``chunk * scale``) and returns the mean minibatch ELBO (nats/record) over them; ``run_steps(chunk, scale,
    steps=k)`` runs only the first k <= K of them (a chunk padded to a fixed K: XLA compiles once per chunk
    shape, so a caller whose step counts vary, like the online learner, pads instead of compiling each count).
    ``update(x)`` is one step on a float batch ``[M, D]``, for callers that push data themselves.
    """

    closed_form: bool = True
    """Evaluate the step's ELBO terms in closed form (see :meth:`objective`); False: through the TFP
    distribution objects (the reference; same values, about 5% slower on a 784-500-20 model)."""

    def __init__(self, model: VAE, cfg: TrainConfig, n_train: int):
        super().__init__(name="trainer")
        self.model = model
        self.cfg = cfg
        self.n_train = float(max(1, n_train))
        self.optimizer = make_optimizer(cfg)
        self.optimizer.build(model.trainable_variables)
        self.step = tf.Variable(0, dtype=tf.int64, name="step")
        # XLA:CPU's Philox costs ~60 ns per number (binarising a [100, 784] minibatch cost more than the step's
        # matmuls), its Threefry ~1 ns; TF's CPU kernel has no Threefry, so the eager path keeps Philox.
        # XLA:CPU compiles convolutions to slow Eigen loops: an arch="conv" step measured 0.38 s with XLA vs
        # 0.08 s with TF's oneDNN kernels (channels 16, 32; M = 100), so conv models train without jit_compile.
        jit = cfg.jit and model.config.arch != "conv"
        self.rng_alg = "threefry" if jit else "philox"
        if model.config.entropy_model and cfg.objective != "rd":
            raise ConfigError(f"a model with a learned entropy model ({model.config.entropy_model!r}) trains with "
                              "objective 'rd'")
        if cfg.objective == "rd" and not model.config.entropy_model and (
                model.config.lmbda is None or model.config.likelihood not in RD_LIKELIHOODS):
            raise ConfigError(f"objective 'rd' needs a Gaussian decoder {RD_LIKELIHOODS} and the model config's lmbda "
                              f"(got {model.config.likelihood!r}, lmbda={model.config.lmbda})")
        self._run = tf.function(self._run_steps, jit_compile=jit, reduce_retracing=True)

    def objective(self, x: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, dict]:
        """The per-record objective to maximise: mean SGVB ELBO (+ log p(theta)/N with ``map_prior``).

        The ELBO's terms use their closed forms (``elbo(..., closed_form=True)``: the same values and gradients
        as the TFP distributions', in fewer compiled passes). With ``objective="rd"`` it is -(rate + lambda MSE)
        (bits per record, :func:`vaestream.objective.rd_loss`); for a model with a learned entropy model, the
        variable-rate objective of :func:`vaestream.entropy_models.hyperprior.rd_loss`."""
        if self.cfg.objective == "rd" and self.model.config.entropy_model:
            terms = learned_rd_loss(self.model, x, seed)  # rate levels drawn per record (vaestream.entropy_models)
            obj = -tf.reduce_mean(terms["loss"])
        elif self.cfg.objective == "rd":
            terms = rd_loss(self.model, x, self.model.config.lmbda, seed=seed, rng_alg=self.rng_alg)
            obj = -tf.reduce_mean(terms["loss"])
        else:
            terms = elbo(self.model, x, estimator=self.cfg.estimator, num_samples=self.cfg.num_samples, seed=seed,
                         closed_form=self.closed_form, rng_alg=self.rng_alg)
            obj = tf.reduce_mean(terms["elbo"])
        if self.cfg.map_prior:
            obj -= 0.5 * tf.add_n([tf.reduce_sum(tf.square(v)) for v in self.model.trainable_variables]) \
                / self.n_train
        return obj, terms

    def _run_steps(self, chunk: tf.Tensor, scale: tf.Tensor, k_total: tf.Tensor) -> tf.Tensor:
        base = tf.constant(self.cfg.seed % (2**31 - 1), tf.int32)
        variables = self.model.trainable_variables
        dynamic = self.cfg.binarize == "dynamic"

        def body(k, acc):
            s = tf.cast(self.step % (2**30), tf.int32)
            x = tf.cast(chunk[k], tf.float32) * scale
            x = tf.reshape(x, [tf.shape(x)[0], -1])
            if dynamic:
                u = tf.random.stateless_uniform(tf.shape(x), seed=tf.stack([base, 2 * s + 1]), alg=self.rng_alg)
                x = tf.cast(u < x, tf.float32)
            with tf.GradientTape() as tape:
                obj, _ = self.objective(x, tf.stack([base, 2 * s]))
                loss = -obj
            grads = tape.gradient(loss, variables)
            self.optimizer.apply_gradients(zip(grads, variables))
            self.step.assign_add(1)
            return k + 1, acc + obj

        _, total = tf.while_loop(lambda k, acc: k < k_total, body, (tf.constant(0), tf.constant(0.0)))
        return total / tf.cast(k_total, tf.float32)

    def run_steps(self, chunk, scale: float = 1.0, steps: int | None = None) -> float:
        k = int(chunk.shape[0]) if steps is None else int(steps)
        if not 1 <= k <= int(chunk.shape[0]):
            raise ConfigError(f"steps={steps} for a chunk of {chunk.shape[0]} minibatches")
        return float(self._run(tf.convert_to_tensor(chunk), tf.constant(scale, tf.float32), tf.constant(k, tf.int32)))

    def update(self, x) -> float:
        """One AEVB step on ``x`` ``[M, D]``, float model inputs; returns that minibatch's ELBO.

        The inputs are checked before the step: integer records (stored values such as uint8 pixels) raise
        :class:`DataError` telling to scale them (``vaestream.data.model_inputs(x)`` applies the input-scaling
        rule: 8-bit counts x 1/255), as do NaN or infinite values and, for a decoder on [0, 1] (bernoulli,
        gaussian_sigmoid, beta_binomial), values outside [0, 1]. No step is taken on a refused batch.
        """
        x = check_inputs(x, self.model.config.likelihood, "Trainer.update")
        return self.run_steps(x.reshape((1,) + x.shape), 1.0)

    def checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step)


def check_inputs(x, likelihood: str, name: str = "inputs") -> np.ndarray:
    """``x`` as float32 model inputs ``[M, D]`` for a decoder of ``likelihood``, or :class:`DataError`: integer
    arrays are stored records to scale first (:func:`vaestream.data.model_inputs`), and every value must be
    finite and, for a decoder on [0, 1], inside it (the first bad record is named)."""
    a = np.asarray(x)
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{name}: got {a.dtype} records, but it takes float model inputs; scale stored values "
                        "first: vaestream.data.model_inputs(records) maps 8-bit counts to [0, 1] (x 1/255)")
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{name}: values of dtype {a.dtype} are not numbers")
    if a.ndim < 2 or len(a) == 0:
        raise DataError(f"{name}: expected a batch of model inputs [M, D], got shape {a.shape}")
    a = a.astype(np.float32, copy=False).reshape(len(a), -1)
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        raise DataError(f"{name}: record {int(np.argmin(finite))} has NaN or infinite values")
    if likelihood in BOUNDED_LIKELIHOODS:
        inside = ((a >= 0.0) & (a <= 1.0)).all(axis=1)
        if not inside.all():
            i = int(np.argmin(inside))
            raise DataError(f"{name}: record {i} has values in [{a[i].min():g}, {a[i].max():g}], outside the support "
                            f"[0, 1] of the {likelihood} decoder (scale the data to [0, 1] first)")
    return a


def _elbo_sums(model, x, seed):
    t = elbo(model, x, estimator="B", num_samples=1, seed=seed)
    return tf.reduce_sum(t["elbo"]), tf.reduce_sum(t["rate"]), tf.reduce_sum(t["distortion"])


_elbo_batch = tf.function(_elbo_sums, jit_compile=True, reduce_retracing=True)   # one XLA program per shape
_elbo_batch_any_size = tf.function(_elbo_sums, reduce_retracing=True)            # one trace for every size


def dataset_elbo(model: VAE, data: Dataset | np.ndarray, batch_size: int = 1000, seed: int = 0,
                 jit_compile: bool = True) -> dict:
    """Mean ELBO (estimator B, L = 1), rate and distortion over a whole data set, nats/record and bits/dim.

    ``jit_compile``: run each batch under XLA (fastest for a data set seen again and again; XLA compiles once
    per batch shape, ~0.3-0.5 s) or as a plain ``tf.function`` (one trace for every batch size: for sets
    whose size changes from call to call, e.g. a growing hold-out set)."""
    fn = _elbo_batch if jit_compile else _elbo_batch_any_size
    batches = data.iter_batches(batch_size) if isinstance(data, Dataset) else (
        np.asarray(data[s:s + batch_size], np.float32) for s in range(0, len(data), batch_size))
    tot = np.zeros(3)
    n = 0
    for i, xb in enumerate(batches):
        out = fn(model, tf.constant(xb), tf.constant([seed, i], tf.int32))
        tot += [float(v) for v in out]
        n += len(xb)
    e, r, d = tot / max(n, 1)
    return {"elbo": e, "rate": r, "distortion": d, "bits_per_dim": float(bits_per_dim(-e, model.config.input_dim)),
            "records": n}


def dataset_rd(model: VAE, data: Dataset, batch_size: int = 1000, seed: int = 0) -> dict:
    """A learned-entropy-model's training terms over a data set at each rate level k: ``{"bits_L<k>", "psnr_L<k>"}``
    (mean rate in bits per record under the noise proxy, side included; PSNR in dB of the rounded latent's
    reconstruction, from the mean MSE)."""
    step = tf.function(learned_rd_loss, reduce_retracing=True)
    out = {}
    for k in range(len(model.config.rd_lambdas)):
        rate, mse, n = 0.0, 0.0, 0
        for i, xb in enumerate(data.iter_batches(batch_size)):
            t = step(model, tf.constant(xb), tf.constant([seed, i], tf.int32), tf.fill([len(xb)], k))
            rate, mse, n = rate + float(tf.reduce_sum(t["rate"])), mse + float(tf.reduce_sum(t["distortion"])), \
                n + len(xb)
        out[f"bits_L{k}"] = rate / max(n, 1)
        out[f"psnr_L{k}"] = 10 * math.log10(1.0 / max(mse / max(n, 1), 1e-12))
    return out


def evaluation_set(data: Dataset, n: int | None = None, seed: int = 12345) -> Dataset:
    """A fixed evaluation view of ``data``: its first ``n`` records; dynamic binarisation becomes one fixed
    Bernoulli sample (as the IWAE protocol's test set)."""
    view = data if n is None or n >= len(data) else data.take(slice(0, n))
    if view.binarize == "dynamic":
        rng = np.random.default_rng(seed)
        p = view.to_float()
        bits = (rng.random(p.shape, dtype=np.float32) < p).astype(np.uint8).reshape(view.records.shape)
        return Dataset(bits, 1.0, "static", view.name)
    return view


@dataclasses.dataclass
class TrainResult:
    model: VAE
    model_dir: Path
    steps: int
    history: list[dict]
    interrupted: bool
    examples_per_second: float


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between chunks (so the state saved is consistent)."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def prepare_model_dir(model_dir: str | Path, config: ModelConfig | None, input_shape: tuple[int, ...],
                      train_config: "TrainConfig", data_name: str) -> ModelConfig:
    """Create or check ``model_dir`` for training on records of ``input_shape``; returns the model config.

    A new directory gets ``config.json`` (``config`` with the data's shape); an existing one must hold the same
    architecture (or ``config`` None). ``train_config.json`` records how this run trains.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    dim = int(np.prod(input_shape))
    if (model_dir / store.CONFIG).exists():
        stored = store.read_config(model_dir)
        if config is not None and config != stored:
            raise ModelError(f"{model_dir}: holds a model with config {stored.to_dict()}, asked for "
                             f"{config.to_dict()}; use a new directory")
        config = stored
    else:
        config = (config or ModelConfig()).for_input_shape(tuple(input_shape))
        store.save_config(model_dir, config)
    if config.input_dim != dim:
        raise ModelError(f"{model_dir}: model takes {config.input_dim} values per record, {data_name} has {dim}")
    (model_dir / store.TRAIN_CONFIG).write_text(json.dumps(dataclasses.asdict(train_config), indent=2) + "\n")
    return config


ChunkSource = Callable[[int, int], "Iterator[tuple[int, object]]"]
"""``chunks(start_step, steps_per_epoch)`` -> iterator of ``(first step, chunk [K, M, ...])`` from global step
``start_step`` on, up to the run's total; a chunk may be a NumPy array or a tensor of raw records."""


def sequence_chunks(batches, steps_per_call: int) -> ChunkSource:
    """A :data:`ChunkSource` over an explicit minibatch sequence ``batches`` ``[S, M, ...]`` (step s trains on
    ``batches[s]``), in chunks of ``steps_per_call``; e.g. to replay the minibatches another loop (the online
    learner) trained on through :func:`fit` with ``TrainConfig(steps=S)``."""

    def chunks(start: int, steps_per_epoch: int):
        for s in range(start, len(batches), steps_per_call):
            yield s, batches[s:s + steps_per_call]

    return chunks


class _EvalLog:
    """The model directory's training log (``log.jsonl``, read back as ``history``): :meth:`evaluate` appends the
    bounds on the fixed ``evals`` sets at a step."""

    def __init__(self, model_dir: Path, model: VAE, evals: dict, batch_size: int, steps_per_epoch: int,
                 on_eval: Callable[[dict], None] | None):
        self.model, self.evals, self.m, self.steps_per_epoch, self.on_eval = (model, evals, batch_size,
                                                                               steps_per_epoch, on_eval)
        self.history = store.read_log(model_dir)
        self.file = open(model_dir / store.LOG, "a")

    def evaluate(self, step: int, elapsed: float) -> dict:
        rec = {"step": step, "samples": step * self.m, "epoch": step / self.steps_per_epoch,
               "seconds": round(elapsed, 3)}
        for name, d in self.evals.items():
            if self.model.config.entropy_model:  # bits and PSNR at each rate level (noisy-rate proxy)
                rec.update({f"{name}_{k}": v for k, v in dataset_rd(self.model, d).items()})
                continue
            r = dataset_elbo(self.model, d)
            rec[f"{name}_elbo"] = r["elbo"]
            rec[f"{name}_bits_per_dim"] = r["bits_per_dim"]
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.history.append(rec)
        if self.on_eval:
            self.on_eval(rec)
        return rec


@contextlib.contextmanager
def _prefetched(items: Iterator):
    """``items`` with the next one prepared on a background thread while the caller works on this one; on exit
    the thread finishes the item it is preparing and stops."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    nxt = pool.submit(next, items, None)

    def gen():
        nonlocal nxt
        while True:
            item = nxt.result()
            if item is None:
                return
            nxt = pool.submit(next, items, None)
            yield item
    try:
        yield gen()
        nxt.cancel()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def fit(model_dir: str | Path, config: ModelConfig, cfg: "TrainConfig", n_train: int, scale: float,
        chunks: ChunkSource, evals: dict, progress: bool = True, desc: str = "train",
        on_eval: Callable[[dict], None] | None = None) -> "TrainResult":
    """The AEVB loop shared by every data source: restore, train chunk by chunk, evaluate, checkpoint.

    ``evals`` maps a name (``train``, ``valid``, ``test``) to a fixed :class:`Dataset` whose bound is logged.
    Chunks are prepared on a background thread while the previous one trains. SIGINT/SIGTERM stop after the
    current chunk with a checkpoint; ``cfg.max_seconds`` likewise.
    """
    model_dir = Path(model_dir)
    model = VAE(config, seed=cfg.seed, init=cfg.init)
    trainer = Trainer(model, cfg, n_train)
    ckpt = trainer.checkpoint()
    manager = tf.train.CheckpointManager(ckpt, str(model_dir / store.CKPT), max_to_keep=cfg.keep_checkpoints)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    m = cfg.batch_size
    steps_per_epoch = n_train // m
    if steps_per_epoch < 1:
        raise ConfigError(f"{n_train} training records is fewer than one minibatch of {m}")
    total = cfg.total_steps(n_train)
    log = _EvalLog(model_dir, model, evals, m, steps_per_epoch, on_eval)
    step0 = int(trainer.step.numpy())
    bar = None
    if progress and step0 < total:
        from tqdm.auto import tqdm
        bar = tqdm(total=total * m, initial=step0 * m, unit="ex", unit_scale=True, dynamic_ncols=True, desc=desc)
    t0 = time.perf_counter()
    trained = 0
    interrupted = False
    last_ckpt = step0
    try:
        with StopFlag() as stop, _prefetched(iter(chunks(step0, steps_per_epoch))) as items:
            ema = None
            for s, chunk in items:
                k = int(chunk.shape[0])
                obj = trainer.run_steps(chunk, scale)
                step = s + k
                trained += k
                ema = obj if ema is None else 0.9 * ema + 0.1 * obj
                if bar is not None:
                    bar.update(k * m)
                    bar.set_postfix(elbo=f"{ema:.2f}", step=step)
                if (cfg.eval_every and step // cfg.eval_every != s // cfg.eval_every) or \
                        any(s < e <= step for e in cfg.eval_steps):
                    log.evaluate(step, time.perf_counter() - t0)
                if step - last_ckpt >= cfg.checkpoint_every:
                    manager.save(checkpoint_number=step)
                    last_ckpt = step
                if stop.set:
                    interrupted = True
                    break
                if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
                    break
    finally:
        step = int(trainer.step.numpy())
        if step != last_ckpt or manager.latest_checkpoint is None:
            manager.save(checkpoint_number=step)
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if not interrupted and (not log.history or log.history[-1]["step"] != step) and evals:
        log.evaluate(step, elapsed)
    log.file.close()
    return TrainResult(model, model_dir, step, log.history, interrupted, trained * m / max(elapsed, 1e-9))


def train(train_data: Dataset, model_dir: str | Path, config: ModelConfig | None = None,
          train_config: TrainConfig | None = None, valid_data: Dataset | None = None,
          test_data: Dataset | None = None, progress: bool = True,
          on_eval: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a VAE with AEVB, checkpointing to ``model_dir``; resumes exactly if ``model_dir`` has a checkpoint.

    Args:
      train_data: the training records (``Dataset``; with ``train_config.validation > 0`` a deterministic
        part of it is held out as ``valid_data``).
      model_dir: where ``config.json``, ``ckpt/`` and ``log.jsonl`` go.
      config: the architecture; ``input_dim``/``input_shape`` are taken from the data. When resuming, it must
        match the stored one (or be None).
      train_config: how to train (:class:`TrainConfig`).
      valid_data, test_data: optional sets whose bound is logged at each evaluation.
      progress: show a progress bar (examples, current ELBO, ETA).
      on_eval: called with each log record.

    Returns:
      a :class:`TrainResult` with the trained model and the evaluation history.
    """
    from vaestream.data import split_validation

    cfg = train_config or TrainConfig()
    if cfg.validation and valid_data is None:
        tr, va = split_validation(len(train_data), cfg.validation, seed=cfg.seed)
        valid_data = train_data.take(va, name=train_data.name + "[valid]")
        train_data = train_data.take(tr)
    config = prepare_model_dir(model_dir, config, train_data.input_shape, cfg, train_data.name)
    m = cfg.batch_size
    n = len(train_data)
    if n // m < 1:
        raise ConfigError(f"{train_data.name}: {n} records is fewer than one minibatch of {m}")
    total = cfg.total_steps(n)
    k_max = cfg.steps_per_call
    evals = {name: evaluation_set(d, cfg.eval_records if name == "train" else None)
             for name, d in (("train", train_data), ("valid", valid_data), ("test", test_data)) if d is not None}

    def chunks(start: int, steps_per_epoch: int):
        """Raw records [K, M, ...] in the epoch's permuted order; chunks end at multiples of K and at epoch
        ends, so the chunking (and thus every step) is the same after a resume."""
        s = start
        order_epoch, order = -1, None
        while s < total:
            epoch, pos = divmod(s, steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, _epoch_order(cfg.seed, epoch, n)
            end = min((s // k_max + 1) * k_max, (epoch + 1) * steps_per_epoch, total)
            idx = order[pos * m:(pos + end - s) * m]
            yield s, np.asarray(train_data.records[idx]).reshape((end - s, m, -1))
            s = end

    return fit(model_dir, config, cfg, n, train_data.scale, chunks, evals, progress, on_eval=on_eval)

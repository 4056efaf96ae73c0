"""AEVB training across processes with ``tf.distribute.MultiWorkerMirroredStrategy`` (gRPC, ring collectives).

    from vaestream.distributed import train_distributed
    train_distributed("shards/mnist", "runs/mw", ModelConfig(latent_dim=10, hidden=(200,)),
                      TrainConfig(steps=300, seed=1), num_workers=2)

:func:`train_distributed` starts ``num_workers`` local worker processes (``python -m vaestream.distributed``),
each with its ``TF_CONFIG`` (free localhost ports picked with bound sockets), and waits for them. Worker i
reads its share of the shard set (shard files ``i, i+N, ...`` of the manifest, in memory), takes minibatches of
``batch_size / N`` records in an epoch order seeded by ``(seed, epoch, i)``, and every step all-reduces the
gradients (Keras's optimizer sums them over replicas; each replica's loss is divided by N, so the update is the
gradient of the mean over the global minibatch of ``batch_size`` records). All workers take the same number of
steps (the smallest share decides the epoch length). The chief (worker 0) writes the checkpoints to
``model_dir/ckpt`` (the others save to a scratch folder that is deleted, as MultiWorkerMirroredStrategy needs
every worker to take part in a save); a rerun restores the chief's latest checkpoint on every worker and
continues with exactly the steps the uninterrupted run would have taken (data order and noise are functions of
``(seed, step, worker)``).

Why not the single-process XLA ``tf.while_loop`` step: the loop applies the update inside one compiled call, and
the cross-worker all-reduce (``CollectiveReduceV2``) has no XLA:CPU kernel; here each step is one
``tf.function`` (no XLA) around ``strategy.run``, with TF's Philox noise instead of XLA's Threefry. So a
distributed run is not bit-identical to a single-process one (other noise draws, other minibatch composition,
float reduction order); it is the same estimator and converges to the same bound (measured in the tests).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vaestream.config import ModelConfig
from vaestream.errors import ConfigError, ModelError


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on localhost (bound with port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _shard_share(shard_dir: str, index: int, workers: int) -> tuple[list[str], list[int], float, tuple, str]:
    """(this worker's shard paths, every worker's record count, scale, shape, dtype) from the manifest."""
    from vaestream import shardset

    m = shardset.read_manifest(shard_dir)
    base = os.path.dirname(m.path)
    entries = sorted(m.shards, key=lambda e: e["path"])
    if len(entries) < workers:
        raise ConfigError(f"{m.path}: {len(entries)} shards for {workers} workers; prepare at least one a worker")
    counts = [sum(e["records"] for e in entries[j::workers]) for j in range(workers)]
    paths = [e["path"] if os.path.isabs(e["path"]) else os.path.join(base, e["path"]) for e in entries[index::workers]]
    return paths, counts, float(m.scale), tuple(m.shape), m.dtype


def _worker(spec: dict) -> None:
    """One worker process (TF_CONFIG set by the parent)."""
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from vaestream.model import VAE
    from vaestream.shards import read_records
    from vaestream.training import Trainer, TrainConfig

    i, n = int(spec["index"]), int(spec["workers"])
    cfg = dataclasses.replace(TrainConfig(**spec["train_config"]), jit=False)
    config = ModelConfig.from_dict(spec["config"])
    paths, counts, scale, shape, dtype = _shard_share(spec["shards"], i, n)
    x_all = read_records(paths, shape, dtype).reshape(-1, int(np.prod(shape)))
    mb = cfg.batch_size // n
    steps_per_epoch = min(counts) // mb
    if steps_per_epoch < 1:
        raise ConfigError(f"a worker holds {min(counts)} records, fewer than one minibatch share of {mb}")
    total = cfg.total_steps(steps_per_epoch * cfg.batch_size)
    model_dir = Path(spec["model_dir"])
    with strategy.scope():
        model = VAE(config, seed=cfg.seed, init=cfg.init)
        trainer = Trainer(model, cfg, steps_per_epoch * cfg.batch_size)
    ckpt = trainer.checkpoint()
    chief = i == 0
    ckpt_dir = model_dir / "ckpt" if chief else model_dir / f".worker-{i}-ckpt"
    manager = tf.train.CheckpointManager(ckpt, str(ckpt_dir), max_to_keep=cfg.keep_checkpoints)
    latest = tf.train.latest_checkpoint(str(model_dir / "ckpt"))
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
    variables = model.trainable_variables
    base_seed = (cfg.seed * 7919 + i) % (2**31 - 1)
    dynamic = cfg.binarize == "dynamic"

    @tf.function(reduce_retracing=True)
    def train_step(x, s):
        def replica(x):
            base = tf.constant(base_seed, tf.int32)
            if dynamic:
                u = tf.random.stateless_uniform(tf.shape(x), seed=tf.stack([base, 2 * s + 1]), alg="philox")
                x = tf.cast(u < x, tf.float32)
            with tf.GradientTape() as tape:
                obj, _ = trainer.objective(x, tf.stack([base, 2 * s]))
                loss = -obj / n
            grads = tape.gradient(loss, variables)
            trainer.optimizer.apply_gradients(zip(grads, variables))
            return obj

        obj = strategy.run(replica, args=(x,))
        trainer.step.assign_add(1)
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, obj, axis=None)

    step = int(trainer.step.numpy())
    start = step
    t0 = time.perf_counter()
    objs = []
    order_epoch, order = -1, None
    last_ckpt = step
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, np.random.default_rng([cfg.seed, epoch, i]).permutation(len(x_all))
        x = x_all[order[pos * mb:(pos + 1) * mb]].astype(np.float32) * scale
        objs.append(float(train_step(tf.constant(x), tf.constant(step % (2**30), tf.int32))))
        step += 1
        if step - last_ckpt >= cfg.checkpoint_every:
            manager.save(checkpoint_number=step)
            last_ckpt = step
    manager.save(checkpoint_number=step)
    seconds = time.perf_counter() - t0
    if chief:
        rec = {"step": step, "steps_this_run": step - start, "seconds": round(seconds, 3), "workers": n,
               "examples_per_second": round((step - start) * cfg.batch_size / max(seconds, 1e-9), 1),
               "train_elbo_last_100": float(np.mean(objs[-100:])) if objs else None}
        with open(model_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    else:
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)


def train_distributed(shard_dir: str | Path, model_dir: str | Path, config: ModelConfig | None = None,
                      train_config=None, num_workers: int = 2, timeout: float = 1800.0) -> dict:
    """Train on the shard set ``shard_dir`` with ``num_workers`` local worker processes (see the module doc);
    returns the chief's log record (``step``, ``examples_per_second``, ``train_elbo_last_100``, ...).

    Raises :class:`ModelError` with the failing worker's log tail if a worker fails (the others are
    stopped)."""
    from vaestream import shardset
    from vaestream.training import TrainConfig, prepare_model_dir

    cfg = train_config or TrainConfig()
    if num_workers < 1:
        raise ConfigError("num_workers must be at least 1")
    if cfg.batch_size % num_workers:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {num_workers} workers")
    m = shardset.read_manifest(shard_dir)
    model_dir = Path(model_dir)
    config = prepare_model_dir(model_dir, config, tuple(m.shape), cfg, str(shard_dir))
    ports = free_ports(num_workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, logs = [], []
    for i in range(num_workers):
        spec = {"index": i, "workers": num_workers, "shards": str(shard_dir), "model_dir": str(model_dir),
                "config": config.to_dict(), "train_config": dataclasses.asdict(cfg)}
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   VAESTREAM_WORKER_SPEC=json.dumps(spec))
        log = open(model_dir / f".worker-{i}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "vaestream.distributed"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    t0 = time.time()
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if time.time() - t0 > timeout:
                failed = -1
                break
            time.sleep(0.2)
        if failed is None:
            bad = [i for i, p in enumerate(procs) if p.returncode != 0]
            failed = bad[0] if bad else None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if failed is not None:
        which = max(failed, 0)
        tail = (model_dir / f".worker-{which}.log").read_text()[-3000:]
        what = "timed out" if failed == -1 else f"worker {which} failed (exit {procs[which].returncode})"
        raise ModelError(f"distributed training {what}:\n{tail}")
    for i in range(num_workers):
        (model_dir / f".worker-{i}.log").unlink(missing_ok=True)
    lines = [json.loads(l) for l in (model_dir / "log.jsonl").read_text().splitlines() if l.strip()]
    return lines[-1]


if __name__ == "__main__":
    _worker(json.loads(os.environ["VAESTREAM_WORKER_SPEC"]))
    sys.exit(0)

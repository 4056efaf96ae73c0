"""Publishing an online learner's checkpoints: held-out evaluation, coder tables and export, off the training thread.

At each checkpoint :class:`vaestream.online.learner.OnlineLearner` hands the :class:`Publisher` a *snapshot*: a copy of
the weights just saved (NumPy arrays), the held-out inputs, calibration records and the ledger's counts of that moment.
Snapshots and the published version are evaluated through one VAE of the publisher's (the weights assigned in turn), so
its compiled evaluation is reused across checkpoints. The publisher computes the held-out mean ELBO of the snapshot and
of the published version on the same set, and when the snapshot is better by more than ``min_improvement`` nats/record
it builds coder tables from the calibration records and publishes it as the next version of the registry, exported from
that VAE in memory (the learner's own checkpoints may move on meanwhile). The traced export is kept between publications
(:class:`vaestream.serving.export.ExportCache`): after the first, a version is the first one's saved graph with new
variables and assets (~0.05 s instead of ~0.5 s of ``tf.saved_model.save``), and the coder tables come from an encoder
traced once. A publication then costs ~0.1 s of CPU (evaluation, tables, export) for a 784-200-10 model.

In the background (the default) one thread does this while learning goes on; a checkpoint never waits for it.
One snapshot waits while the thread is busy; a newer checkpoint replaces a waiting, not yet started one (under
a backlog, the newest weights are the ones judged). :meth:`Publisher.wait` returns when the queue is empty and
raises the thread's exception, if any.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np



class Publisher:
    """Evaluates snapshots and publishes the better ones (see the module docstring).

    Args:
      work: the learner's work directory.
      model_dir: the learner's model directory (gets the published coder tables; named in the registry log).
      registry: the :class:`vaestream.online.registry.Registry`.
      seed: the evaluation seed (z noise of the held-out bound).
      min_improvement: nats/record a snapshot must gain over the published version.
      background: evaluate and publish on a background thread (False: in :meth:`submit`).
      log: called with each ``evaluate`` / ``publish`` event (a JSON-able dict).
      on_publish: called with each publication record ``{"version", "fingerprint", "step", "holdout_elbo"}``.
      published: the published version's ``(version number, VAE)`` when resuming, or None.
      lock: the lock ``log`` and ``on_publish`` take (shared with the learner's ledger writes).
      share: the most of the wall time the background thread is busy: after a job of t seconds it starts the
        next no sooner than ``t * (1 / share - 1)`` s later (a newer checkpoint replaces the waiting one
        meanwhile; :meth:`wait` starts it at once). 1: no pause.
      interval: the least seconds between the starts of two jobs of the background thread (the same
        replacing and flushing). 0: none.
    """

    def __init__(self, work: Path, model_dir: Path, registry, seed: int, min_improvement: float, background: bool,
                 log: Callable[[dict], None], on_publish: Callable[[dict], None],
                 published: tuple[int, object] | None = None, lock: threading.RLock | None = None,
                 share: float = 1.0, interval: float = 0.0):
        self.work, self.model_dir, self.registry = Path(work), Path(model_dir), registry
        self.seed, self.min_improvement, self.background = seed, min_improvement, background
        self._log, self._on_publish = log, on_publish
        self.version, self.weights = None, None     # the published version and its weights (NumPy arrays)
        if published is not None:
            self.version, self.weights = published[0], [w.numpy() for w in published[1].weights()]
        self._lock = lock or threading.RLock()
        self._eval = None          # the VAE every evaluation and export goes through
        self._encode = None        # its compiled encoder (coder tables)
        self._eval_lock = threading.RLock()  # held while it is in use (the learner's evaluate() may call in)
        self._exports = None       # the evaluation VAE's traced export (vaestream.serving.export.ExportCache)
        self._pool = None          # one background thread
        self._job = None           # its future, while it runs
        self._queued = None        # the newest snapshot, waiting for the thread
        if not 0 < share <= 1:
            from vaestream.errors import ConfigError

            raise ConfigError(f"publish share must be in (0, 1], got {share}")
        self.share, self.interval = float(share), max(0.0, float(interval))
        self._flush = threading.Event()  # set by wait(): end the pause between jobs now

    def _with(self, config, weights):
        """The evaluation VAE holding ``weights``."""
        import tensorflow as tf

        from vaestream.model import VAE

        if self._eval is None:
            self._eval = VAE(config)
            # the coder's calibration encoding, traced once for every publication (any number of records)
            self._encode = tf.function(self._eval.encoder_params_exact,
                                       input_signature=[tf.TensorSpec([None, config.input_dim], tf.float32)])
        for v, w in zip(self._eval.weights(), weights):
            v.assign(w)
        return self._eval

    def _tables(self, model, calibration: np.ndarray):
        """The coder tables of the evaluation VAE ``model`` from the calibration inputs [C, D] (what
        :func:`vaestream.coding.codec.build_tables` computes: the posteriors of the records, in fixed row
        blocks, so the same for any batching; then the tables of those statistics), through the encoding traced
        once instead of a new trace per publication."""
        from vaestream.coding.tables import build_tables_from_stats
        from vaestream.errors import DataError

        x = np.asarray(calibration, np.float32).reshape(len(calibration), -1)
        if len(x) < 2:
            raise DataError(f"calibration: need at least 2 records, got {len(x)}")
        mean, log_scale = self._encode(x)
        return build_tables_from_stats(model.fingerprint(), mean.numpy(), log_scale.numpy())

    def evaluate(self, model, x: np.ndarray, step: int) -> dict:
        """Held-out mean ELBO (nats/record) of ``model`` (a VAE, or a snapshot's weights) and, if any, of the
        published version, on ``x`` [N, D]."""
        from vaestream.training import dataset_elbo

        with self._eval_lock:
            if isinstance(model, dict):
                model = self._with(model["config"], model["weights"])
            out = {"holdout_records": len(x), "step": step,
                   "holdout_elbo": dataset_elbo(model, x, seed=self.seed, jit_compile=False)["elbo"]}
            if self.weights is not None:
                out["published_elbo"] = dataset_elbo(self._with(model.config, self.weights), x, seed=self.seed,
                                                     jit_compile=False)["elbo"]
                out["published_version"] = self.version
        return out

    def snapshot(self, model, holdout: np.ndarray | None, calibration: np.ndarray, step: int, files: int,
                 records_trained: int, weights: list[np.ndarray] | None = None) -> dict:
        """Fix what a publication needs now: a copy of ``model``'s weights (or ``weights``, copies taken
        earlier), the held-out inputs [N, D] (None: no hold-out set yet), the calibration inputs [C, D] and the
        ledger's counts."""
        if weights is None:
            weights = [w.numpy() for w in model.weights()]
        return {"model": {"config": model.config, "weights": weights},
                "holdout": holdout, "calibration": calibration, "step": step, "files": files,
                "records_trained": records_trained}

    def submit(self, snap: dict) -> dict | None:
        """Evaluate (and maybe publish) a snapshot: queued for the background thread, or now (then returns the
        publication record, or None)."""
        if not self.background:
            return self.evaluate_and_publish(snap)
        with self._lock:
            self._queued = snap
            if self._job is None:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vaestream-publish")
                self._job = self._pool.submit(self._drain)
        return None

    def wait(self) -> None:
        """Return when no snapshot is queued or being published; raises the background thread's exception."""
        with self._lock:
            job = self._job
        if job is not None:
            self._flush.set()
            try:
                job.result()
            finally:
                self._flush.clear()

    def close(self) -> None:
        """:meth:`wait`, then stop the thread (a later :meth:`submit` starts a new one)."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _drain(self) -> None:
        while True:
            with self._lock:
                snap, self._queued = self._queued, None
                if snap is None:
                    self._job = None
                    return
            t0 = time.perf_counter()
            try:
                self.evaluate_and_publish(snap)
            except BaseException:
                with self._lock:
                    self._job = None
                raise
            busy = time.perf_counter() - t0
            pause = max(busy * (1.0 / self.share - 1.0), self.interval - busy)
            if pause > 0:
                self._flush.wait(pause)

    def warm(self, config, weights: list[np.ndarray], calibration: np.ndarray) -> float:
        """Trace the evaluation, coder-table and export programs once, on this thread, with ``weights`` and the
        calibration inputs ``calibration`` [C, D]: a one-off cost, like a compile, so that no publication traces
        while learning goes on. The export goes to a temporary directory (then discarded) in full and verified;
        every version after it reuses its saved graph (:class:`vaestream.serving.export.ExportCache`). Returns
        the seconds it took."""
        import tempfile

        from vaestream.serving.export import ExportCache, export_model
        from vaestream.training import dataset_elbo

        t0 = time.perf_counter()
        with self._eval_lock:
            model = self._with(config, weights)
            for n in (len(calibration), len(calibration) // 3):  # two batch shapes: the trace for any size
                dataset_elbo(model, calibration[:max(n, 1)], seed=self.seed, jit_compile=False)
            tables = self._tables(model, calibration)
            if self._exports is None:
                self._exports = ExportCache()
            with tempfile.TemporaryDirectory(prefix="vaestream-warm-") as d:
                export_model(model, d, tables, cache=self._exports)  # verified: the graph later versions reuse
        return time.perf_counter() - t0

    def evaluate_and_publish(self, snap: dict) -> dict | None:
        """Evaluate a snapshot now, on this thread, and publish it if it beats the published version; returns
        the publication record or None."""
        if snap["holdout"] is None or not len(snap["holdout"]):
            return None
        t0 = time.perf_counter()
        ev = self.evaluate(snap["model"], snap["holdout"], snap["step"])
        self._log({"event": "evaluate", **ev, "seconds": round(time.perf_counter() - t0, 4),
                   "time": time.time()})
        if "published_elbo" in ev and ev["holdout_elbo"] <= ev["published_elbo"] + self.min_improvement:
            return None
        from vaestream.binio import atomic_write
        from vaestream.serving.export import TABLES_ASSET, ExportCache

        t0 = time.perf_counter()
        with self._eval_lock:
            model = self._with(snap["model"]["config"], snap["model"]["weights"])
            tables = self._tables(model, snap["calibration"])
            t_tables = time.perf_counter()
            if self._exports is None:
                self._exports = ExportCache()
            ver = self.registry.publish_model(model, tables, cache=self._exports, model_dir=self.model_dir, metadata={
                "step": ev["step"], "holdout_elbo": ev["holdout_elbo"], "files": snap["files"],
                "records_trained": snap["records_trained"], "previous_elbo": ev.get("published_elbo")})
        shipped = ver.path / "assets" / TABLES_ASSET  # the file the version ships (the tables written once)
        if shipped.is_file():
            atomic_write(self.model_dir / "coder_tables.npz", shipped.read_bytes())
        else:
            tables.save(self.model_dir / "coder_tables.npz")
        rec = {"version": ver.version, "fingerprint": ver.fingerprint, "step": ev["step"],
               "holdout_elbo": ev["holdout_elbo"]}
        with self._lock:
            self._on_publish(rec)
            self.weights, self.version = snap["model"]["weights"], ver.version
        self._log({"event": "publish", **rec, "seconds_tables": round(t_tables - t0, 4),
                   "seconds_export": round(time.perf_counter() - t_tables, 4), "time": time.time()})
        return rec


def load_published(registry, version: int, config):
    """The weights of a published version as a VAE of ``config`` (read from its SavedModel), or None when the
    SavedModel has no model or its fingerprint is not the registry's (for comparisons after a restart)."""
    import tensorflow as tf

    from vaestream.model import VAE

    path = registry.get(version).path
    m = VAE(config)
    loaded = tf.saved_model.load(str(path))
    if not hasattr(loaded, "model"):
        return None
    weights = []
    for mlp in (loaded.model.encoder, loaded.model.decoder):
        for layer in list(mlp.hidden) + [mlp.out]:
            weights += [layer.w, layer.b]
    for v, w in zip(m.weights(), weights):
        v.assign(w)
    if m.fingerprint() != registry.get(version).fingerprint:
        return None
    return m

"""Evaluation: the test lower bound and the importance-sampled marginal likelihood, nats and bits/dim."""

from __future__ import annotations

import numpy as np

from vaestream.data import Dataset
from vaestream.model import VAE
from vaestream.objective import bits_per_dim, log_likelihood
from vaestream.training import dataset_elbo, evaluation_set


def evaluate(model: VAE, data: Dataset, k: int = 0, max_records: int | None = None, batch_size: int = 100,
             seed: int = 0, progress: bool = False) -> dict:
    """Evaluate ``model`` on ``data``.

    Returns a dict with the mean ELBO (estimator B, L = 1) and its terms in nats per record, the ELBO in
    bits/dim, and, if ``k > 0``, the importance-sampled estimate of log p(x) with k samples
    (:func:`vaestream.objective.log_likelihood`), in nats and bits/dim. Data with dynamic binarisation is
    evaluated on one fixed Bernoulli sample of it.

    Args:
      max_records: evaluate the first ``max_records`` records only (None: all).
      progress: draw a progress bar (records) on stderr over the importance sampling, which takes minutes for
        k in the thousands.
    """
    view = evaluation_set(data, max_records)
    out = {"data": view.name, "records": len(view)}
    r = dataset_elbo(model, view)
    out.update({"elbo": r["elbo"], "rate": r["rate"], "distortion": r["distortion"],
                "elbo_bits_per_dim": r["bits_per_dim"]})
    if k > 0:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(view), unit="rec", dynamic_ncols=True, desc=f"log p(x), k={k}")
        try:
            ll = np.concatenate([log_likelihood(model, xb, k=k, batch_size=batch_size, seed=seed + i,
                                                on_batch=bar.update if bar is not None else None)
                                 for i, xb in enumerate(view.iter_batches(1000))])
        finally:
            if bar is not None:
                bar.close()
        out.update({"k": k, "log_px": float(ll.mean()),
                    "log_px_bits_per_dim": float(bits_per_dim(-ll.mean(), model.config.input_dim))})
    return out

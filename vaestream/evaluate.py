"""Evaluation: the test lower bound and the importance-sampled marginal likelihood, nats and bits/dim."""

from __future__ import annotations

import numpy as np

from vaestream.data import Dataset
from vaestream.model import VAE
from vaestream.objective import bits_per_dim, log_likelihood
from vaestream.training import dataset_elbo, evaluation_set


def evaluate(model: VAE, data: Dataset, k: int = 0, max_records: int | None = None, batch_size: int = 100,
             seed: int = 0) -> dict:
    """Evaluate ``model`` on ``data``.

    Returns a dict with the mean ELBO (estimator B, L = 1) and its terms in nats per record, the ELBO in
    bits/dim, and, if ``k > 0``, the importance-sampled estimate of log p(x) with k samples
    (:func:`vaestream.objective.log_likelihood`), in nats and bits/dim. Data with dynamic binarisation is
    evaluated on one fixed Bernoulli sample of it.

    Args:
      max_records: evaluate the first ``max_records`` records only (None: all).
    """
    view = evaluation_set(data, max_records)
    out = {"data": view.name, "records": len(view)}
    r = dataset_elbo(model, view)
    out.update({"elbo": r["elbo"], "rate": r["rate"], "distortion": r["distortion"],
                "elbo_bits_per_dim": r["bits_per_dim"]})
    if k > 0:
        ll = np.concatenate([log_likelihood(model, xb, k=k, batch_size=batch_size, seed=seed + i)
                             for i, xb in enumerate(view.iter_batches(1000))])
        out.update({"k": k, "log_px": float(ll.mean()),
                    "log_px_bits_per_dim": float(bits_per_dim(-ll.mean(), model.config.input_dim))})
    return out

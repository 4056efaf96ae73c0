"""Pictures: learning curves (the paper's Figure 2), reconstructions, and the 2-D latent manifold (Figure 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import norm

from vaestream.model import VAE


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Lower bound (nats/record) vs. training samples evaluated, log-scaled x, one colour per run.

    ``runs`` maps a label to a training log (the records of ``log.jsonl``); train bounds are solid lines and
    test (or validation) bounds dashed, as the paper's Figure 2. Every evaluation is also a marker (circles
    train, squares test, triangles validation), so a short run's one or two evaluations show as points.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, log) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for key, style, marker in (("train_elbo", "-", "o"), ("test_elbo", "--", "s"), ("valid_elbo", ":", "^")):
            points = [(r["samples"], r[key]) for r in log if r.get(key) is not None and r.get("samples")]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker=marker, markersize=4, color=color,
                        label=f"{label} ({key.split('_')[0]})")
    ax.set_xscale("log")
    ax.set_xlabel("# training samples evaluated")
    ax.set_ylabel("lower bound L (nats / record)")
    ax.set_title(title or "AEVB lower bound")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def image_grid(images: np.ndarray, rows: int, cols: int, shape: Sequence[int]) -> np.ndarray:
    """Tile ``rows*cols`` flat images of ``shape`` (h, w) into one [rows*h, cols*w] array."""
    h, w = shape[0], shape[1] if len(shape) > 1 else 1
    imgs = np.asarray(images)[: rows * cols].reshape(-1, h, w)
    out = np.ones((rows * h, cols * w), imgs.dtype)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return out


def _save_grid(plt, grid: np.ndarray, figsize: tuple[float, float], title: str, fontsize: int, path: str | Path,
               **imshow) -> Path:
    """Draw an image grid in gray without axes, titled, and save it at 120 dpi."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.imshow(grid, cmap="gray", **imshow)
    ax.axis("off")
    ax.set_title(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def reconstructions(model: VAE, x: np.ndarray, path: str | Path, n: int = 16) -> Path:
    """Originals (top row) above their reconstructions E[x | z = mu(x)] (bottom row)."""
    plt = _plt()
    x = np.asarray(x[:n], np.float32)
    mean, _ = model.encoder_params(x)
    xr = model.decoder_params(mean)["x_mean"].numpy()
    shape = model.config.input_shape if len(model.config.input_shape) == 2 else (1, model.config.input_dim)
    grid = image_grid(np.concatenate([x, xr]), 2, len(x), shape)
    return _save_grid(plt, grid, (len(x) * 0.6, 1.6), "top: data, bottom: reconstruction", 8, path, vmin=0, vmax=1)


def manifold(model: VAE, path: str | Path, n: int = 20) -> Path:
    """For a 2-D latent space: decoder means on a grid of z = Phi^-1(u), u on an n x n grid in (0, 1)^2
    (linearly spaced coordinates of the unit square through the inverse Gaussian CDF, as the paper's Figure 4)."""
    if model.config.latent_dim != 2:
        raise ValueError(f"the manifold plot needs a 2-D latent space, this model has {model.config.latent_dim}")
    plt = _plt()
    u = np.linspace(0.5 / n, 1 - 0.5 / n, n)
    zs = norm.ppf(u)
    z = np.array([[a, b] for b in zs[::-1] for a in zs], np.float32)
    xm = model.decoder_params(z)["x_mean"].numpy()
    shape = model.config.input_shape if len(model.config.input_shape) == 2 else (1, model.config.input_dim)
    grid = image_grid(xm, n, n, shape)
    return _save_grid(plt, grid, (7, 7 * grid.shape[0] / grid.shape[1]), "learned data manifold (2-D latent space)",
                      9, path)

"""Rate-distortion curves of a model family against JPEG, WebP, AVIF and JPEG XL (``vaestream rd FAMILY``).

The family's curve is the lower envelope of all its operating points (every model, every quality of its ladder or, for a
near-lossless member, every pixel level count: what ``vaestream compress --family --psnr`` can pick; with
``per_record``, also each record at its own point, ``--per-record``), measured as container bits per record on the
records given; the peers are swept per image and tiled (:mod:`vaestream.evaluation.peers`). BD-rate
(:func:`vaestream.metrics.bd_rate`) is computed against each peer over the PSNR range both cover, and over that range
cut to ``psnr_range`` (default 18-32 dB). SSIM is reported beside PSNR at every point.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from vaestream.coding import family as family_mod
from vaestream.coding.per_record import PerRecordCoder, candidates
from vaestream.errors import ConfigError, DataError
from vaestream.evaluation import peers as peers_mod
from vaestream.metrics import bd_rate, envelope, ssim

PSNR_RANGE = (18.0, 32.0)


def family_points(family: str | os.PathLike, records, rdo: bool = False) -> list[dict]:
    """Every operating point of ``family`` on ``records`` (each lossy member's qualities, and with ``rdo`` its
    rate-distortion optimised points; each near-lossless member's pixel levels:
    :func:`vaestream.coding.family.member_points`), with SSIM, ``"model"`` (the directory's name) and
    ``"bits_per_image"``."""
    out = []
    for d in family_mod.members(family):
        for r in family_mod.member_points(d, records, with_ssim=True, rdo=rdo):
            out.append({**r.to_dict(), "model": d.name, "bits_per_image": r.bits_per_record})
    return out


def per_record_curve(fam: str | os.PathLike, records, targets, points: list | None = None,
                     log=None) -> list[dict]:
    """The family's per-record points at PSNR ``targets`` (dB) on ``records`` (uint8 ``[N, H, W]`` pictures):
    each coded for real (:meth:`vaestream.coding.per_record.PerRecordCoder.encode`), ``{"model": "per-record",
    "target_psnr_db", "bits_per_record", "bits_per_image", "mse", "psnr_db", "ssim", "lmbda", "streams",
    "encode_seconds"}``; a target out of reach gives ``{"target_psnr_db", "error"}``. ``log`` receives each row."""
    import time

    x = np.asarray(records)
    points = candidates(fam, x) if points is None else points
    xf = x.astype(np.float64) / 255.0
    rows = []
    for target in targets:
        t0 = time.time()
        try:
            r = PerRecordCoder(fam, psnr=float(target), points=points).encode(x)
        except ConfigError as e:
            rows.append({"target_psnr_db": float(target), "error": str(e)})
            continue
        y = r.reconstruction.reshape(x.shape).astype(np.float64) / 255.0
        rows.append({"model": "per-record", "target_psnr_db": float(target), "bits_per_record": r.bits_per_record,
                     "bits_per_image": r.bits_per_record, "mse": float(np.mean((y - xf) ** 2)),
                     "psnr_db": r.psnr_db, "ssim": ssim(y, xf), "lmbda": r.lmbda,
                     "streams": r.streams, "encode_seconds": round(time.time() - t0, 1)})
        if log is not None:
            log(rows[-1])
    return rows


def compare(family: str | os.PathLike, records: np.ndarray, formats: Sequence[str] = ("JPEG", "WEBP", "AVIF", "JXL"),
            per_image_n: int = 1000, tiled_n: int | None = None,
            psnr_range: tuple[float, float] = PSNR_RANGE, rdo: bool = False,
            per_record: Sequence[float] = ()) -> dict:
    """The family's points and envelope, the peers' curves and the BD-rates (percent; negative: vaestream needs
    fewer bits) against each peer curve and against the best tiled JPEG/WebP at each PSNR.

    ``records``: ``[N, H, W]`` uint8 pictures (the family is measured on all of them, tiled peers on the first
    ``tiled_n``, per-image peers on the first ``per_image_n``); ``rdo``: with the rate-distortion optimised
    points (:func:`family_points`); ``per_record``: PSNR targets at which the family also codes each record at its
    own point (:func:`per_record_curve`, model ``"per-record"``; out-of-reach targets are left out)."""
    imgs = np.asarray(records)
    if imgs.dtype != np.uint8 or imgs.ndim != 3:
        raise DataError(f"records must be [N, H, W] uint8 pictures, got {imgs.shape} {imgs.dtype}")
    points = family_points(family, imgs, rdo=rdo)
    if per_record:
        points += [r for r in per_record_curve(family, imgs, per_record) if "error" not in r]
    have = peers_mod.available()
    curves, missing = {}, [f for f in formats if not have.get(f)]
    for fmt in formats:
        if not have.get(fmt):
            continue
        curves[f"{fmt.lower()}_per_image"] = peers_mod.lossy_curve(imgs[:per_image_n], fmt, tiled=False)
        curves[f"{fmt.lower()}_tiled"] = peers_mod.lossy_curve(imgs[:tiled_n], fmt, tiled=True)
    return {**summarise(points, curves, len(imgs), psnr_range), "unavailable_peers": missing}


def summarise(points: Sequence[dict], peers: dict, records: int,
              psnr_range: tuple[float, float] = PSNR_RANGE) -> dict:
    """The family's ``points`` against the ``peers`` curves (``{name: [points]}``; the best tiled JPEG/WebP
    curve is added): ``{"records", "points", "envelope", "peers", "bd_rate_pct", "psnr_range"}``, the BD-rates
    over each overlap and over it cut to ``psnr_range``."""
    curves = {k: v for k, v in peers.items() if k != "best_tiled_jpeg_webp"}
    best = [r for k in ("jpeg_tiled", "webp_tiled") if k in curves for r in curves[k]]
    if best:
        curves["best_tiled_jpeg_webp"] = [{"bits_per_image": b, "psnr_db": p} for p, b in envelope(best)]
    bd = {k: {"overlap": bd_rate(points, c), "range": bd_rate(points, c, psnr_range)} for k, c in curves.items()}
    return {"records": int(records), "points": list(points),
            "envelope": [{"psnr_db": p, "bits_per_image": b} for p, b in envelope(points)],
            "peers": curves, "bd_rate_pct": bd, "psnr_range": list(psnr_range)}


def plot(result: dict, path: str | os.PathLike, title: str = "") -> Path:
    """One PNG: the family's points (per model) and envelope, every peer curve; log bits vs PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name in sorted({p["model"] for p in result["points"]}):
        pts = sorted((p for p in result["points"] if p["model"] == name), key=lambda p: p["bits_per_image"])
        ax.plot([p["bits_per_image"] for p in pts], [p["psnr_db"] for p in pts], ".", ms=4, alpha=0.5)
    env = result["envelope"]
    ax.plot([e["bits_per_image"] for e in env], [e["psnr_db"] for e in env], "o-", lw=2.5, c="k", label="vaestream")
    marks = {"jpeg": "s", "webp": "^", "avif": "D", "jxl": "v", "best": "x"}
    for k, cv in result["peers"].items():
        cv = sorted(cv, key=lambda r: r["bits_per_image"])
        style = ("--" if "per_image" in k else "-") + marks[k.split("_")[0]]
        bd = result["bd_rate_pct"][k]["overlap"]["bd_rate_pct"]
        label = k + (f" (BD-rate {bd:+.0f}%)" if bd is not None else "")
        ax.plot([r["bits_per_image"] for r in cv], [r["psnr_db"] for r in cv], style, ms=3, alpha=0.8, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("bits per image")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title or f"rate-distortion on {result['records']} images")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

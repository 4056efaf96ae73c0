"""``vaestream compress --model MODEL_DIR --psnr DB | --bpp BITS`` on a model with a learned entropy model: the rate
level meeting the target, measured on the input (or on ``--select-on`` records), as ``--family`` picks a member's
operating point (:func:`vaestream.coding.family.choose`: with ``--psnr`` the fewest bits reaching it, with ``--bpp``
the best PSNR within it; PSNR over all values of the measured records, bits of the whole container)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def is_learned_model(path: str | None) -> bool:
    """Whether ``path`` is a model directory whose config names a learned entropy model."""
    from vaestream.store import read_config

    return path is not None and (Path(path) / "config.json").is_file() and bool(read_config(path).entropy_model)


def level_points(codec, records) -> list[dict]:
    """Each rate level of ``codec`` (a :class:`vaestream.coding.learned.LearnedCodec`) on ``records``: its
    quality, lambda, container bytes, bits per record and per value, and the PSNR (dB) of the decoded records."""
    from vaestream.metrics import psnr_db

    x, _ = codec.model_inputs(records, "records")
    truth = x.reshape(len(x), -1).astype(np.float64)
    rows = []
    for level, q in enumerate(codec.qualities):
        blob = codec.compress(x, quality=q)
        x_hat = np.asarray(codec.decompress(blob), np.float64).reshape(truth.shape)
        bits = 8 * len(blob) / len(x)
        rows.append({"level": level, "quality": q, "lmbda": float(codec.config.rd_lambdas[level]),
                     "bytes": len(blob), "bits_per_record": bits, "bits_per_value": bits / truth.shape[1],
                     "psnr_db": psnr_db(float(np.mean((truth - x_hat) ** 2)))})
    return rows


def choose_level(points: list[dict], psnr: float | None = None, bpp: float | None = None,
                 name: str = "model") -> dict:
    """The point of :func:`level_points` for one target: ``psnr``: the fewest bits with at least that PSNR;
    ``bpp``: the best PSNR within that many bits per value. :class:`ConfigError` naming ``name`` and the
    nearest level when none meets it."""
    from vaestream.errors import ConfigError

    if (psnr is None) == (bpp is None):
        raise ConfigError("give one target: --psnr (dB) or --bpp (bits per value)")
    target = psnr if psnr is not None else bpp
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ConfigError(f"target must be a positive number, got {target!r}")
    if psnr is not None:
        ok = [p for p in points if p["psnr_db"] >= psnr]
        if not ok:
            best = max(points, key=lambda p: p["psnr_db"])
            raise ConfigError(f"no rate level of {name} reaches {psnr:g} dB on these records (best: level "
                              f"{best['level']}, {best['psnr_db']:.2f} dB at {best['bits_per_record']:.1f} "
                              "bits/record)")
        return min(ok, key=lambda p: (p["bits_per_record"], -p["psnr_db"]))
    ok = [p for p in points if p["bits_per_value"] <= bpp]
    if not ok:
        least = min(points, key=lambda p: p["bits_per_value"])
        raise ConfigError(f"no rate level of {name} fits {bpp:g} bits per value on these records (least: level "
                          f"{least['level']}, {least['bits_per_value']:.4f} bits per value)")
    return max(ok, key=lambda p: (p["psnr_db"], -p["bits_per_record"]))


def compress_to_target(a: argparse.Namespace, records) -> int:
    """``compress --model MODEL_DIR --psnr / --bpp`` (module docstring): writes the container at the level chosen,
    prints its JSON summary (with the level's measured PSNR and bits); returns the exit code."""
    from vaestream import data
    from vaestream.binio import atomic_write
    from vaestream.coding import codec as codec_mod
    from vaestream.errors import ConfigError

    if a.append or a.lossless or a.levels or a.rdo_lmbda is not None or a.rdo or a.per_record:
        raise ConfigError("--psnr / --bpp with a learned entropy model pick its rate level: no --append, "
                          "--lossless, --levels, --rdo-lmbda, --rdo or --per-record")
    codec = codec_mod.load(a.model)
    probe = data.read_array(a.select_on, key=a.key) if a.select_on else records
    pick = choose_level(level_points(codec, probe), psnr=a.psnr, bpp=a.bpp, name=str(a.model))
    blob = codec.compress(records, quality=pick["quality"])
    atomic_write(a.output, blob)
    print(json.dumps({"output": str(a.output), "records": int(len(records)), "bytes": len(blob),
                      "bits_per_record": 8 * len(blob) / max(len(records), 1), "model": str(a.model),
                      "level": pick["level"], "quality": pick["quality"], "lmbda": pick["lmbda"],
                      "selected_on": str(a.select_on) if a.select_on else "input",
                      "selection_psnr_db": pick["psnr_db"], "selection_bits_per_record": pick["bits_per_record"]}))
    return 0

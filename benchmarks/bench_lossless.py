"""Benchmark of vaestream's lossless mode (bits-back ANS, vaestream.lossless) on MNIST and Fashion-MNIST.

For each data set: train a 784-300-20 beta-binomial VAE on the training images with a bounded budget
(``--steps`` / ``--train-seconds``), then on the first ``--n`` test images measure, in the same run:

* vaestream lossless bits/dim (the whole container) and the model's own negative ELBO in bits/dim (the
  limit bits-back coding approaches; estimator B, 8 z samples per record): the overhead as a ratio;
* gzip -9, bz2 -9, lzma -9e, zstd -19 on the raw 8-bit pixels, tiled (all records in one stream; also
  on the whole test set) and per image (one stream per image, first ``--per-image`` records); PNG and
  WebP lossless (Pillow) tiled (1,000 images per picture, 25 x 40) and per image: bits/dim and each
  one's ratio to vaestream;
* vaestream per image: the first 100 records each compressed alone, as a whole container and as a bare
  frame payload (what a record costs inside a larger container of many frames);
* compress / decompress throughput (images/s) of vaestream and, as a yardstick, of lzma and gzip on the
  same records; and that every record decodes exactly.

Published anchors on MNIST (Townsend et al. 2019, table 2): gzip 1.63, bz2 1.41, lzma 1.39, PNG 2.80,
WebP 2.10 bits/dim; BB-ANS 1.41 (its model's -ELBO 1.39).

Prints one JSON document (and writes it to ``--out`` if given). Usage:

    python benchmarks/bench_lossless.py [--n 10000] [--steps 12000] [--train-seconds 300] [--out runs/lossless.json]
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import lzma
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

DATASETS = {"mnist": Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist",
            "fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
TILE = 1000
TILE_GRID = (25, 40)
PUBLISHED_MNIST = {"gzip": 1.63, "bz2": 1.41, "lzma": 1.39, "png": 2.80, "webp": 2.10, "bb-ans": 1.41}


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=19).compress(data)


STREAM_CODECS = {
    "gzip": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
    "bz2": lambda b: bz2.compress(b, 9),
    "lzma": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
    "zstd-19": _zstd,
}
# One 784-byte image needs no 64 MiB dictionary: the same settings with a 64 KiB one give the same bytes per
# image in 1/1000 of the time (allocating the big dictionary costs 0.1 s per call).
_LZMA_SMALL = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 16}]
PER_IMAGE_CODECS = dict(STREAM_CODECS, lzma=lambda b: lzma.compress(b, filters=_LZMA_SMALL))


def _image_bytes(img: np.ndarray, fmt: str) -> int:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(img, mode="L").save(buf, format="PNG", optimize=True)
    else:
        Image.fromarray(img, mode="L").save(buf, format="WEBP", lossless=True, quality=100, method=6)
    return len(buf.getvalue())


def _tiles(x: np.ndarray) -> list[np.ndarray]:
    r, c = TILE_GRID
    out = []
    for s in range(0, len(x), TILE):
        blk = x[s:s + TILE]
        if len(blk) < TILE:
            blk = np.concatenate([blk, np.zeros((TILE - len(blk),) + blk.shape[1:], blk.dtype)])
        out.append(blk.reshape(r, c, 28, 28).transpose(0, 2, 1, 3).reshape(r * 28, c * 28))
    return out


def baselines(x: np.ndarray, per_image: int) -> dict:
    """bits/dim of the classical lossless codecs on uint8 images ``[N, 28, 28]``: tiled (gzip & co.: all N in
    one stream; PNG/WebP: pictures of 1,000) and per image (one stream or file per image, on the first
    ``per_image`` records)."""
    dims = x.size
    xp = x[:per_image]
    res = {}
    raw = x.tobytes()
    for name, fn in STREAM_CODECS.items():
        t0 = time.perf_counter()
        tiled = len(fn(raw))
        t_tiled = time.perf_counter() - t0
        per = sum(len(PER_IMAGE_CODECS[name](im.tobytes())) for im in xp)
        res[name] = {"tiled": 8 * tiled / dims, "per_image": 8 * per / xp.size,
                     "tiled_compress_images_per_s": len(x) / t_tiled}
    for fmt in ("png", "webp"):
        per = sum(_image_bytes(im, fmt) for im in xp)
        tiled = sum(_image_bytes(t, fmt) for t in _tiles(x))
        res[fmt] = {"tiled": 8 * tiled / dims, "per_image": 8 * per / xp.size}
    t0 = time.perf_counter()
    lz = STREAM_CODECS["lzma"](raw)
    t1 = time.perf_counter()
    lzma.decompress(lz)
    res["lzma"]["tiled_decompress_images_per_s"] = len(x) / (time.perf_counter() - t1)
    res["lzma"]["tiled_compress_images_per_s"] = len(x) / (t1 - t0)
    return res


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_dataset(name: str, root: Path, n: int, steps: int, train_seconds: float, workdir: Path,
                per_image: int, per_image_vae: int = 100) -> dict:
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.data import load_records, make_dataset
    from vaestream.lossless import LosslessCoder, ideal_bits

    train_records = load_records(str(root), "train")
    full_test = load_records(str(root), "test")
    test = full_test[:n]
    _log(f"{name}: training")
    t0 = time.time()
    res = train(make_dataset(train_records, "beta_binomial", f"{name}-train"), workdir / name,
                ModelConfig(latent_dim=20, hidden=(300,), likelihood="beta_binomial"),
                TrainConfig(steps=steps, max_seconds=train_seconds, seed=0, eval_every=10 ** 9), progress=False)
    train_s = time.time() - t0
    _log(f"{name}: trained {res.steps} steps in {train_s:.0f} s; -ELBO")
    model = res.model
    dims = test.size
    neg_elbo = ideal_bits(model, test, num_samples=8)
    coder = LosslessCoder(model)
    coder.compress(test[:8])  # trace the networks once, outside the timing
    _log(f"{name}: compress {len(test)}")
    t0 = time.perf_counter()
    blob = coder.compress(test)
    t_comp = time.perf_counter() - t0
    _log(f"{name}: decompress")
    t0 = time.perf_counter()
    back = coder.decompress(blob)
    t_dec = time.perf_counter() - t0
    exact = bool(np.array_equal(back, test))
    bpd = 8 * len(blob) / dims
    elbo_bpd = float(neg_elbo.sum() / dims)
    k = min(per_image_vae, len(test))
    singles = [len(coder.compress(test[i:i + 1])) for i in range(k)]
    single_frames = [len(coder.encode_frame(test[i:i + 1].reshape(1, -1).astype(np.int32))) for i in range(k)]
    _log(f"{name}: baselines")
    base = baselines(test, per_image)
    full_tiled = {k: 8 * len(fn(full_test.tobytes())) / full_test.size for k, fn in STREAM_CODECS.items()}
    _log(f"{name}: done")
    out = {
        "records": int(len(test)),
        "model": {"config": "784-300-20 beta-binomial", "train_steps": int(res.steps),
                  "train_seconds": round(train_s, 1)},
        "vaestream_lossless": {"bits_per_dim": bpd, "bytes": len(blob), "exact": exact,
                               "latent_bits": coder.latent_bits, "group": coder.group,
                               "compress_images_per_s": len(test) / t_comp,
                               "decompress_images_per_s": len(test) / t_dec},
        "vaestream_per_image": {"records": k, "container_bits_per_dim": 8 * sum(singles) / (k * test[0].size),
                                "frame_payload_bits_per_dim": 8 * sum(single_frames) / (k * test[0].size),
                                "neg_elbo_bits_per_dim": float(neg_elbo[:k].sum() / (k * test[0].size))},
        "neg_elbo_bits_per_dim": elbo_bpd,
        "overhead_vs_neg_elbo": bpd / elbo_bpd - 1.0,
        "baselines": base,
        "ratio_to_vaestream": {f"{k}_{mode}": base[k][mode] / bpd for k in base for mode in ("tiled", "per_image")},
        "per_image_records": int(min(per_image, len(test))),
        "tiled_whole_test_set_bits_per_dim": full_tiled,
    }
    if name == "mnist":
        out["published_mnist"] = PUBLISHED_MNIST
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="test records per data set")
    ap.add_argument("--steps", type=int, default=12000, help="training steps (minibatches of 100)")
    ap.add_argument("--train-seconds", type=float, default=300.0, help="training time budget per data set")
    ap.add_argument("--datasets", default="mnist,fashion-mnist")
    ap.add_argument("--per-image", type=int, default=1000, help="records the per-image baselines run on")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    report = {"benchmark": "lossless", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": sys.version.split()[0],
              "args": {k: str(v) for k, v in vars(args).items()}, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            root = DATASETS[name]
            if not (root / "t10k-images-idx3-ubyte.gz").exists():
                report["datasets"][name] = {"skipped": f"not found at {root}"}
                continue
            report["datasets"][name] = run_dataset(name, root, args.n, args.steps, args.train_seconds, Path(tmp),
                                                  args.per_image)
            print(json.dumps({name: report["datasets"][name]["vaestream_lossless"]}), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

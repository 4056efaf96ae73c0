"""Benchmark of vaestream's lossless mode (bits-back ANS, vaestream.lossless) on MNIST and Fashion-MNIST.

For each data set: train a beta-binomial VAE on the training images with a bounded budget (architecture
``--hidden`` / ``--latent-dim`` / ``--activation``; ``--steps`` with Adam at ``--lr`` decayed by ``--lr-decay``
over the run; ``--train-seconds`` per invocation), then on the first ``--n`` test images measure, in the
same run:

* vaestream lossless bits/dim (the whole container) and the model's own negative ELBO in bits/dim (the
  limit bits-back coding approaches; estimator B, 8 z samples per record): the overhead as a ratio;
* gzip -9, bz2 -9, lzma -9e, zstd -19 on the raw 8-bit pixels, tiled (all records in one stream; also
  on the whole test set) and per image (one stream per image, first ``--per-image`` records); PNG and
  WebP lossless (Pillow) tiled (1,000 images per picture, 25 x 40) and per image: bits/dim and each
  one's ratio to vaestream;
* vaestream per image: the first 100 records each compressed alone, as a whole container and as a bare
  frame payload (what a record costs inside a larger container of many frames);
* compress / decompress throughput (images/s) of vaestream and, as a yardstick, of lzma and gzip on the
  same records (``speed_vs_lzma``: vaestream's images/s over lzma -9e's; ``speed_vs_peers``: over each
  tiled peer's, gzip, bz2, lzma, zstd, PNG, WebP, compress and decompress); and that every record decodes
  exactly;
* ``scaling``: compress and streaming-decode (``iter_decompress``) time per image and tracemalloc peak memory at
  1,000 records and at ``--n``; ``initial_bits_per_frame`` (a one-record frame's payload over its -ELBO: the
  clean bits, frame header and final ANS state a frame pays once) and ``overhead_bits_per_frame`` (the whole
  stream over the records' -ELBO, per frame).

Published anchors on MNIST (Townsend et al. 2019, table 2): gzip 1.63, bz2 1.41, lzma 1.39, PNG 2.80,
WebP 2.10 bits/dim; BB-ANS 1.41 (its model's -ELBO 1.39).

**Model directories.** With ``--model-dir DIR`` each data set's model lives in ``DIR/<data set>`` (a
vaestream model directory) and is kept: an empty directory is trained, one with a checkpoint short of
``--steps`` resumes from it (exactly: the data order and z samples are functions of the step), and one that
has reached ``--steps`` is only loaded. So a long training can be spread over several invocations
(each bounded by ``--train-seconds``) and the figures re-measured without training again; the script
refuses (``ModelError``) a directory whose model has another architecture. ``DIR/<data set>/bench_train.json``
adds up the training time and steps of all invocations. Without ``--model-dir`` the model goes to a
temporary directory. Keep model directories out of git (``runs/`` is ignored).

Prints one JSON document (and writes it to ``--out`` if given). Usage:

    python benchmarks/bench_lossless.py [--n 10000] [--steps 12000] [--train-seconds 300] [--hidden 300]
        [--latent-dim 20] [--activation tanh] [--lr 1e-3] [--lr-decay 1.0] [--model-dir runs/lossless]
        [--datasets mnist,fashion-mnist] [--out runs/lossless.json]
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
import tracemalloc
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
STREAM_DECODERS = {"gzip": gzip.decompress, "bz2": bz2.decompress, "lzma": lzma.decompress,
                   "zstd-19": lambda b: __import__("zstandard").ZstdDecompressor().decompress(b)}
PER_IMAGE_CODECS = dict(STREAM_CODECS, lzma=lambda b: lzma.compress(b, filters=_LZMA_SMALL))


def _image_file(img: np.ndarray, fmt: str) -> bytes:
    """``img`` (uint8 ``[H, W]``) as a PNG (optimize) or lossless WebP (quality 100, method 6) file."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(img, mode="L").save(buf, format="PNG", optimize=True)
    else:
        Image.fromarray(img, mode="L").save(buf, format="WEBP", lossless=True, quality=100, method=6)
    return buf.getvalue()


def _image_bytes(img: np.ndarray, fmt: str) -> int:
    return len(_image_file(img, fmt))


def _image_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


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
        blob = fn(raw)
        t_tiled = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = STREAM_DECODERS[name](blob)
        t_back = time.perf_counter() - t0
        assert back == raw, name
        per = sum(len(PER_IMAGE_CODECS[name](im.tobytes())) for im in xp)
        res[name] = {"tiled": 8 * len(blob) / dims, "per_image": 8 * per / xp.size,
                     "tiled_compress_images_per_s": len(x) / t_tiled,
                     "tiled_decompress_images_per_s": len(x) / t_back}
    for fmt in ("png", "webp"):
        per = sum(_image_bytes(im, fmt) for im in xp)
        tiles = _tiles(x)
        t0 = time.perf_counter()
        files = [_image_file(t, fmt) for t in tiles]
        t_tiled = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = [_image_pixels(f) for f in files]
        t_back = time.perf_counter() - t0
        assert all(np.array_equal(a, b) for a, b in zip(back, tiles)), fmt
        res[fmt] = {"tiled": 8 * sum(map(len, files)) / dims, "per_image": 8 * per / xp.size,
                    "tiled_compress_images_per_s": len(x) / t_tiled,
                    "tiled_decompress_images_per_s": len(x) / t_back}
    t0 = time.perf_counter()
    lz = STREAM_CODECS["lzma"](raw)
    t1 = time.perf_counter()
    lzma.decompress(lz)
    res["lzma"]["tiled_decompress_images_per_s"] = len(x) / (time.perf_counter() - t1)
    res["lzma"]["tiled_compress_images_per_s"] = len(x) / (t1 - t0)
    return res


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _train_model(name: str, root: Path, model_dir: Path, arch: dict, steps: int, train_seconds: float,
                 lr: float, lr_decay: float) -> tuple:
    """Train (or resume, or only load) the model of ``model_dir``; returns (VAE, training record)."""
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.data import load_records, make_dataset

    config = ModelConfig(latent_dim=arch["latent_dim"], hidden=arch["hidden"], activation=arch["activation"],
                         likelihood="beta_binomial", top_latent_dim=arch.get("top_latent_dim", 0),
                         top_hidden=arch.get("top_hidden", (256,)))
    # lr * lr_decay^(step / steps): the step size falls by lr_decay over the planned run, whatever the
    # number of invocations it takes.
    tcfg = TrainConfig(steps=steps, max_seconds=train_seconds, seed=0, eval_every=10 ** 9, learning_rate=lr,
                       lr_decay_rate=lr_decay, lr_decay_steps=max(1, steps))
    ledger_path = model_dir / "bench_train.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {"seconds": 0.0, "invocations": []}
    _log(f"{name}: training in {model_dir}")
    t0 = time.time()
    res = train(make_dataset(load_records(str(root), "train"), "beta_binomial", f"{name}-train"), model_dir, config,
                tcfg, progress=False)
    took = time.time() - t0
    before = ledger["invocations"][-1]["step"] if ledger["invocations"] else 0
    if res.steps != before:
        ledger["seconds"] = round(ledger["seconds"] + took, 1)
        ledger["invocations"].append({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                      "step": int(res.steps), "seconds": round(took, 1)})
        ledger_path.write_text(json.dumps(ledger, indent=2) + "\n")
    _log(f"{name}: model at step {res.steps} of {steps} ({took:.0f} s now, {ledger['seconds']:.0f} s in all)")
    hid = "-".join(str(h) for h in config.hidden)
    top = (f" + z2 {config.top_latent_dim} (MLP {'-'.join(map(str, config.top_hidden))})"
           if config.top_latent_dim else "")
    record = {"config": f"784-{hid}-{config.latent_dim}{top} {config.activation} beta-binomial",
              "train_steps": int(res.steps), "planned_steps": int(steps), "epochs": round(res.steps / 600, 2),
              "train_seconds_this_run": round(took, 1), "train_seconds_total": ledger["seconds"],
              "lr": lr, "lr_decay_over_run": lr_decay, "model_dir": str(model_dir)}
    return res.model, record


def scaling_row(coder, x: np.ndarray) -> dict:
    """Compress ``x`` and decode the stream frame by frame (``iter_decompress``): ms per image of each (untraced
    passes), then the tracemalloc peak of each (NumPy's allocations during the call; ``x`` is not counted)."""
    m = len(x)
    t0 = time.perf_counter()
    b = coder.compress(x)
    tc = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_back = sum(len(fr) for fr in coder.iter_decompress(b))
    td = time.perf_counter() - t0
    tracemalloc.start()
    coder.compress(x)
    peak_c = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    for _fr in coder.iter_decompress(b):
        pass
    peak_d = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"compress_ms_per_image": 1e3 * tc / m, "stream_decode_ms_per_image": 1e3 * td / m,
            "records_back": int(n_back), "output_mib": len(b) / 2 ** 20, "peak_mib_compress": peak_c / 2 ** 20,
            "peak_mib_stream_decode": peak_d / 2 ** 20}


def run_dataset(name: str, root: Path, n: int, steps: int, train_seconds: float, model_dir: Path,
                per_image: int, per_image_vae: int = 100, arch: dict | None = None, lr: float = 1e-3,
                lr_decay: float = 1.0) -> dict:
    from vaestream.data import load_records
    from vaestream.coding.bitsback.coder import FORMAT, LosslessCoder

    arch = arch or {"hidden": (300,), "latent_dim": 20, "activation": "tanh"}
    full_test = load_records(str(root), "test")
    test = full_test[:n]
    model, train_record = _train_model(name, root, model_dir, arch, steps, train_seconds, lr, lr_decay)
    _log(f"{name}: -ELBO")
    dims = test.size
    neg_elbo = LosslessCoder(model).bits(test, num_samples=8)
    coder = LosslessCoder(model)
    coder.compress(test[:8])  # warm up (the likelihood grid, constriction models) outside the timing
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
    # time per image and peak memory (tracemalloc: NumPy's allocations) at 1,000 records and at all of them;
    # streaming decode (iter_decompress: one frame at a time) keeps memory flat
    _log(f"{name}: scaling")
    scaling = {str(m): scaling_row(coder, test[:m]) for m in sorted({min(1000, len(test)), len(test)})}
    k = min(per_image_vae, len(test))
    singles = [len(coder.compress(test[i:i + 1])) for i in range(k)]
    single_frames = [len(coder.encode_frame(test[i:i + 1].reshape(1, -1).astype(np.int32))) for i in range(k)]
    n_frames = -(-len(test) // coder.frame_records)
    _log(f"{name}: baselines")
    base = baselines(test, per_image)
    full_tiled = {k: 8 * len(fn(full_test.tobytes())) / full_test.size for k, fn in STREAM_CODECS.items()}
    _log(f"{name}: done")
    out = {
        "records": int(len(test)),
        "model": train_record,
        "vaestream_lossless": {"bits_per_dim": bpd, "bytes": len(blob), "exact": exact, "format": FORMAT,
                               "latent_bits": coder.latent_bits, "group": coder.group,
                               "frame_records": coder.frame_records, "frames": n_frames,
                               "blas_threads": coder.blas_threads,
                               "compress_images_per_s": len(test) / t_comp,
                               "decompress_images_per_s": len(test) / t_dec,
                               "overhead_bits_per_frame": float((8 * len(blob) - neg_elbo.sum()) / n_frames),
                               "scaling": scaling},
        "vaestream_per_image": {"records": k, "container_bits_per_dim": 8 * sum(singles) / (k * test[0].size),
                                "frame_payload_bits_per_dim": 8 * sum(single_frames) / (k * test[0].size),
                                "neg_elbo_bits_per_dim": float(neg_elbo[:k].sum() / (k * test[0].size)),
                                # what a frame's first record costs over its -ELBO: the initial ("clean") bits
                                # it borrowed from the seed, the 24-byte frame header and the final ANS state
                                "initial_bits_per_frame": float(8 * np.mean(single_frames) - neg_elbo[:k].mean())},
        "neg_elbo_bits_per_dim": elbo_bpd,
        "overhead_vs_neg_elbo": bpd / elbo_bpd - 1.0,
        "baselines": base,
        "ratio_to_vaestream": {f"{k}_{mode}": base[k][mode] / bpd for k in base for mode in ("tiled", "per_image")},
        "speed_vs_lzma": {"compress": (len(test) / t_comp) / base["lzma"]["tiled_compress_images_per_s"],
                          "decompress": (len(test) / t_dec) / base["lzma"]["tiled_decompress_images_per_s"]},
        # vaestream's images/s over each tiled peer's, compress and decompress, all from this run
        "speed_vs_peers": {f"{k}_{way}": (len(test) / (t_comp if way == "compress" else t_dec))
                           / base[k][f"tiled_{way}_images_per_s"]
                           for k in base for way in ("compress", "decompress")},
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
    ap.add_argument("--hidden", default="300", help="hidden widths, comma-separated (decoder mirrors them)")
    ap.add_argument("--latent-dim", type=int, default=20)
    ap.add_argument("--activation", default="tanh")
    ap.add_argument("--top-latent-dim", type=int, default=0,
                    help="0: the paper's one-layer model; N2 > 0: a second stochastic layer z2 (Bit-Swap coded)")
    ap.add_argument("--top-hidden", default="256", help="hidden widths of the MLPs between z and z2")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam step size at the start")
    ap.add_argument("--lr-decay", type=float, default=1.0,
                    help="factor the step size falls by over --steps (exponential; 1: constant)")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="keep each data set's model in DIR/<data set>: train if new, resume if short of --steps, "
                         "else only load")
    ap.add_argument("--datasets", default="mnist,fashion-mnist")
    ap.add_argument("--per-image", type=int, default=1000, help="records the per-image baselines run on")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    report = {"benchmark": "lossless", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": sys.version.split()[0],
              "args": {k: str(v) for k, v in vars(args).items()}, "datasets": {}}
    arch = {"hidden": tuple(int(h) for h in args.hidden.split(",")), "latent_dim": args.latent_dim,
            "activation": args.activation, "top_latent_dim": args.top_latent_dim,
            "top_hidden": tuple(int(h) for h in args.top_hidden.split(","))}
    with tempfile.TemporaryDirectory() as tmp:
        base = args.model_dir if args.model_dir is not None else Path(tmp)
        for name in args.datasets.split(","):
            root = DATASETS[name]
            if not (root / "t10k-images-idx3-ubyte.gz").exists():
                report["datasets"][name] = {"skipped": f"not found at {root}"}
                continue
            report["datasets"][name] = run_dataset(name, root, args.n, args.steps, args.train_seconds, base / name,
                                                  args.per_image, arch=arch, lr=args.lr, lr_decay=args.lr_decay)
            print(json.dumps({name: report["datasets"][name]["vaestream_lossless"]}), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rate-distortion family benchmark (issue 17): train one conv RD model per lambda on MNIST and Fashion-MNIST,
then measure the family's curve on the test set against JPEG, WebP, AVIF and JPEG XL (per image and tiled),
with BD-rates, SSIM, and encode / decode records/s per model beside Pillow's WebP in the same run.

    python benchmarks/bench_rd.py --out runs/bench_rd [--lambdas 1e3 1e4 1e5 1e6] [--epochs 2] [--n 10000]
    python benchmarks/bench_rd.py --out runs/bench_rd --data mnist --learned MODEL_DIR   # a learned entropy model

Training is skipped for a model directory that already holds a checkpoint (its recorded time is kept).
Prints one JSON document (also written to OUT/bench_rd.json) and writes OUT/rd_DATA.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

DATASETS = {"mnist": Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist",
            "fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


COLLAPSED_DB = 15.0
"""A model whose reconstruction of its training records (from the posterior mean) is below this PSNR has a dead
decoder. With a sigmoid mean and a large lambda, the latent means can grow in the first few dozen Adam steps
until every output unit saturates at 0 (MNIST's background); MSE is then E[x^2] (10.5 dB) and the gradient
through the sigmoid vanishes. It happened for some seeds at lambda >= 1e6 (none below); the benchmark then
trains the model again from the next seed and records the failed runs in its training log."""


def _mean_psnr(model_dir: Path, records: np.ndarray) -> float:
    from vaestream import load_model

    model = load_model(model_dir)
    x = records.reshape(len(records), -1).astype(np.float32) / 255.0
    mean, _ = model.encoder_params(x)
    x_hat = np.clip(model.decoder_params(mean)["x_mean"].numpy(), 0.0, 1.0)
    return float(10 * np.log10(1.0 / max(float(np.mean((x - x_hat) ** 2)), 1e-12)))


def train_family(root: Path, fam: Path, args) -> list[dict]:
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.coding import codec
    from vaestream.data import load_records, make_dataset

    records = load_records(str(root), "train")
    ds = make_dataset(records, args.likelihood, root.name)
    out = []
    for lm in args.lambdas:
        d = fam / f"{args.prefix}lmbda-{lm:g}"
        log = d / "bench_training.json"
        if not log.is_file():
            if args.latent_channels:  # a spatial latent: C maps over the last feature grid, no dense layers
                from vaestream.config import latent_grid

                h, w = latent_grid(records.shape[1:], tuple(args.channels))
                shape_kw = dict(latent_dim=h * w * args.latent_channels, hidden=(),
                                latent_channels=args.latent_channels)
            else:
                shape_kw = dict(latent_dim=args.latent_dim, hidden=tuple(args.hidden))
            cfg = ModelConfig(**shape_kw, activation=args.activation, likelihood=args.likelihood, arch="conv",
                              channels=tuple(args.channels), lmbda=lm)
            collapsed = []
            for seed in range(1, 4):
                t0 = time.perf_counter()
                res = train(ds, d, cfg, TrainConfig(epochs=args.epochs, objective="rd", seed=seed), progress=False)
                secs = time.perf_counter() - t0
                psnr = _mean_psnr(d, records[:2000])
                if psnr >= COLLAPSED_DB:
                    break
                collapsed.append({"seed": seed, "psnr_db": round(psnr, 2), "train_seconds": round(secs, 1)})
                if seed < 3:  # a dead decoder (COLLAPSED_DB): train again from the next seed; keep the third
                    shutil.rmtree(d)
            t1 = time.perf_counter()
            codec.write_tables(d, records[:20000])
            log.write_text(json.dumps({"lmbda": lm, "epochs": args.epochs, "steps": res.steps, "seed": seed,
                                       "collapsed_runs": collapsed,
                                       "likelihood": args.likelihood, "activation": args.activation,
                                       "train_seconds": round(secs, 1),
                                       "tables_seconds": round(time.perf_counter() - t1, 1)}))
        out.append(json.loads(log.read_text()))
    if args.bits_back_steps:
        out.append(train_bits_back(root, fam, args))
    return out


def train_bits_back(root: Path, fam: Path, args) -> dict:
    """The family's near-lossless member FAMILY/bitsback: a one-layer 784-H-H-Nz ELU beta-binomial VAE (the
    lossless benchmark's Run F shape), Adam 1e-3 decayed to 1e-4 over ``--bits-back-steps`` minibatches of 100."""
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.data import load_records, make_dataset

    d = fam / "bitsback"
    log = d / "bench_training.json"
    if not log.is_file():
        cfg = ModelConfig(latent_dim=args.bits_back_latent_dim, hidden=tuple(args.bits_back_hidden),
                          activation="elu", likelihood="beta_binomial")
        steps = args.bits_back_steps
        t0 = time.perf_counter()
        res = train(make_dataset(load_records(str(root), "train"), "beta_binomial", root.name), d, cfg,
                    TrainConfig(steps=steps, seed=0, eval_every=10 ** 9, learning_rate=1e-3, lr_decay_rate=0.1,
                                lr_decay_steps=steps), progress=False)
        log.write_text(json.dumps({"model": "bitsback", "likelihood": "beta_binomial", "steps": res.steps,
                                   "hidden": list(cfg.hidden), "latent_dim": cfg.latent_dim,
                                   "train_seconds": round(time.perf_counter() - t0, 1)}))
    return json.loads(log.read_text())


RUN9 = {"mnist": ("rd_run9_mixed_mnist.json", "rd_run7_learned.json"),
        "fashion-mnist": ("rd_run9_mixed_fashion-mnist.json", "rd_run8_joint.json")}
"""Run 9's per-record curve and the single points' run (run 7 MNIST, run 8 Fashion-MNIST), in benchmarks/results."""
TARGETS_DB = (20.0, 24.0, 28.0, 32.0)


def learned_points(model_dir: Path, imgs: np.ndarray) -> list[dict]:
    """One point per rate level of a learned-entropy-model codec (``vaestream.load``): ``compress`` every record of
    ``imgs`` (uint8 ``[N, H, W]``), ``decompress`` the blob, bits from its real bytes (header, frames, side streams,
    CRCs), PSNR and SSIM of the decoded pictures rounded to 8 bits (as the peers' and the family's), the ideal and
    side-stream bits, and encode / decode records/s of those calls (one process)."""
    import vaestream
    from vaestream.metrics import psnr_db, ssim

    codec = vaestream.load(model_dir)
    ref = imgs.astype(np.float64) / 255.0
    rows = []
    for q in codec.qualities:
        t0 = time.perf_counter()
        blob = codec.compress(imgs, quality=q)
        t1 = time.perf_counter()
        x_hat = codec.decompress(blob)
        t2 = time.perf_counter()
        dec = np.rint(np.clip(x_hat, 0.0, 1.0) * 255.0).reshape(imgs.shape) / 255.0
        ideal, side = codec.bits(imgs, quality=q, side=True)
        mse = float(np.mean((dec - ref) ** 2))
        bits = 8.0 * len(blob) / len(imgs)
        rows.append({"model": Path(model_dir).name, "level": codec.level(q), "quality": q,
                     "lmbda": codec.config.rd_lambdas[codec.level(q)], "bits_per_record": bits,
                     "bits_per_image": bits, "ideal_bits": float(ideal.mean()), "side_bits": float(side.mean()),
                     "side_share": float(side.mean()) / bits, "mse": mse, "psnr_db": psnr_db(mse),
                     "ssim": ssim(dec, ref), "encode_rps": len(imgs) / (t1 - t0), "decode_rps": len(imgs) / (t2 - t1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def learned_compare(model_dir: Path, imgs: np.ndarray, name: str, tiled_n: int) -> dict:
    """A learned-entropy-model codec against tiled WebP and AVIF measured in the same run (``tiled_n`` records):
    its points, BD-rates (PCHIP) over 18-32 dB and over each overlap, bits at :data:`TARGETS_DB` beside run 9's
    per-record path and single points (their stored results), and WebP's records/s on 1,000 of the records."""
    from vaestream.evaluation import peers, rdcurve
    from vaestream.metrics import bd_rate, bits_at_psnr

    points = learned_points(model_dir, imgs)
    curves = {f"{f.lower()}_tiled": peers.lossy_curve(imgs[:tiled_n], f, tiled=True)
              for f in ("WEBP", "AVIF") if peers.available().get(f)}
    out = rdcurve.summarise(points, curves, len(imgs))
    here = Path(__file__).resolve().parent / "results"
    run9_file, single_file = RUN9[name]
    run9 = json.loads((here / run9_file).read_text())
    single = next(r for r in json.loads((here / single_file).read_text())["results"] if r["data"] == name)
    per_record = [p for p in run9["points"] if p.get("model") == "per-record"]
    out["bits_at_psnr"] = {f"{t:g}": {"learned": bits_at_psnr(points, t)["bits_per_image"],
                                      "run9_per_record": bits_at_psnr(per_record, t)["bits_per_image"],
                                      "single_points": bits_at_psnr(single["points"], t)["bits_per_image"],
                                      **{k: bits_at_psnr(c, t)["bits_per_image"] for k, c in curves.items()}}
                           for t in TARGETS_DB}
    out["bd_rate_pct_vs_run9"] = {"per_record": bd_rate(points, per_record, rdcurve.PSNR_RANGE),
                                  "single_points": bd_rate(points, single["points"], rdcurve.PSNR_RANGE)}
    out["run9_bd_rate_pct_webp_tiled"] = {"per_record": run9["bd_rate_pct"]["webp_tiled"]["range"],
                                          "single_points": run9["bd_rate_pct_single_points"]["webp_tiled"]["range"]}
    out["throughput_records_per_s"] = webp_rates(imgs[:1000])
    return out


def _rates(compress, decompress, batch, reps: int) -> dict:
    """Records/s of ``compress(batch)`` and ``decompress(blob)``, after one untimed round (tracing, tables)."""
    decompress(compress(batch))
    t0 = time.perf_counter()
    for _ in range(reps):
        blob = compress(batch)
    t1 = time.perf_counter()
    for _ in range(reps):
        decompress(blob)
    t2 = time.perf_counter()
    return {"compress": reps * len(batch) / (t1 - t0), "decompress": reps * len(batch) / (t2 - t1)}


def webp_rates(batch: np.ndarray, reps: int = 3) -> dict:
    """Records/s of Pillow WebP (quality 50, method 6 and method 4) compressing and decompressing ``batch``
    (uint8 pictures ``[N, H, W]``), each picture on its own and all of them as one tiled picture."""
    from vaestream.evaluation import peers

    out = {}
    for method in (6, 4):
        t0 = time.perf_counter()
        for _ in range(reps):
            blobs = [peers.pil_encode(im, "WEBP", quality=50, method=method) for im in batch]
        t1 = time.perf_counter()
        for _ in range(reps):
            [peers.pil_decode(b) for b in blobs]
        t2 = time.perf_counter()
        for _ in range(reps):
            tb = peers.pil_encode(peers.tile(batch), "WEBP", quality=50, method=method)
        t3 = time.perf_counter()
        for _ in range(reps):
            peers.pil_decode(tb)
        t4 = time.perf_counter()
        r = reps * len(batch)
        out[f"webp_m{method}_per_image"] = {"compress": r / (t1 - t0), "decompress": r / (t2 - t1)}
        out[f"webp_m{method}_tiled"] = {"compress": r / (t3 - t2), "decompress": r / (t4 - t3)}
    return out


def throughput(fam: Path, imgs: np.ndarray, reps: int = 3, rdo: bool = False, only=None) -> dict:
    """Records/s of compress / decompress per model on 1,000 records (lossy members at quality 1, the bits-back
    member at 8 levels: max error 18, with and without its context model, and with its learned reconstruction
    at the largest K <= 8 that has one; with ``rdo`` also each lossy member's rate-distortion optimised encoding
    at quality 2, rdo_lmbda = its lmbda), and Pillow WebP (quality 50, method 6 and method 4; per image and one
    tiled picture) on the same records, in the same run. ``only``: the names of the members to time (default
    all)."""
    from vaestream.coding import codec, family

    batch = imgs[:1000]
    out = {}
    for d in family.members(fam):
        if only is not None and d.name not in only:
            continue
        if family.is_near_lossless(d):
            coder = family.bitsback_coder(d, 8)
            out[f"{d.name}_levels8"] = _rates(coder.compress, coder.decompress, batch, reps)
            if coder.context is not None:  # the same K without its pixel context model
                plain = family.bitsback_coder(d, 8, use_context=False)
                out[f"{d.name}_levels8_no_context"] = _rates(plain.compress, plain.decompress, batch, reps)
            learned = [k for k, cm in sorted(coder.contexts.items()) if cm.has_reconstruction and k <= 8]
            if learned:  # the largest K up to 8 with a reconstruction network, decoded with it
                k = learned[-1]
                c = family.bitsback_coder(d, k, "learned")
                out[f"{d.name}_levels{k}_learned"] = _rates(c.compress, c.decompress, batch, reps)
                if k != 8:
                    c = family.bitsback_coder(d, k)
                    out[f"{d.name}_levels{k}"] = _rates(c.compress, c.decompress, batch, reps)
        if family.is_lossy(d):
            c = codec.load(d)
            out[d.name] = _rates(lambda b: c.compress(b, quality=1.0), c.decompress, batch, reps)
            if rdo and c.config.lmbda:
                out[f"{d.name}_rdo"] = _rates(lambda b: c.compress(b, quality=2.0, rdo_lmbda=c.config.lmbda),
                                              c.decompress, batch, 1)
    out.update(webp_rates(batch, reps))
    return {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in out.items()}


def _reuse_compare(fam: Path, imgs: np.ndarray, name: str, args) -> dict:
    """``rdcurve.compare``'s result with only the members ``args.measure`` measured (on ``imgs``, with SSIM):
    every other member's points and the peers' curves come from the ``args.reuse`` result for data set
    ``name``, which must have been measured on as many records."""
    from vaestream.coding import family
    from vaestream.evaluation import rdcurve

    old = next(r for r in json.loads(Path(args.reuse).read_text())["results"] if r["data"] == name)
    if old["records"] != len(imgs):
        raise SystemExit(f"--reuse: {args.reuse} measured {old['records']} {name} records, not {len(imgs)}")
    keep = [p for p in old["points"] if Path(p["model"]).name not in args.measure]
    new = []
    for d in family.members(fam):
        if d.name in args.measure:
            new += [{**r.to_dict(), "model": d.name, "bits_per_image": r.bits_per_record}
                    for r in family.member_points(d, imgs, with_ssim=True)]
    out = rdcurve.summarise(keep + new, old["peers"], len(imgs), tuple(old.get("psnr_range", rdcurve.PSNR_RANGE)))
    out["unavailable_peers"] = old.get("unavailable_peers", [])
    out["reused"] = {"from": str(args.reuse), "measured_again": list(args.measure)}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_rd")
    p.add_argument("--data", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--lambdas", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=[256])
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    p.add_argument("--latent-channels", type=int, default=0,
                   help="C > 0: a spatial latent of C maps (no dense layers; --latent-dim, --hidden unused)")
    p.add_argument("--n", type=int, default=10000, help="test records for vaestream (default: the whole set)")
    p.add_argument("--tiled-n", type=int, default=2000, help="test records for the tiled peers")
    p.add_argument("--per-image-n", type=int, default=200, help="test records for the per-image peers")
    p.add_argument("--likelihood", default="gaussian_sigmoid", choices=["gaussian_sigmoid", "gaussian"],
                   help="the decoder's mean: through a sigmoid (default) or linear (decoded pictures are clipped)")
    p.add_argument("--activation", default="elu", choices=["elu", "gdn"],
                   help="gdn: GDN / IGDN between the convolutions (needs --latent-channels)")
    p.add_argument("--prefix", default="",
                   help="model directory names are PREFIXlmbda-L: several architectures can share one family")
    p.add_argument("--bits-back-steps", type=int, default=0,
                   help="also train the family's near-lossless member FAMILY/bitsback (a beta-binomial MLP) for "
                        "this many steps (0: none)")
    p.add_argument("--bits-back-hidden", type=int, nargs="+", default=[500, 500])
    p.add_argument("--bits-back-latent-dim", type=int, default=50)
    p.add_argument("--rdo", action="store_true",
                   help="the lossy members' rate-distortion optimised points too "
                        "(vaestream.coding.rdo; slow to encode)")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--compare-only", action="store_true",
                   help="train nothing: compare every model already in each family (their training logs are reported)")
    p.add_argument("--reuse", default=None,
                   help="with --compare-only: a previous bench_rd JSON on the same records; the peers' curves and the "
                        "points of every member not named by --measure are taken from it, and only those members "
                        "are measured again")
    p.add_argument("--measure", nargs="+", default=["bitsback"],
                   help="with --reuse: the members to measure again, and to time (default: bitsback)")
    p.add_argument("--learned", default=None,
                   help="a model directory with a learned entropy model (one --data): code the test records through "
                        "vaestream.coding.learned at each rate level (real stream bytes) beside tiled WebP and AVIF "
                        "measured in the same run; trains nothing; writes OUT/bench_rd_learned_DATA.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vaestream.evaluation import rdcurve
    from vaestream.data import load_records

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.learned:
        return main_learned(args, out)
    report = {"benchmark": "bench_rd", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "args": vars(args), "results": []}
    for name in args.data:
        root = DATASETS[name]
        fam = out / f"family-{name}"
        if args.compare_only:
            from vaestream.coding import family

            from vaestream.coder_training.joint import JOINT_FILE

            # a member bench_rd trained has bench_training.json; one vaestream train-joint wrote, joint.json
            training = [{"model": d.name, **json.loads(next(f for f in (d / "bench_training.json", d / JOINT_FILE)
                                                             if f.is_file()).read_text())}
                        for d in family.members(fam)]
        else:
            training = train_family(root, fam, args)
        res = {"data": name, "training": training}
        if not args.train_only:
            imgs = load_records(str(root), "test")[: args.n]
            t0 = time.perf_counter()
            if args.reuse:
                r = _reuse_compare(fam, imgs, name, args)
            else:
                r = rdcurve.compare(fam, imgs, per_image_n=args.per_image_n, tiled_n=args.tiled_n, rdo=args.rdo)
            res["compare_seconds"] = round(time.perf_counter() - t0, 1)
            r["plot"] = str(rdcurve.plot(r, out / f"rd_{name}.png", f"{name}: RD family, {len(imgs)} test images"))
            res.update(r)
            res["throughput_records_per_s"] = throughput(fam, imgs, rdo=args.rdo,
                                                         only=args.measure if args.reuse else None)
        report["results"].append(res)
    text = json.dumps(report, indent=1, default=str)
    (out / "bench_rd.json").write_text(text)
    print(text)
    return 0


def main_learned(args, out: Path) -> int:
    """``--learned``: :func:`learned_compare` on one data set's test records; prints and writes the JSON."""
    from vaestream.data import load_records

    if len(args.data) != 1:
        raise SystemExit("--learned: name one --data")
    name = args.data[0]
    imgs = load_records(str(DATASETS[name]), "test")[: args.n]
    t0, load_before = time.perf_counter(), os.getloadavg()
    res = learned_compare(Path(args.learned), imgs, name, args.tiled_n)
    train_log = Path(args.learned) / "bench_training.json"
    report = {"benchmark": "bench_rd --learned", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_before": load_before,
              "args": vars(args), "data": name, "model": str(args.learned),
              "training": json.loads(train_log.read_text()) if train_log.is_file() else None,
              "compare_seconds": round(time.perf_counter() - t0, 1), "load_after": os.getloadavg(), **res}
    text = json.dumps(report, indent=1, default=str)
    (out / f"bench_rd_learned_{name}.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-record operating points (`vaestream.coding.per_record`) over a family, against the peers of an earlier
bench_rd run.

    python benchmarks/bench_mixed.py --family runs/rd9/family-fashion-mnist --data fashion-mnist --n 10000 \
        --reuse benchmarks/results/rd_run8_joint.json --out runs/rd9

Measures every candidate point of the family on the first N test records, then for each PSNR target codes the
records per record (`per_record.PerRecordCoder`: real streams, real bits, the delivered PSNR and SSIM). The per-record
points join the reused run's points (its family's single operating points) and are compared with its peers'
curves (same records): BD-rates over 18-32 dB, bits at each PSNR. One stream is decoded again and checked
against what the encoder reported. The speed step times, on the first --speed-n records, measuring the
candidates, coding per record once they are measured, and decoding, beside Pillow WebP on the same records
(--speed-only: that step alone). Prints one JSON object and writes a plot."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def speed(fam, x: np.ndarray, target: float) -> dict:
    """Records/s on ``x``: measuring the candidates, coding per record at ``target`` dB once they are measured, and
    decoding; Pillow WebP's rates on the same records in the same run (bench_rd.webp_rates)."""
    from bench_rd import webp_rates

    from vaestream.coding import per_record

    t0 = time.perf_counter()
    cands = per_record.candidates(fam, x)
    t1 = time.perf_counter()
    r = per_record.PerRecordCoder(fam, psnr=target, points=cands).encode(x)
    blob, x_hat = r.blob, r.reconstruction
    t2 = time.perf_counter()
    y = per_record.PerRecordCoder(fam).decompress(blob)
    t3 = time.perf_counter()
    n = len(x)
    return {"records": n, "target_psnr_db": target, "psnr_db": r.psnr_db,
            "bits_per_record": r.bits_per_record,
            "decodes_to_what_the_encoder_reported": bool(np.array_equal(y.reshape(x_hat.shape), x_hat)),
            "candidates": len(cands), "candidates_records_per_s": round(n / (t1 - t0), 1),
            "per_record_compress_records_per_s": round(n / (t2 - t1), 1),
            "per_record_encode_total_records_per_s": round(n / (t2 - t0), 1),
            "per_record_decompress_records_per_s": round(n / (t3 - t2), 1),
            **{k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in webp_rates(x).items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True)
    p.add_argument("--data", required=True, help="'fashion-mnist', an MNIST-layout directory or a file")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--reuse", default=None, help="a bench_rd result on the same records (peers, single points)")
    p.add_argument("--targets", type=float, nargs="+", default=[19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32])
    p.add_argument("--check-target", type=float, default=26.0, help="the target whose stream is decoded and timed")
    p.add_argument("--speed-n", type=int, default=1000,
                   help="records for the speed step: candidates, per-record coding at --check-target and decoding, "
                        "timed beside Pillow WebP on the same records")
    p.add_argument("--speed-only", action="store_true", help="only the speed step (no curve, no --reuse needed)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from vaestream.coding import per_record
    from vaestream.evaluation import rdcurve
    from vaestream.metrics import bits_at_psnr
    from vaestream.data import load_records

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.data).name if args.data != "fashion-mnist" else args.data
    x = load_records(args.data, "test")[: args.n]
    head = {"benchmark": "bench_mixed", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "args": vars(args)}
    if args.speed_only:
        print(json.dumps({**head, "speed": speed(args.family, x[: args.speed_n], args.check_target)}, indent=1))
        return 0
    if args.reuse is None:
        raise SystemExit("--reuse: a bench_rd result on the same records is needed for the curve")
    old = next(r for r in json.loads(Path(args.reuse).read_text())["results"] if r["data"] == name)
    if old["records"] != len(x):
        raise SystemExit(f"--reuse measured {old['records']} records, not {len(x)}")
    t0 = time.time()
    cands = per_record.candidates(args.family, x,
                                  log=lambda r: print(json.dumps(r, default=str), file=sys.stderr, flush=True))
    cand_s = time.time() - t0
    log = lambda r: print(json.dumps({k: v for k, v in r.items() if k != "streams"}), file=sys.stderr, flush=True)
    points = rdcurve.per_record_curve(args.family, x, args.targets, points=cands, log=log)
    t = time.time()
    r = per_record.PerRecordCoder(args.family, psnr=args.check_target, points=cands).encode(x)
    blob, x_hat = r.blob, r.reconstruction
    enc_s = time.time() - t
    t = time.time()
    y = per_record.PerRecordCoder(args.family).decompress(blob)
    dec_s = time.time() - t
    checked = {"target": args.check_target, "psnr_db": r.psnr_db, "bits_per_record": r.bits_per_record,
               "decodes_to_what_the_encoder_reported": bool(np.array_equal(y.reshape(x_hat.shape), x_hat)),
               "encode_records_per_s": round(len(x) / enc_s, 1), "decode_records_per_s": round(len(x) / dec_s, 1)}
    good = [q for q in points if "error" not in q]
    single = [q for q in old["points"]]
    result = rdcurve.summarise(single + good, old["peers"], len(x), tuple(old.get("psnr_range", rdcurve.PSNR_RANGE)))
    alone = rdcurve.summarise(single, old["peers"], len(x), tuple(old.get("psnr_range", rdcurve.PSNR_RANGE)))
    best = result["peers"]["best_tiled_jpeg_webp"]
    ratios = {}
    for q in (20, 22, 24, 26, 28, 30, 32):
        ours, before = bits_at_psnr(single + good, q), bits_at_psnr(single, q)
        ratios[str(q)] = {"ours": ours["bits_per_image"], "single_points": before["bits_per_image"],
                          "best_tiled": bits_at_psnr(best, q)["bits_per_image"],
                          "webp_tiled": bits_at_psnr(result["peers"]["webp_tiled"], q)["bits_per_image"]}
    plot = rdcurve.plot({**result, "points": [{**q, "model": Path(str(q["model"])).name} for q in result["points"]]},
                        out / f"rd_mixed_{name}.png", f"{name}: {len(x)} test images, per-record points")
    print(json.dumps({
        **head, "records": len(x), "speed": speed(args.family, x[: args.speed_n], args.check_target),
        "candidates": len(cands), "candidates_seconds": round(cand_s, 1), "points": points, "check": checked,
        "bd_rate_pct": result["bd_rate_pct"], "bd_rate_pct_single_points": alone["bd_rate_pct"],
        "bits_at_psnr": ratios, "envelope": result["envelope"], "plot": str(plot)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Beam jobs with the lossless coder: ``pipelines/encode.py --coder lossless`` and ``pipelines/decode.py
--output_dtype uint8`` on MNIST test images, beside the in-process coder and lzma -9e in the same run.

A beta-binomial VAE (784-500-500-50 ELU by default: the headline model of RESULTS_lossless.md, trained for
``--steps`` only: throughput depends on the architecture, not on how long it trained; the rate does, which is
why the rate here is not the headline rate) is trained once into ``--model-dir`` (kept and reused). Then on
the first ``--n`` test images, ``--repeats`` times, alternating:

* the encode job (FnApiRunner, ``--coder lossless``, chunks of ``--chunk`` records a container) and the
  decode job (``--output_dtype uint8``): wall time of the job call, records/s, and that every record comes
  back exactly;
* the in-process coder (``LosslessCoder.compress`` / ``decompress`` on the same records as one stream);
* lzma -9e on the same raw pixels (one stream; compress and decompress).

Prints one JSON document. Usage:

    python benchmarks/bench_lossless_beam.py [--n 10000] [--steps 3000] [--model-dir runs/lossless-beam]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"


def _model(model_dir: Path, steps: int):
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.data import load_records, make_dataset

    config = ModelConfig(latent_dim=50, hidden=(500, 500), activation="elu", likelihood="beta_binomial")
    t0 = time.time()
    res = train(make_dataset(load_records(str(MNIST), "train"), "beta_binomial", "mnist-train"), model_dir, config,
                TrainConfig(steps=steps, seed=0, eval_every=10 ** 9), progress=False)
    return res.model, round(time.time() - t0, 1)


def _read_back(rec_dir: Path) -> dict:
    import pyarrow.parquet as pq

    back = {}
    for f in rec_dir.glob("recon-*.parquet"):
        t = pq.read_table(f).to_pydict()
        back.update(zip(t["key"], (np.asarray(v) for v in t["data"])))
    return back


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--chunk", type=int, default=4096, help="records a container (the job's --chunk_size)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model-dir", type=Path, default=Path("runs/lossless-beam"))
    a = ap.parse_args(argv)

    from vaestream.beam.jobs import decode, encode
    from vaestream.coding.bitsback.coder import LosslessCoder
    from vaestream.data import load_records

    model, train_s = _model(a.model_dir, a.steps)
    x = load_records(str(MNIST), "test")[:a.n]
    work = Path(tempfile.mkdtemp(prefix="bench_lossless_beam_"))
    np.save(work / "x.npy", x)
    raw = x.tobytes()
    coder = LosslessCoder(model)
    rows = {k: [] for k in ("job_encode", "job_decode", "coder_compress", "coder_decompress", "lzma_compress",
                            "lzma_decompress")}
    out = {}
    try:
        for r in range(a.repeats):
            t0 = time.perf_counter()
            s = encode.run(["--input", str(work / "x.npy"), "--model", str(a.model_dir), "--output",
                            str(work / "codes"), "--coder", "lossless", "--chunk_size", str(a.chunk),
                            "--runner", "FnApiRunner"])
            rows["job_encode"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            d = decode.run(["--input", str(work / "codes"), "--model", str(a.model_dir), "--output",
                            str(work / "rec"), "--output_dtype", "uint8", "--output_format", "parquet",
                            "--runner", "FnApiRunner"])
            rows["job_decode"].append(time.perf_counter() - t0)
            got = _read_back(work / "rec")
            exact = all(np.array_equal(got[f"x.npy:{i:09d}"].reshape(x[i].shape), x[i]) for i in range(a.n))
            t0 = time.perf_counter()
            blob = coder.compress(x)
            rows["coder_compress"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            y = coder.decompress(blob)
            rows["coder_decompress"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lz = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
            rows["lzma_compress"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lzma.decompress(lz)
            rows["lzma_decompress"].append(time.perf_counter() - t0)
            out = {"job_encode_summary": {k: s[k] for k in ("records", "dead_lettered", "bytes_out", "seconds")},
                   "job_decode_summary": {k: d[k] for k in ("records", "dead_lettered", "seconds")},
                   "job_exact": bool(exact), "coder_exact": bool(np.array_equal(y, x)),
                   "job_bits_per_dim": None, "coder_bits_per_dim": 8 * len(blob) / x.size,
                   "lzma_bits_per_dim": 8 * len(lz) / x.size}
        from vaestream import beam as vb

        payload = sum(len(c.container) for f in (work / "codes").glob("codes-*.tfrecord")
                      for c in vb.read_codes(str(f)))
        out["job_bits_per_dim"] = 8 * payload / x.size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in rows.items()}
    per_s = {k: round(a.n / v, 1) for k, v in best.items()}
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "n": a.n, "chunk": a.chunk, "train_steps": a.steps, "train_seconds": train_s,
           "images_per_second_best_of": a.repeats, "images_per_second": per_s,
           "seconds_all_repeats": {k: [round(t, 3) for t in v] for k, v in rows.items()},
           "ratios": {"job_encode_vs_coder": round(per_s["job_encode"] / per_s["coder_compress"], 3),
                      "job_decode_vs_coder": round(per_s["job_decode"] / per_s["coder_decompress"], 3),
                      "job_encode_vs_lzma": round(per_s["job_encode"] / per_s["lzma_compress"], 3)},
           **out}
    print(json.dumps(doc, indent=2))
    return 0 if out.get("job_exact") and out.get("coder_exact") else 1


if __name__ == "__main__":
    sys.exit(main())

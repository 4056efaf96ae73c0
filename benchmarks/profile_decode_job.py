"""Where the decode job's time goes: cProfile of one decode job run in this process, µs per record by step.

The inputs are ``bench_encode_job.py``'s (MNIST training images tiled to N records, the 784-500-20 model, the
encode job's default block codes, made first outside the profile). The job runs once untimed on 1,000 records
(imports, tracing), then once under cProfile on N records (``--output_dtype uint8``, ``--recon_layout`` as
given). Steps are cumulative times of the functions that do them (main thread: the in-process FnApiRunner
runs bundles there), so they may overlap where one calls another; ``other`` is the rest of the profiled time.
cProfile adds its own per-call cost, so the total exceeds a timed run. Prints one JSON document.

    PYTHONPATH=. python benchmarks/profile_decode_job.py --n 200000 --work W --recon_layout block
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

# step -> (how, match): "cum" sums the cumulative time of functions whose (file, name) match, "tot" the own
# time; a match is (file suffix, function name)
STEPS = {
    "model (decode_batches: TF execute, tensor conversion)": ("cum", [("model_handler.py", "decode_batches")]),
    "round to uint8 (quantize_batch)": ("cum", [("transforms.py", "quantize_batch")]),
    "TFRecordWriter.write": ("cum", [("tf_record.py", "write")]),
    "serialize Examples": ("cum", [("shardset.py", "record_examples"), ("shardset.py", "record_block")]),
    "read code files (read_codes)": ("cum", [("transforms.py", "read_codes")]),
    "output check (job_summary)": ("cum", [("running.py", "job_summary")]),
    "thread waits": ("tot", [("~", "<method 'acquire' of '_thread.lock' objects>"),
                             ("~", "<method 'wait' of '_thread.lock' objects>")]),
    "fingerprint check, pipeline options": ("cum", [("decode.py", "check_fingerprint"),
                                                    ("running.py", "make_pipeline")]),
}


def profile(work: Path, n: int, layout: str) -> dict:
    from bench_encode_job import make_inputs, make_model
    from pipelines import decode, encode

    src, model = make_inputs(work, n), make_model(work)
    codes = work / f"encode-{n}"
    if not codes.exists():
        encode.run(["--input", str(src), "--model", str(model), "--output", str(codes)])
    small = work / "encode-1000"
    if not small.exists():
        encode.run(["--input", str(make_inputs(work, 1000)), "--model", str(model), "--output", str(small)])
    flags = ["--model", str(model), "--output_dtype", "uint8"] + (["--recon_layout", layout] if layout else [])
    decode.run(["--input", str(small), "--output", str(work / "profile-warm"), *flags])
    prof = cProfile.Profile()
    prof.enable()
    s = decode.run(["--input", str(codes), "--output", str(work / f"profile-{layout or 'default'}-{n}"), *flags])
    prof.disable()
    st = pstats.Stats(prof)
    total = st.total_tt
    out = {}
    for step, (how, matches) in STEPS.items():
        secs = 0.0
        for (file, _, name), (cc, nc, tt, ct, callers) in st.stats.items():
            if any((file.endswith(f) or f == "~" and file == "~") and name == m for f, m in matches):
                secs += tt if how == "tot" else ct
        out[step] = round(1e6 * secs / n, 3)
    counted = sum(out.values())
    out["other"] = round(1e6 * total / n - counted, 3)
    out["all (profiled)"] = round(1e6 * total / n, 3)
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]
    own = {f"{Path(f).name}:{line}:{name}": round(1e6 * v[2] / n, 3) for (f, line, name), v in top}
    return {"n": n, "recon_layout": layout, "job_seconds": s["seconds"], "us_per_record": out,
            "own_time_top25_us_per_record": own}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200000)
    ap.add_argument("--work", required=True)
    ap.add_argument("--recon_layout", default=None, choices=["block", "record"],
                    help="the decode job's --recon_layout (default: the job's default; a job without the flag)")
    args = ap.parse_args()
    print(json.dumps(profile(Path(args.work), args.n, args.recon_layout), indent=1))


if __name__ == "__main__":
    main()

"""Throughput of the Beam jobs (prepare, encode, decode) against the bare model and stock RunInference.

For each size N (MNIST training images tiled to N records, 784 uint8 values each, in one ``.npy``), in one
run and on the same 784-500-20 model (the paper's MNIST architecture):

* ``bare``     — the compiled encoder on in-memory arrays, 4096 records a call (the limit);
* ``bare_decode`` — the compiled decoder on in-memory latent means, 4096 a call, rounded to uint8 in NumPy (the
  decode job's peer);
* ``bare_decode_u8`` — the same with the rounding inside the compiled decoder (``LoadedVAE.decode_uint8``, as
  the decode job rounds since it does so; the same bits): the stricter peer;
* ``encode``   — ``pipelines/encode.py`` end to end: read the .npy -> validate -> RunInference -> TFRecord;
* ``encode_record`` — the same job with ``--code_layout record`` (one Example per record, as before the block
  layout; ``encode`` writes the default block layout);
* ``encode_overlap`` — the same job with ``--inference overlap`` (the model call for the next batch on a
  thread while the last one is written);
* ``stock``    — Beam's stock ``RunInference`` with one record per element (a per-record ModelHandler over the
  same compiled function, Beam's own ``BatchElements`` batching, one ``tf.train.Example`` per record);
* ``unbatched``— the same with ``max_batch_size=1`` (one model call per record), on the first 2000 records at
  the smallest N only (it is slow; its per-record rate does not depend on N);
* ``prepare``  — ``pipelines/prepare.py`` (read, validate, shuffle, 8 shards, manifest);
* ``decode``   — ``pipelines/decode.py`` on the encode job's codes (``--output_dtype uint8``; its default output,
  record blocks); ``decode_record``: with ``--recon_layout record`` (one Example per record, the layout before
  the block layout); ``decode_overlap``: with ``--inference overlap``;
* ``beam_floor`` — Beam's own floor for a job of this shape: ``vaestream.beam.ReadRecords`` (no validation)
  of the same .npy in 4096-record chunks -> ``beam.Map`` to each chunk's raw bytes -> ``beam.io.Write`` of
  a TFRecord file sink (Beam's ``FileBasedSink`` machinery: temp files, rename at finalisation; TensorFlow's
  record writer, as ``vaestream.beam.BatchedTFRecordSink``: Beam's ``WriteToTFRecord`` needs a CRC32C
  package that is not installed here), one TFRecord per chunk, on the same runner (``make_pipeline``):
  no model, no validation, no serialization of codes, no dead-letter output, no counters but the reader's;
* ``beam_floor_dl`` — the same plus the reader's dead-letter output written as the jobs write theirs
  (``WriteDeadLetters``: ``beam.Map`` to JSON -> Beam's ``WriteToText`` into one file): Beam's floor for a
  job with two file outputs.

Every measurement runs in a fresh subprocess (so its peak RSS is its own) on the in-process FnApiRunner;
the job figures are the pipeline's run time (``seconds``: model loading and tracing included) and the whole
``run()`` call (``wall_seconds``: argument parsing, clearing old outputs, building the pipeline, running it,
and the summary's checks of the written files); the bare figure excludes compilation.

Fixed cost: the jobs listed in ``--fixed_jobs`` also run on a tiny input (``--tiny`` records, default 100): that
time is the job's fixed per-job cost T0. For each N the table gives the end-to-end time per record T(N)/N and
the net time per record (T(N) - T0) / (N - n0) (n0 = the tiny input's records), i.e. what a record costs once
the job is running. ``--repeat R`` runs each measurement R times (fresh processes) and keeps the median run;
with ``--alternate`` the runs go in rounds (bare, encode, decode, bare, ...) so that load changes hit all alike.
Prints one JSON document.

    python benchmarks/bench_encode_job.py --sizes 10000 100000 1000000 --out /tmp/bench_beam
    python benchmarks/bench_encode_job.py --sizes 10000 100000 --jobs encode decode beam_floor --repeat 3
    python benchmarks/bench_encode_job.py --sizes 1000000 --jobs bare encode bare_decode decode --fixed_jobs \
        --repeat 3 --alternate
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_inputs(work: Path, n: int) -> Path:
    """MNIST training images tiled to ``n`` records, as ``work/mnist-N.npy`` (written once)."""
    import numpy as np

    from vaestream.data import read_idx

    path = work / f"mnist-{n}.npy"
    if not path.exists():
        base = read_idx(MNIST / "train-images-idx3-ubyte.gz")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 28, 28))
        for s in range(0, n, len(base)):
            out[s:s + len(base)] = base[: min(len(base), n - s)]
        out.flush()
        del out
    return path


def make_model(work: Path) -> Path:
    """A 784-500-20 Bernoulli VAE (weights from its seed: throughput does not depend on training)."""
    import tensorflow as tf

    from vaestream import store
    from vaestream.config import ModelConfig
    from vaestream.model import VAE

    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        config = ModelConfig(latent_dim=20, hidden=(500,))
        store.save_config(model_dir, config)
        tf.train.Checkpoint(model=VAE(config, seed=0)).save(str(model_dir / "ckpt" / "ckpt"))
    return model_dir


# ---- one measurement (run in a subprocess) ------------------------------------------------------------
def one_bare(work: Path, n: int) -> dict:
    import numpy as np

    from vaestream.beam import CHUNK, LoadedVAE

    records = np.load(make_inputs(work, n))  # in memory
    model = LoadedVAE.from_model_dir(str(make_model(work)))
    model.encode(records[:CHUNK], 1 / 255)  # compile
    t0 = time.perf_counter()
    total = 0
    for s in range(0, n, CHUNK):
        mean, log_scale = model.encode(records[s:s + CHUNK], 1 / 255)
        total += len(mean)
    secs = time.perf_counter() - t0
    return {"records": total, "seconds": secs}


def latent_means(work: Path, n: int, model):
    """The encoder's latent means of the ``n`` input records (the bare decoders' input), computed once and kept
    as ``work/z-N.npy`` (the model's weights come from its seed: the same for every run)."""
    import numpy as np

    from vaestream.beam import CHUNK

    path = work / f"z-{n}.npy"
    if path.exists():
        return np.load(path)
    records = np.load(make_inputs(work, n), mmap_mode="r")
    z = np.concatenate([model.encode(np.asarray(records[s:s + CHUNK]), 1 / 255)[0] for s in range(0, n, CHUNK)])
    np.save(path, z)
    return z


def timed_decoder(work: Path, n: int, call) -> dict:
    """``call(model, z_chunk)`` over the encoder's latent means of ``n`` records, 4096 a call, after one compile."""
    from vaestream.beam import CHUNK, LoadedVAE

    model = LoadedVAE.from_model_dir(str(make_model(work)))
    z = latent_means(work, n, model)
    call(model, z[:CHUNK])  # compile
    t0 = time.perf_counter()
    total = 0
    for s in range(0, n, CHUNK):
        total += len(call(model, z[s:s + CHUNK]))
    return {"records": total, "seconds": time.perf_counter() - t0}


def one_bare_decode(work: Path, n: int) -> dict:
    """The compiled decoder on in-memory latent means, rounded to uint8 by NumPy as the job's --output_dtype uint8."""
    import numpy as np

    return timed_decoder(work, n, lambda m, z: np.clip(np.rint(m.decode(z) * 255), 0, 255).astype(np.uint8))


def one_bare_decode_u8(work: Path, n: int) -> dict:
    """The compiled decoder with the rounding to uint8 in its graph (``LoadedVAE.decode_uint8``), 4096 a call."""
    return timed_decoder(work, n, lambda m, z: m.decode_uint8(z))


def one_floor(work: Path, n: int, dead_letters: bool = False) -> dict:
    """Beam's floor: read the .npy in chunks -> raw bytes of each chunk -> a TFRecord file sink; with
    ``dead_letters`` also the reader's dead-letter output through a second file sink (``WriteDeadLetters``:
    ``beam.Map`` to JSON -> ``WriteToText`` into one file), as the jobs have."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from vaestream import beam as vb

    src = make_inputs(work, n)
    out = work / f"beam_floor{'_dl' if dead_letters else ''}-{n}"
    t_start = time.perf_counter()
    vb.clear_outputs(str(out / "raw-*"), str(out / "dead_letter.jsonl"))
    p = vb.make_pipeline(PipelineOptions([]))
    read = p | "ReadRecords" >> vb.ReadRecords([str(src)])
    _ = (read[vb.RECORDS]
         | "RawBytes" >> beam.Map(lambda b: [b.records.tobytes()])
         | "WriteTFRecord" >> beam.io.Write(vb.BatchedTFRecordSink(str(out / "raw"))))
    if dead_letters:
        read[vb.DEAD_LETTER] | "WriteDeadLetters" >> vb.WriteDeadLetters(str(out / "dead_letter.jsonl"))
    t0 = time.perf_counter()
    result = vb.run_pipeline(p)
    secs = time.perf_counter() - t0
    records = vb.counters(result).get("records_in", 0)
    files, nbytes = vb.file_sizes(str(out / "raw-*"))
    return {"records": records, "seconds": secs, "wall_seconds": time.perf_counter() - t_start, "bytes_out": nbytes,
            "files": len(files)}


def one_job(work: Path, n: int, job: str) -> dict:
    from pipelines import decode, encode, prepare

    src, model = make_inputs(work, n), make_model(work)
    out = work / f"{job}-{n}"
    if job.startswith("decode"):  # the codes to decode are made first, outside the timing
        codes = work / f"encode-{n}"
        if not codes.exists():
            encode.run(["--input", str(src), "--model", str(model), "--output", str(codes)])
    t_start = time.perf_counter()
    if job == "encode":
        s = encode.run(["--input", str(src), "--model", str(model), "--output", str(out)])
    elif job == "encode_record":
        s = encode.run(["--input", str(src), "--model", str(model), "--output", str(out), "--code_layout", "record"])
    elif job == "encode_overlap":
        s = encode.run(["--input", str(src), "--model", str(model), "--output", str(out), "--inference",
                        "overlap"])
    elif job == "encode_parquet":
        s = encode.run(["--input", str(src), "--model", str(model), "--output", str(out), "--output_format",
                        "parquet"])
    elif job == "prepare":
        s = prepare.run(["--input", str(src), "--output", str(out), "--num_shards", "8"])
    elif job in ("decode", "decode_record", "decode_overlap"):
        extra = {"decode": [], "decode_record": ["--recon_layout", "record"],
                 "decode_overlap": ["--inference", "overlap"]}[job]
        s = decode.run(["--input", str(codes), "--model", str(model), "--output", str(out), "--output_dtype", "uint8",
                        *extra])
    else:
        raise SystemExit(f"unknown job {job}")
    wall = time.perf_counter() - t_start
    return {"records": s["records"], "seconds": s["seconds"], "wall_seconds": wall, "bytes_in": s["bytes_in"],
            "bytes_out": s["bytes_out"], "dead_lettered": s["dead_lettered"]}


def one_stock(work: Path, n: int, max_batch_size: int | None) -> dict:
    """Beam's stock RunInference, one record per element."""
    import apache_beam as beam
    import numpy as np
    import tensorflow as tf
    from apache_beam.ml.inference.base import ModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from vaestream import beam as vb

    model_dir = str(make_model(work))

    class PerRecordHandler(ModelHandler):
        """Elements are (key, record [28, 28] uint8); predictions (key, mean, log_scale)."""

        def __init__(self):
            kw = {} if max_batch_size is None else {"min_batch_size": 1, "max_batch_size": max_batch_size}
            super().__init__(**kw)

        def load_model(self):
            return vb.LoadedVAE.from_model_dir(model_dir)

        def run_inference(self, batch, model, inference_args=None):
            keys = [k for k, _ in batch]
            mean, log_scale = model.encode(np.stack([r for _, r in batch]), 1 / 255)
            return list(zip(keys, mean, log_scale))

    def to_example(pred):
        key, mean, log_scale = pred
        return [tf.train.Example(features=tf.train.Features(feature={
            "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
            "mean": tf.train.Feature(float_list=tf.train.FloatList(value=mean)),
            "log_scale": tf.train.Feature(float_list=tf.train.FloatList(value=log_scale))})).SerializeToString()]

    out = work / f"stock-{max_batch_size}-{n}"
    p = vb.make_pipeline(PipelineOptions([]))
    read = p | "Read" >> vb.ReadRecords([str(make_inputs(work, n))])
    _ = (read[vb.RECORDS]
         | "OnePerElement" >> beam.FlatMap(lambda b: zip(b.keys, b.records))
         | "RunInference" >> RunInference(PerRecordHandler())
         | "ToExample" >> beam.Map(to_example)
         | "Write" >> beam.io.Write(vb.BatchedTFRecordSink(str(out / "codes"))))
    t0 = time.perf_counter()
    vb.run_pipeline(p)
    secs = time.perf_counter() - t0
    written = vb.count_written(vb.file_sizes(str(out / "codes-*"))[0])
    return {"records": written, "seconds": secs}


def run_one(args) -> None:
    from vaestream.beam import freeze_startup_heap

    freeze_startup_heap()  # as the job entry points (`vaestream encode`, `python pipelines/encode.py`) do
    work = Path(args.work)
    if args.one == "bare":
        r = one_bare(work, args.n)
    elif args.one == "bare_decode":
        r = one_bare_decode(work, args.n)
    elif args.one == "bare_decode_u8":
        r = one_bare_decode_u8(work, args.n)
    elif args.one == "stock":
        r = one_stock(work, args.n, None)
    elif args.one == "unbatched":
        r = one_stock(work, args.n, 1)
    elif args.one in ("beam_floor", "beam_floor_dl"):
        r = one_floor(work, args.n, dead_letters=args.one == "beam_floor_dl")
    else:
        r = one_job(work, args.n, args.one)
    r["records_per_second"] = r["records"] / r["seconds"]
    r["us_per_record"] = 1e6 * r["seconds"] / r["records"]
    r["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    print("RESULT " + json.dumps(r))


def measure_once(work: Path, what: str, n: int, extra: list[str] | None = None) -> dict:
    """One run of one measurement in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--one", what, "--n", str(n), "--work", str(work)] + list(extra or [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    r = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    return r if r is not None else {"error": (proc.stderr or proc.stdout)[-2000:]}


def median_of(runs: list[dict]) -> dict:
    """The run of median ``seconds`` (``seconds_all``: every run's), or the first error."""
    errors = [r for r in runs if "seconds" not in r]
    if errors:
        return errors[0]
    ordered = sorted(runs, key=lambda r: r["seconds"])
    best = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        best["seconds_all"] = [round(r["seconds"], 3) for r in runs]
        best["peak_rss_mib_all"] = [r["peak_rss_mib"] for r in runs]
    return best


def measure(work: Path, what: str, n: int, repeat: int = 1) -> dict:
    """The median of ``repeat`` runs of one measurement, each in a fresh subprocess."""
    return median_of([measure_once(work, what, n) for _ in range(max(1, repeat))])


def measure_alternated(work: Path, jobs: list[str], n: int, repeat: int) -> dict:
    """``repeat`` rounds, each running every job of ``jobs`` once in turn (bare and job runs alternate, so a
    change of machine load hits them alike); the median run of each job."""
    runs: dict[str, list[dict]] = {j: [] for j in jobs}
    for _ in range(max(1, repeat)):
        for j in jobs:
            runs[j].append(measure_once(work, j, n))
    return {j: median_of(r) for j, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--out", "--work", dest="work", default="/tmp/bench_beam")
    ap.add_argument("--jobs", nargs="+", default=["bare", "encode", "encode_overlap", "stock", "unbatched", "prepare",
                                                     "decode", "beam_floor", "beam_floor_dl"])
    ap.add_argument("--tiny", type=int, default=100, help="records of the tiny input that measures the fixed cost")
    ap.add_argument("--fixed_jobs", "--fixed-jobs", nargs="*",
                    default=["encode", "decode", "beam_floor", "beam_floor_dl"],
                    help="jobs (among --jobs) also run on the tiny input (0 jobs: no fixed-cost measurement)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the median is kept")
    ap.add_argument("--alternate", action="store_true",
                    help="run the jobs of each size in rounds (bare, job, bare, job, ...) instead of each job's "
                         "repeats back to back")
    ap.add_argument("--stock-max", type=int, default=100000, help="largest N for the stock baseline")
    ap.add_argument("--unbatched-max", type=int, default=10000, help="largest N for the unbatched baseline")
    ap.add_argument("--unbatched-n", type=int, default=2000,
                    help="records the unbatched baseline runs on (its per-record rate is flat; it is slow)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return run_one(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    make_model(work)
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date":
                     time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": "784-500-20 bernoulli",
                     "sizes": {}, "fixed": {}}
    # the fixed per-job cost T0: each job on a tiny input
    fixed_jobs = [j for j in args.fixed_jobs if j in args.jobs]
    if fixed_jobs:
        make_inputs(work, args.tiny)
    for what in fixed_jobs:
        r = measure(work, what, args.tiny, args.repeat)
        results["fixed"][what] = r
        print(f"fixed (N={args.tiny}) {what}: {json.dumps(r)}", file=sys.stderr, flush=True)
    for n in args.sizes:
        make_inputs(work, n)
        row = {}
        alternated = (measure_alternated(work, [j for j in args.jobs if j not in ("stock", "unbatched")], n,
                                         args.repeat) if args.alternate else {})
        for what in args.jobs:
            if what == "stock" and n > args.stock_max or what == "unbatched" and n > args.unbatched_max:
                continue
            m = min(n, args.unbatched_n) if what == "unbatched" else n
            if m != n:
                make_inputs(work, m)
            row[what] = alternated[what] if what in alternated else measure(work, what, m, args.repeat)
            t0 = results["fixed"].get(what, {})
            if "seconds" in row[what] and "seconds" in t0 and m > t0["records"]:
                # net time per record: what a record costs once the job is running
                row[what]["net_us_per_record"] = 1e6 * (row[what]["seconds"] - t0["seconds"]) / (m - t0["records"])
                if "wall_seconds" in row[what] and "wall_seconds" in t0:
                    row[what]["net_wall_us_per_record"] = (1e6 * (row[what]["wall_seconds"] - t0["wall_seconds"])
                                                           / (m - t0["records"]))
            print(f"N={n} {what}: {json.dumps(row[what])}", file=sys.stderr, flush=True)
        enc, bare = row.get("encode", {}), row.get("bare", {})
        ratios = {}
        if "records_per_second" in enc:
            if "records_per_second" in bare:
                ratios["encode_over_bare"] = enc["records_per_second"] / bare["records_per_second"]
            for base in ("encode_overlap", "stock", "unbatched"):
                if "records_per_second" in row.get(base, {}):
                    ratios[f"encode_over_{base}"] = enc["records_per_second"] / row[base]["records_per_second"]
        if "records_per_second" in row.get("beam_floor", {}) and "records_per_second" in enc:
            ratios["encode_over_beam_floor"] = enc["records_per_second"] / row["beam_floor"]["records_per_second"]
        for peer in ("bare_decode", "bare_decode_u8"):
            bare_dec = row.get(peer, {})
            for job in ("decode", "decode_record", "decode_overlap"):
                dec = row.get(job, {})
                if "records_per_second" in dec and "records_per_second" in bare_dec:
                    ratios[f"{job}_over_{peer}"] = dec["records_per_second"] / bare_dec["records_per_second"]
        row["ratios"] = ratios
        results["sizes"][str(n)] = row
    fx = results["fixed"]
    if "seconds" in fx.get("beam_floor", {}):
        floor = fx["beam_floor"]
        results["fixed_over_beam_floor"] = {
            j: {"seconds": round(fx[j]["seconds"] / floor["seconds"], 3),
                "wall_seconds": round(fx[j]["wall_seconds"] / floor["wall_seconds"], 3)}
            for j in fx if j != "beam_floor" and "seconds" in fx[j] and "wall_seconds" in fx[j]}
    results["fixed_seconds"] = {j: {"seconds": round(r["seconds"], 3), "wall_seconds": round(r["wall_seconds"], 3)}
                                for j, r in fx.items() if "seconds" in r and "wall_seconds" in r}
    sizes = [str(n) for n in args.sizes]
    if len(sizes) > 1 and all("us_per_record" in results["sizes"][s].get("encode", {}) for s in sizes):
        per = [results["sizes"][s]["encode"]["us_per_record"] for s in sizes]
        results["encode_us_per_record_largest_over_smallest"] = per[-1] / per[0]
        # seconds = fixed + N x marginal: the job's start-up and its steady per-record cost, separately
        import numpy as np

        ns = np.array([float(s) for s in sizes])
        secs = np.array([results["sizes"][s]["encode"]["seconds"] for s in sizes])
        marginal, fixed = np.polyfit(ns, secs, 1)
        results["encode_fit"] = {"fixed_seconds": round(float(fixed), 3),
                                 "marginal_us_per_record": round(float(marginal) * 1e6, 3),
                                 "marginal_records_per_second": round(1.0 / float(marginal), 1)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

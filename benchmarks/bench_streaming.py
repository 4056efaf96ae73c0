"""Streaming benchmark: a simulated stream of files, Fashion-MNIST switching to MNIST mid-stream.

Prints one JSON object with three parts (one run, one process):

* ``encode``: the streaming Beam encoder (``vaestream.beam.streaming`` on the in-process streaming runner,
  file watcher, ``--window`` s windows) while a producer drops ``--records`` records per file every
  ``--interval`` s (Fashion-MNIST test records, then MNIST test records): sustained records/s (records coded
  between the first arrival and the last window written), the offered rate, and the latency from a file's
  arrival (rename into the watched folder) to its window's codes on disk, p50 / p99. Peer: the batch encode
  job (``pipelines/encode.py`` on the FnApiRunner) over the same files, as a throughput ratio. The drift
  monitor's flags are reported around the switch.
* ``online``: online AEVB (``vaestream.online.OnlineLearner``) started from a model pretrained on
  Fashion-MNIST, on a stream of ``--files`` files (half Fashion-MNIST training records, then MNIST training
  records), vs. the same pretrained model frozen: per-file prequential bits/record (-ELBO / ln 2 of each file
  before it is trained on) for both, the gap after the switch, how many files online training needs to come
  within 10 % of its final level, and the ratio frozen / online at the end. Versions published to a registry.
* ``memory``: the online run's resident set size after each file over a stream of 10x the replay buffer:
  at the first file, when the buffer is full, middle, last, and the least-squares slope (MiB per file) after
  the buffer is full.

    python benchmarks/bench_streaming.py [--files 40] [--records 500] [--buffer 2000] [--interval 0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def pct(values, q):
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else None


def pretrain(fashion: np.ndarray, out: Path, steps: int) -> Path:
    from vaestream.coding import codec
    from vaestream.config import ModelConfig
    from vaestream.data import make_dataset
    from vaestream.training import TrainConfig, train

    ds = make_dataset(fashion, "bernoulli", "fashion-train")
    train(ds, out, ModelConfig(latent_dim=10, hidden=(200,)), TrainConfig(steps=steps, seed=1), progress=False)
    codec.write_tables(out, fashion[:2000])
    return out


def bench_encode(model: Path, fashion_test, mnist_test, work: Path, args, n_files: int, interval: float,
                 tag: str, peer: bool = True) -> dict:
    from pipelines import encode as batch_encode

    from vaestream.beam import streaming as bs
    from vaestream.online.drift import DriftConfig

    src = work / f"stream_in_{tag}"
    src.mkdir()
    half = n_files // 2
    chunks = [fashion_test[i * args.records:(i + 1) * args.records] for i in range(half)] + \
             [mnist_test[i * args.records:(i + 1) * args.records] for i in range(n_files - half)]
    arrivals: dict[str, float] = {}

    def producer():
        time.sleep(args.warmup)
        for i, x in enumerate(chunks):
            tmp = src / f".part-{i:04d}.npy"
            np.save(tmp, x)
            final = src / f"part-{i:04d}.npy"
            os.replace(tmp, final)
            arrivals[str(final)] = time.time()
            time.sleep(interval)

    th = threading.Thread(target=producer)
    out = work / f"stream_out_{tag}"
    th.start()
    summary = bs.run_stream(str(out), str(src / "*.npy"), model_dir=str(model),
                            config=bs.StreamConfig(window=args.window),
                            drift=DriftConfig(threshold=0.1, two_sided=True),
                            poll_interval=args.poll, idle_timeout=args.warmup + interval * n_files + 5)
    th.join()
    wins = bs.read_windows(str(out))
    written = {}
    for w in wins:
        for s in w["sources"]:
            written[s] = w["written_at"]
    lat = [written[p] - t for p, t in arrivals.items() if p in written]
    first_pane = min(w["written_at"] for w in wins)
    steady = [written[p] - t for p, t in arrivals.items() if p in written and t > first_pane]
    steady_arr = [t for p, t in arrivals.items() if p in written and t > first_pane]
    steady_n = sum(args.records for p, t in arrivals.items() if p in written and t > first_pane)
    first = min(arrivals.values())
    last = max(w["written_at"] for w in wins)
    n = sum(w["records"] for w in wins)
    drift = [json.loads(s) for s in (out / "drift.jsonl").read_text().splitlines()]
    switch_t = arrivals[str(src / f"part-{half:04d}.npy")]
    flags = [{"window_start_s_after_switch": round(d_start - switch_t, 2), "bits_per_record": round(d["bits_per_record"], 2),
              "flagged": d["flagged"]}
             for d, d_start in ((d, _ts(d["window_start"])) for d in drift)]
    # peer: the batch job over the same files
    bsum, batch_seconds = None, None
    if peer:
        t0 = time.perf_counter()
        bsum = batch_encode.run(["--input", str(src / "part-*.npy"), "--model", str(model), "--output",
                                 str(work / f"batch_out_{tag}")])
        batch_seconds = time.perf_counter() - t0
    stream_rate = n / max(last - first, 1e-9)
    out_d = {"files": n_files, "records_per_file": args.records, "interval_s": interval, "window_s": args.window,
            "poll_s": args.poll, "offered_records_per_s": round(args.records / interval, 1),
            "records_coded": n, "files_coded": len(written), "dead_lettered": summary["dead_lettered"],
            "sustained_records_per_s": round(stream_rate, 1),
            "latency_s_p50": round(pct(lat, 50), 3), "latency_s_p99": round(pct(lat, 99), 3),
            "latency_s_max": round(max(lat), 3), "panes": len(wins),
            "steady_state": {"files": len(steady), "note": "files arriving after the first pane was written "
                                                          "(the model is loaded at the first element)",
                             "latency_s_p50": round(pct(steady, 50), 3) if steady else None,
                             "latency_s_p99": round(pct(steady, 99), 3) if steady else None,
                             "records_per_s": round(steady_n / max(last - min(steady_arr), 1e-9), 1)
                             if steady else None},
            "drift_windows": flags,
            }
    if peer:
        out_d["peer_batch_job"] = {"records": bsum["records"], "seconds": round(batch_seconds, 3),
                                   "records_per_s_job": bsum["records_per_second"]}
        out_d["ratio_stream_to_batch_records_per_s"] = round(stream_rate / max(bsum["records_per_second"], 1e-9), 3)
    return out_d


def _ts(iso: str) -> float:
    import datetime

    return datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def bench_online(model: Path, fashion, mnist, work: Path, args) -> dict:
    from vaestream import store
    from vaestream.online import OnlineConfig, OnlineLearner
    from vaestream.training import TrainConfig, dataset_elbo

    frozen = store.load_model(model)
    files_dir = work / "online_in"
    files_dir.mkdir()
    half = args.files // 2
    r = args.records
    paths = []
    for i in range(args.files):
        x = fashion[i * r:(i + 1) * r] if i < half else mnist[(i - half) * r:(i - half + 1) * r]
        p = files_dir / f"part-{i:04d}.npy"
        np.save(p, x)
        paths.append(p)
    learner = OnlineLearner(work / "online_work", registry=work / "registry", initial_model=model,
                            train_config=TrainConfig(seed=1),
                            online_config=OnlineConfig(batch_size=100, buffer_size=args.buffer, holdout_fraction=0.05,
                                                       holdout_size=500, checkpoint_every_files=args.checkpoint_every,
                                                       seed=1))
    rows, rss = [], []
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        rec = learner.process_file(p)
        x = np.load(p).reshape(r, -1).astype(np.float32) / 255.0
        fr = dataset_elbo(frozen, x)["elbo"]
        rows.append({"file": i, "data": "fashion" if i < half else "mnist",
                     "online_bits": rec["bits_per_record"], "frozen_bits": -fr / np.log(2),
                     "drift_flagged": rec["drift_flagged"]})
        rss.append(rss_mib())
    if learner.pending:
        learner.checkpoint()
    seconds = time.perf_counter() - t0
    from vaestream.online.drift import DriftConfig, DriftMonitor

    two = DriftMonitor(DriftConfig(threshold=0.1, two_sided=True))  # the same per-file bounds, judged both ways
    two_flags = [a["file"] for a in rows
                 if two.observe(str(a["file"]), elbo_sum=-a["online_bits"] * np.log(2), records=1)["flagged"]]
    after = rows[half:]
    final = statistics.mean(a["online_bits"] for a in after[-3:])
    within = next((k for k, a in enumerate(after) if a["online_bits"] <= 1.1 * final), None)
    n_rec = args.files * r
    full = max(0, int(np.ceil(args.buffer / r)) - 1)  # the file after which the replay buffer is full
    tail = np.asarray(rss[full:])
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0]) if len(tail) > 1 else None
    return {
        "online": {
            "files": args.files, "records": n_rec, "buffer": args.buffer, "stream_to_buffer": round(n_rec / args.buffer, 1),
            "seconds": round(seconds, 2), "records_per_s": round(n_rec / seconds, 1),
            "before_switch_bits": {"online": round(statistics.mean(a["online_bits"] for a in rows[half - 3:half]), 2),
                                   "frozen": round(statistics.mean(a["frozen_bits"] for a in rows[half - 3:half]), 2)},
            "first_file_after_switch_bits": {"online": round(after[0]["online_bits"], 2),
                                             "frozen": round(after[0]["frozen_bits"], 2)},
            "last3_after_switch_bits": {"online": round(final, 2),
                                        "frozen": round(statistics.mean(a["frozen_bits"] for a in after[-3:]), 2)},
            "ratio_frozen_to_online_bits_end": round(statistics.mean(a["frozen_bits"] for a in after[-3:]) / final, 3),
            "files_to_within_10pct_of_final": within, "records_to_within_10pct": None if within is None else within * r,
            "switch_at_file": half,
            "drift_flagged_files": [a["file"] for a in rows if a["drift_flagged"]],
            "drift_flagged_files_two_sided": two_flags,
            "versions_published": learner.registry.versions() if learner.registry else [],
            "per_file": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in a.items()} for a in rows]},
        "memory": {"rss_mib_first_file": round(rss[0], 1), "rss_mib_buffer_full": round(rss[full], 1),
                   "rss_mib_middle": round(rss[len(rss) // 2], 1), "rss_mib_last": round(rss[-1], 1),
                   "rss_mib_max": round(max(rss), 1),
                   "growth_mib_buffer_full_to_last": round(rss[-1] - rss[full], 1),
                   "slope_mib_per_file_after_buffer_full": None if slope is None else round(slope, 3),
                   "per_file_rss_mib": [round(v, 1) for v in rss]}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=40, help="online stream: files (half Fashion-MNIST, half MNIST)")
    ap.add_argument("--records", type=int, default=500, help="records per file")
    ap.add_argument("--buffer", type=int, default=2000, help="replay buffer (the stream is files*records)")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--encode-files", type=int, default=40)
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between dropped files")
    ap.add_argument("--slow-interval", type=float, default=1.0, help="a second, slower stream (latency when it keeps up)")
    ap.add_argument("--slow-files", type=int, default=12)
    ap.add_argument("--window", type=float, default=2.0)
    ap.add_argument("--poll", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=8.0, help="seconds before the producer starts (model load)")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--keep", default=None, help="keep the work directory here")
    args = ap.parse_args(argv)

    from vaestream.data import load_records

    fashion = load_records("fashion-mnist", "train")
    fashion_test = load_records("fashion-mnist", "test")
    mnist = load_records(str(MNIST), "train")
    mnist_test = load_records(str(MNIST), "test")
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_streaming-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = pretrain(fashion, work / "pretrained", args.pretrain_steps)
    pre_s = time.perf_counter() - t0
    res = {"benchmark": "streaming", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": "2-core AVX-512, 24 GiB, shared", "python": platform.python_version(),
           "model": "784-200-10 Bernoulli, pretrained on Fashion-MNIST", "pretrain_seconds": round(pre_s, 1)}
    res["encode"] = bench_encode(model, fashion_test, mnist_test, work, args, args.encode_files, args.interval, "fast")
    res["encode_slow"] = bench_encode(model, fashion_test, mnist_test, work, args, args.slow_files,
                                      args.slow_interval, "slow", peer=False)
    res.update(bench_online(model, fashion, mnist, work, args))
    res["seconds_total"] = round(time.perf_counter() - t0, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

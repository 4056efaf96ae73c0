"""Streaming benchmark: a simulated stream of files, Fashion-MNIST switching to MNIST mid-stream.

Prints one JSON object with three parts (one run, one process):

* ``stream`` (``--part stream`` runs it alone): the streaming Beam encoder (``vaestream.beam.streaming`` on
  the in-process streaming runner, file watcher, ``--max-latency`` sizing window and poll) while a producer
  renames real MNIST records into the watched folder at each offered rate of ``--rates`` for ``--duration`` s
  (files of ``--records`` records, bigger above ``--max-files-per-s`` files/s): records coded, sustained
  records/s (records coded between the first arrival and the last pane written), latency from a file's
  arrival (rename) to its window's codes on disk, p50 / p99, resident memory every second; then, in the same
  run, the batch encode job (``pipelines/encode.py``, FnApiRunner) on the same files, as a ratio.
  ``teststream``: the same transforms fed by a ``TestStream`` (the runner alone, no watcher).
* ``online``: online AEVB (``vaestream.online.OnlineLearner``) started from a model pretrained on
  Fashion-MNIST, on a stream of ``--files`` files (half Fashion-MNIST training records, then MNIST training
  records), vs. the same pretrained model frozen: per-file prequential bits/record (-ELBO / ln 2 of each file
  before it is trained on) for both, the gap after the switch, how many files online training needs to come
  within 10 % of its final level, and the ratio frozen / online at the end. Versions published to a registry.
* ``memory``: the online run's resident set size after each file over a stream of 10x the replay buffer:
  at the first file, when the buffer is full, middle, last, and the least-squares slope (MiB per file) after
  the buffer is full.

* ``--source redis`` (with ``--part stream``): the same encoder reading a stream of a local ``redis-server``
  (``vaestream.beam.broker_source``: the in-process runner's bridge, panes committed to the ledger, then
  acknowledged) while a publisher *process* offers each rate of ``--rates`` at 100 records per message
  (``--message-rate R``: also R records/s at one record per message); latency = a pane's summary on disk
  minus the broker time of each message in it; then the batch encode job on the same (cycled) records; with
  ``--kill-rate R`` the job runs in a process of its own, is killed (SIGKILL) mid-stream and restarted, and the
  codes are checked: records out = records in, none twice.

    python benchmarks/bench_streaming.py [--part stream|online|all] [--rates 2000 10000 40000] [--duration 60]
    python benchmarks/bench_streaming.py --part stream --source redis --rates 10000 40000 80000 --duration 60 \
        --message-rate 5000 --kill-rate 20000
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


class Producer(threading.Thread):
    """Renames ``records_per_file``-record ``.npy`` files into ``folder`` at ``rate`` records/s for ``duration``
    seconds (real MNIST records, cycled); ``arrivals``: path -> wall time of the rename."""

    def __init__(self, folder: Path, records: np.ndarray, rate: float, records_per_file: int, duration: float):
        super().__init__(daemon=True)
        self.folder, self.records, self.rate = folder, records, rate
        self.rpf, self.duration = records_per_file, duration
        self.arrivals: dict[str, float] = {}
        self.produced = 0

    def run(self):
        n_files = int(round(self.rate * self.duration / self.rpf))
        interval = self.rpf / self.rate
        t0 = time.monotonic()
        for i in range(n_files):
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            s = (i * self.rpf) % (len(self.records) - self.rpf)
            tmp = self.folder / f".part-{i:05d}.npy"
            np.save(tmp, self.records[s:s + self.rpf])
            final = self.folder / f"part-{i:05d}.npy"
            os.replace(tmp, final)
            self.arrivals[str(final)] = time.time()
            self.produced += self.rpf


def _written(out: Path) -> dict:
    """source path -> (time its pane was written, records of that source in it) over the panes on disk."""
    from vaestream.beam import streaming as bs

    return {s: w["written_at"] for w in bs.read_windows(str(out)) for s in w["sources"]}


def bench_stream_rate(model: Path, records: np.ndarray, work: Path, rate: float, args) -> dict:
    """The streaming job on the watched folder at an offered ``rate``, then the batch job on the same files."""
    from pipelines import encode as batch_encode

    from vaestream.beam import streaming as bs
    from vaestream.online.drift import DriftConfig

    tag = f"{int(rate)}"
    src, out = work / f"in_{tag}", work / f"out_{tag}"
    src.mkdir()
    rpf = max(args.records, int(rate / args.max_files_per_s))
    prod = Producer(src, records, rate, rpf, args.duration)
    cfg = bs.StreamConfig(window=args.window, max_latency=args.max_latency)
    stop = threading.Event()
    rss: list[tuple[float, float]] = []
    res: dict = {}

    def supervise():  # memory every second; stop once every produced file is coded (or the drain cap passed)
        t0 = time.monotonic()
        prod.start()
        done_at = None
        while True:
            time.sleep(1.0)
            rss.append((round(time.monotonic() - t0, 1), round(rss_mib(), 1)))
            if not prod.is_alive():
                done_at = done_at or time.monotonic()
                if len(_written(out)) >= len(prod.arrivals) or time.monotonic() - done_at > args.drain:
                    break
        stop.set()

    sup = threading.Thread(target=supervise, daemon=True)
    t_start = time.perf_counter()
    sup.start()
    summary = bs.run_stream(str(out), str(src / "part-*.npy"), model_dir=str(model), config=cfg,
                            drift=DriftConfig(threshold=0.1, two_sided=True), poll_interval=args.poll, stop=stop)
    stream_wall = time.perf_counter() - t_start
    sup.join()
    written = _written(out)
    lat = [written[p] - t for p, t in prod.arrivals.items() if p in written]
    n = summary["records"]
    first = min(prod.arrivals.values())
    last = max(written.values()) if written else first
    sustained = n / max(last - first, 1e-9)
    t0 = time.perf_counter()
    bsum = batch_encode.run(["--input", str(src / "part-*.npy"), "--model", str(model), "--output",
                             str(work / f"batch_{tag}")])
    batch_wall = time.perf_counter() - t0
    res = {"offered_records_per_s": rate, "records_per_file": rpf, "files_per_s": round(rate / rpf, 2),
           "duration_s": args.duration, "window_s": cfg.window, "poll_s": cfg.poll_interval(args.poll),
           "max_latency_s": args.max_latency, "records_produced": prod.produced, "records_coded": n,
           "files_produced": len(prod.arrivals), "files_coded": len(written), "dead_lettered": summary["dead_lettered"],
           "polls_with_files": summary["polls_with_files"], "panes": summary["panes"],
           "sustained_records_per_s": round(sustained, 1),
           "latency_s_p50": round(pct(lat, 50), 3) if lat else None,
           "latency_s_p99": round(pct(lat, 99), 3) if lat else None,
           "latency_s_max": round(max(lat), 3) if lat else None, "stream_wall_s": round(stream_wall, 1),
           "rss_mib": {"max": max(v for _, v in rss), "first": rss[0][1], "last": rss[-1][1],
                       "every_5s": rss[::5]},
           "peer_batch_job": {"records": bsum["records"], "wall_s": round(batch_wall, 2),
                              "records_per_s_job": bsum["records_per_second"],
                              "records_per_s_wall": round(bsum["records"] / batch_wall, 1)}}
    res["ratio_stream_to_batch"] = round(sustained / max(bsum["records_per_second"], 1e-9), 3)
    res["keeps_up"] = bool(n == prod.produced and lat and pct(lat, 99) <= args.max_latency
                           and sustained >= 0.9 * rate)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / f"batch_{tag}", ignore_errors=True)
    return res


def bench_teststream(model: Path, records: np.ndarray, work: Path, args) -> dict:
    """The runner alone: the same transforms fed by a ``TestStream`` (no file watcher, no producer) of
    ``--ts-rounds`` rounds of 10 files, as fast as the runner goes."""
    import apache_beam as beam
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    from vaestream import beam as vb
    from vaestream.beam import streaming as bs

    src = work / "ts_in"
    src.mkdir()
    rpf = 1000
    stream, k, t = TestStream(coder=beam.coders.StrUtf8Coder()), 0, 1_000_000.0
    for r in range(args.ts_rounds):
        batch = []
        for _ in range(10):
            p = src / f"f{k:05d}.npy"
            s = (k * rpf) % (len(records) - rpf)
            np.save(p, records[s:s + rpf])
            batch.append(TimestampedValue(str(p), t + r * 0.25))
            k += 1
        stream = stream.add_elements(batch).advance_watermark_to(t + r * 0.25)
    stream = stream.advance_watermark_to_infinity()
    p = bs.streaming_pipeline()
    p | stream | bs.StreamEncode(str(work / "ts_out"), model_dir=str(model), config=bs.StreamConfig(window=1.0))
    t0 = time.perf_counter()
    vb.run_pipeline(p)
    sec = time.perf_counter() - t0
    n = sum(w["records"] for w in bs.read_windows(str(work / "ts_out")))
    return {"rounds": args.ts_rounds, "files": k, "records": n, "seconds": round(sec, 2),
            "records_per_s": round(n / sec, 1), "note": "model already loaded in this process"}


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
            "files": args.files, "records": n_rec, "buffer": args.buffer,
            "stream_to_buffer": round(n_rec / args.buffer, 1),
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


# ---------------------------------------------------------------------------------------------------------
# --source redis: the stream encoder fed by a broker
# ---------------------------------------------------------------------------------------------------------
def run_publisher(url: str, rate: float, duration: float, per_message: int, records_path: str) -> dict:
    """(In its own process.) Append ``rate * duration`` records (``records_path``, cycled) to the stream at
    ``rate`` records/s, ``per_message`` per message, in pipelined groups of ~10 ms; prints a JSON summary."""
    from vaestream.broker import BrokerURL
    from vaestream.broker import wire

    x = np.load(records_path, mmap_mode="r")
    u = BrokerURL.parse(url)
    client = u.client()
    n_msgs = int(round(rate * duration / per_message))
    interval = per_message / rate
    group = max(1, int(0.01 / interval))
    t0 = time.perf_counter()
    i = sent = 0
    behind = 0.0
    while i < n_msgs:
        delay = t0 + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            behind = max(behind, -delay)
        pipe = client.pipeline(transaction=False)
        for k in range(i, min(n_msgs, i + group)):
            s = (k * per_message) % (len(x) - per_message)
            pipe.xadd(u.stream, wire.encode(np.asarray(x[s:s + per_message])))
            sent += per_message
        pipe.execute()
        i += group
    dt = time.perf_counter() - t0
    return {"messages": n_msgs, "records": sent, "seconds": round(dt, 3), "records_per_s": round(sent / dt, 1),
            "max_behind_s": round(behind, 3), "cpu_s": round(time.process_time(), 2)}


def _publisher(url: str, rate: float, duration: float, per_message: int, records_path: str):
    import subprocess

    return subprocess.Popen([sys.executable, __file__, "--publisher", url, str(rate), str(duration), str(per_message),
                             records_path], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def proc_cpu_s(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (``/proc/PID/stat``); ``children``:
    and those of the children it waited for (redis-server's forks that rewrite the append-only file)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(map(int, fields[11:15 if children else 13])) / os.sysconf("SC_CLK_TCK")


def _panes(out: Path) -> list[dict]:
    from vaestream.beam import streaming as bs

    return bs.read_windows(str(out))


def bench_broker_rate(model: Path, records_path: str, srv, work: Path, rate: float, per_message: int, args) -> dict:
    """The stream encoder reading ``srv``'s stream (the in-process runner's bridge) while a publisher process
    offers ``rate`` records/s; latency = a pane's summary on disk minus each of its messages' broker time."""
    from vaestream.beam import streaming as bs
    from vaestream.broker import BrokerReader
    from vaestream.broker.wire import id_time

    tag = f"{int(rate)}-{per_message}"
    url = srv.url(f"bench-{tag}")
    out = work / f"broker_out_{tag}"
    cfg = bs.StreamConfig(window=args.window, max_latency=args.max_latency)
    BrokerReader(url, "stream-encode").setup().close()       # the group exists before the first message
    pub = _publisher(url, rate, args.duration, per_message, records_path)
    stop = threading.Event()
    rss: list[tuple[float, float]] = []
    def supervise():   # memory every second; stop once the publisher is done and the group has no backlog
        t0 = time.monotonic()
        done_at = None
        while True:
            time.sleep(1.0)
            rss.append((round(time.monotonic() - t0, 1), round(rss_mib(), 1)))
            if pub.poll() is not None:
                done_at = done_at or time.monotonic()
                r = BrokerReader(url, "stream-encode")
                b = r.backlog()
                r.close()
                if (b["pending"] == 0 and not b["lag"]) or time.monotonic() - done_at > args.drain:
                    break
        stop.set()

    sup = threading.Thread(target=supervise, daemon=True)
    sup.start()
    t_start, cpu0, redis0 = time.perf_counter(), proc_cpu_s(os.getpid()), proc_cpu_s(srv.proc.pid, True)
    summary = bs.run_stream(str(out), model_dir=str(model), config=cfg, source=url, stop=stop,
                            batch_messages=args.batch_messages)
    wall = time.perf_counter() - t_start
    cpu = {"job": round(proc_cpu_s(os.getpid()) - cpu0, 1),
           "redis_server": round(proc_cpu_s(srv.proc.pid, True) - redis0, 1)}
    sup.join()
    pubres = json.loads(pub.communicate()[0] or "{}")
    panes = _panes(out)
    lat = [p["written_at"] - id_time(m) for p in panes for m in p.get("messages", [])]
    n = sum(p["records"] for p in panes)
    first = min((id_time(m) for p in panes for m in p.get("messages", [])), default=0.0)
    last = max((p["written_at"] for p in panes), default=first)
    sustained = n / max(last - first, 1e-9)
    info = srv.client().info("memory")
    left = srv.client().xlen(f"bench-{tag}")
    rss_end = rss_mib()
    trimmed_rss = _malloc_trim_rss()
    res = {"offered_records_per_s": rate, "records_per_message": per_message,
           "offered_messages_per_s": round(rate / per_message, 1), "duration_s": args.duration,
           "window_s": cfg.window, "max_latency_s": args.max_latency, "publisher": pubres,
           "records_published": pubres.get("records"), "records_coded": n, "panes": len(panes),
           "messages_read": summary["messages_read"], "reads": summary["reads"], "elements": summary.get("elements"),
           "dead_lettered": summary["dead_lettered"],
           "cpu_s": dict(cpu, publisher=pubres.get("cpu_s"), wall=round(wall, 1)),
           "cpu_us_per_record": {k: round(v / max(n, 1) * 1e6, 2) for k, v in dict(cpu, publisher=pubres.get(
               "cpu_s") or 0.0).items()},
           "sustained_records_per_s": round(sustained, 1),
           "sustained_messages_per_s": round(sustained / per_message, 1),
           "latency_s_p50": round(pct(lat, 50), 3) if lat else None,
           "latency_s_p99": round(pct(lat, 99), 3) if lat else None,
           "latency_s_max": round(max(lat), 3) if lat else None, "stream_wall_s": round(wall, 1),
           "rss_mib": {"max": max(v for _, v in rss), "first": rss[0][1], "last": rss[-1][1], "every_5s": rss[::5]},
           "redis_used_memory_mib": round(info["used_memory"] / 2 ** 20, 1), "stream_length_after": left,
           "trimmed": summary.get("broker", {}).get("trimmed"),
           "rss_mib_end": round(rss_end, 1), "rss_mib_after_malloc_trim": trimmed_rss}
    res["keeps_up"] = bool(n == pubres.get("records") and lat and pct(lat, 99) <= args.max_latency
                           and sustained >= 0.9 * rate)
    srv.client().delete(f"bench-{tag}")
    shutil.rmtree(out, ignore_errors=True)
    return res


def _malloc_trim_rss() -> float | None:
    """RSS (MiB) after glibc's ``malloc_trim(0)`` returned the free heap pages to the system (None elsewhere):
    what of the growth is freed memory the allocator kept, not live objects."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return round(rss_mib(), 1)


KILL_DRIVER = """
import json, sys
from vaestream.beam import streaming as bs
out, model, url, window, lat, idle = sys.argv[1:7]
print(json.dumps(bs.run_stream(out, model_dir=model, config=bs.StreamConfig(window=float(window),
                                                                              max_latency=float(lat)),
                               source=url, idle_timeout=float(idle))))
"""


def bench_broker_kill(model: Path, records_path: str, srv, work: Path, rate: float, args) -> dict:
    """kill -9 of the job (a process of its own) mid-stream at ``rate``, then a restart: records out = in?"""
    import signal
    import subprocess

    from vaestream import beam as vb

    url = srv.url("bench-kill")
    out = work / "broker_kill"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", KILL_DRIVER, str(out), str(model), url, str(args.window), str(args.max_latency)]
    from vaestream.broker import BrokerReader

    BrokerReader(url, "stream-encode").setup().close()
    job = subprocess.Popen(cmd + ["600"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(15)                                       # the job's start-up (TF, Beam, the model)
    pub = _publisher(url, rate, args.kill_duration, 100, records_path)
    time.sleep(args.kill_duration / 2)
    panes_before = len(_panes(out))
    job.send_signal(signal.SIGKILL)
    job.wait()
    killed_at = time.time()
    restart = subprocess.run(cmd + ["5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pubres = json.loads(pub.communicate()[0] or "{}")
    if restart.returncode != 0:
        return {"error": restart.stderr[-2000:]}
    summary = json.loads(restart.stdout.strip().splitlines()[-1])
    keys = [k for p in _panes(out) for b in vb.read_codes(str(out / "codes" / p["files"][0])) for k in b.keys]
    res = {"offered_records_per_s": rate, "duration_s": args.kill_duration, "records_published": pubres.get("records"),
           "panes_committed_before_kill": panes_before, "killed_at": killed_at,
           "restart_recovered": summary.get("recovered"), "restart_broker_counts": summary.get("broker"),
           "records_coded": len(keys), "distinct_keys": len(set(keys)), "dead_lettered": summary.get("dead_lettered"),
           "late_dead_lettered": summary.get("late_dead_lettered"),
           "exactly_once": len(keys) == len(set(keys)) == pubres.get("records")}
    srv.client().delete("bench-kill")
    shutil.rmtree(out, ignore_errors=True)
    return res


def bench_broker(model: Path, mnist: np.ndarray, work: Path, args) -> dict:
    from pipelines import encode as batch_encode

    from vaestream.beam.scoring import ScoringModelHandler
    from vaestream.broker.server import RedisServer

    records_path = str(work / "mnist_train.npy")
    np.save(records_path, mnist)
    ScoringModelHandler(str(model)).load_model()      # a warm worker: the model in this process's cache
    out: dict = {"source": f"redis-server {_redis_version()}, appendonly yes, appendfsync {args.fsync}, "
                       f"auto-aof-rewrite-min-size 1gb", "rates": []}
    with RedisServer(work / "redis", fsync=args.fsync) as srv:
        for rate in args.rates:
            out["rates"].append(bench_broker_rate(model, records_path, srv, work, rate, 100, args))
            print("# " + json.dumps(out["rates"][-1]), file=sys.stderr, flush=True)   # progress, as it goes
        if args.message_rate:
            out["one_record_per_message"] = bench_broker_rate(model, records_path, srv, work, args.message_rate, 1,
                                                              args)
            print("# " + json.dumps(out["one_record_per_message"]), file=sys.stderr, flush=True)
        kept = [r for r in out["rates"] if r["keeps_up"]]
        out["highest_rate_kept_up"] = max((r["offered_records_per_s"] for r in kept), default=None)
        if args.kill_rate:
            out["kill9"] = bench_broker_kill(model, records_path, srv, work, args.kill_rate, args)
            print("# " + json.dumps(out["kill9"]), file=sys.stderr, flush=True)
    # the batch job on the same records (MNIST training records, cycled as the publisher does)
    n = int(min(max(args.rates) * args.duration, args.batch_records))
    batch_in = work / "batch_in.npy"
    np.save(batch_in, np.concatenate([mnist] * int(np.ceil(n / len(mnist))))[:n])
    t0, cpu0 = time.perf_counter(), proc_cpu_s(os.getpid())
    bsum = batch_encode.run(["--input", str(batch_in), "--model", str(model), "--output", str(work / "batch_out")])
    out["peer_batch_job"] = {"records": bsum["records"], "wall_s": round(time.perf_counter() - t0, 2),
                             "records_per_s_job": bsum["records_per_second"],
                             "cpu_us_per_record": round((proc_cpu_s(os.getpid()) - cpu0) / bsum["records"] * 1e6, 2)}
    for r in out["rates"]:
        r["ratio_stream_to_batch"] = round(r["sustained_records_per_s"] / max(bsum["records_per_second"], 1e-9), 3)
    return out


def _redis_version() -> str:
    import subprocess

    from vaestream.broker.server import server_path

    return subprocess.run([server_path(), "--version"], capture_output=True, text=True).stdout.split()[2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "stream", "online"], default="all",
                    help="stream: the streaming encoder only; online: online learning and memory only")
    ap.add_argument("--source", choices=["files", "redis"], default="files",
                    help="stream: the watched folder (files) or a local redis-server stream (redis)")
    ap.add_argument("--message-rate", type=float, default=0,
                    help="--source redis: also offer this many records/s at one record per message (0: skip)")
    ap.add_argument("--kill-rate", type=float, default=0,
                    help="--source redis: kill -9 the job mid-stream at this rate and restart it (0: skip)")
    ap.add_argument("--kill-duration", type=float, default=30.0, help="--source redis: seconds of the kill run")
    ap.add_argument("--fsync", choices=["always", "everysec"], default="everysec",
                    help="--source redis: the server's appendfsync (always: a few thousand appends/s on this disk)")
    ap.add_argument("--batch-messages", type=int, default=400, help="--source redis: messages per read (round)")
    ap.add_argument("--batch-records", type=int, default=600000,
                    help="--source redis: records of the batch peer (the most records of a rate, at most this)")
    ap.add_argument("--files", type=int, default=40, help="online stream: files (half Fashion-MNIST, half MNIST)")
    ap.add_argument("--records", type=int, default=500, help="records per file (stream: at least)")
    ap.add_argument("--buffer", type=int, default=2000, help="replay buffer (the stream is files*records)")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--rates", type=float, nargs="+", default=[2000, 10000, 40000], help="stream: offered records/s")
    ap.add_argument("--duration", type=float, default=60.0, help="stream: seconds of production per rate")
    ap.add_argument("--drain", type=float, default=30.0, help="stream: seconds allowed after production ends")
    ap.add_argument("--max-files-per-s", type=float, default=20.0, help="stream: files get bigger above this")
    ap.add_argument("--max-latency", type=float, default=3.0, help="stream: the job's --max-latency")
    ap.add_argument("--window", type=float, default=10.0, help="stream: window (capped at max-latency/2)")
    ap.add_argument("--poll", type=float, default=1.0, help="stream: poll interval (capped at max-latency/10)")
    ap.add_argument("--ts-rounds", type=int, default=40, help="stream: TestStream rounds of 10 x 1000 records")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--keep", default=None, help="keep the work directory here")
    args = ap.parse_args(argv)

    from vaestream.data import load_records

    fashion = load_records("fashion-mnist", "train")
    mnist = load_records(str(MNIST), "train")
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_streaming-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = pretrain(fashion, work / "pretrained", args.pretrain_steps)
    pre_s = time.perf_counter() - t0
    res = {"benchmark": "streaming", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": "2-core AVX-512, 24 GiB, shared", "python": platform.python_version(),
           "load_average_start": os.getloadavg()[0],
           "model": "784-200-10 Bernoulli, pretrained on Fashion-MNIST", "pretrain_seconds": round(pre_s, 1),
           "argv": sys.argv[1:] if argv is None else argv}
    if args.part in ("all", "stream") and args.source == "redis":
        res["broker"] = bench_broker(model, mnist, work, args)
    elif args.part in ("all", "stream"):
        from vaestream.beam.scoring import ScoringModelHandler

        ScoringModelHandler(str(model)).load_model()  # a warm worker: the model in this process's cache
        res["stream"] = [bench_stream_rate(model, mnist, work, rate, args) for rate in args.rates]
        res["teststream"] = bench_teststream(model, mnist, work, args)
        kept = [r for r in res["stream"] if r["keeps_up"]]
        res["highest_rate_kept_up"] = max((r["offered_records_per_s"] for r in kept), default=None)
    if args.part in ("all", "online"):
        res.update(bench_online(model, fashion, mnist, work, args))
    res["load_average_end"] = os.getloadavg()[0]
    res["seconds_total"] = round(time.perf_counter() - t0, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--publisher":   # the publisher process of --source redis
        u, r, d, m, path = sys.argv[2:7]
        print(json.dumps(run_publisher(u, float(r), float(d), int(m), path)))
    else:
        main()

"""Profile of the streaming encoder on Beam's in-process streaming runner: what each round costs.

A ``TestStream`` of ``--rounds`` rounds, each adding ``--files`` files of ``--records`` MNIST test records at
event time ``t0 + round * --step`` and advancing the watermark to it, runs through
:class:`vaestream.beam.streaming.StreamEncode`. Counted (by wrapping the runner's own classes, in-process):
bundles executed per transform, timer firings per transform, user-state reads, and the wall time; then the
counts per window. Prints one JSON object.

    python benchmarks/profile_streaming.py [--rounds 20] [--files 4] [--records 500] [--window 2] [--step 0.5]

``--redis-rate R``: instead, the broker job (``run_stream(source=redis://...)`` through the bridge) while a
publisher process (``bench_streaming.py``'s) offers R records/s for ``--seconds``, 100 a message, to a local
redis-server; every thread is sampled every 5 ms (``sys._current_frames``; threads waiting in a lock, a sleep
or a socket read are idle) and the busiest functions are printed, with the latency, the objects by type that
grew from 8 s to the end (a leak shows there) and the RSS before and after ``malloc_trim``.

    python benchmarks/profile_streaming.py --redis-rate 70000 [--seconds 20] [--window 2] [--max-latency 3]

``--step-costs``: instead, the CPU time (this process's, TensorFlow's threads included) per record of each step
of the broker job's per-record work, one step at a time on 44,000 MNIST records in 440 messages of 100, best of
3: the redis client's read, decode + keys, the model call (encoder alone, with the ELBO sample of 1 in 8 and 32),
``run_inference`` at ``score_every`` 8, 0 and 32 (the default), the pane's Examples and TFRecord in each code
layout (record, block), the container; and the batch encode job's whole CPU per record (the same records x 5).

    python benchmarks/profile_streaming.py --step-costs [--model DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def _count(counter: collections.Counter, cls, name: str, key):
    orig = getattr(cls, name)

    def wrapped(self, *a, **k):
        counter[key(self, *a)] += 1
        return orig(self, *a, **k)

    setattr(cls, name, wrapped)


def install_counters() -> dict:
    """Wrap the in-process streaming runner's executor, timer and state classes with counters."""
    from apache_beam.runners.direct import direct_userstate, executor, transform_evaluator

    c = {"bundles": collections.Counter(), "timer_firings": collections.Counter(),
         "state_reads": collections.Counter(), "seconds": collections.Counter()}
    _count(c["bundles"], executor.TransformExecutor, "call", lambda s, *a: s._applied_ptransform.full_label)
    orig = executor.TransformExecutor.call

    def timed(self, *a, **k):  # wall seconds inside each transform's bundles (threads overlap)
        t = time.perf_counter()
        try:
            return orig(self, *a, **k)
        finally:
            c["seconds"][self._applied_ptransform.full_label] += time.perf_counter() - t

    executor.TransformExecutor.call = timed
    _count(c["timer_firings"], transform_evaluator._TransformEvaluator, "process_timer_wrapper",
           lambda s, *a: s._applied_ptransform.full_label)
    for cls in (direct_userstate.ReadModifyWriteRuntimeState, direct_userstate.BagRuntimeState,
                direct_userstate.CombiningValueRuntimeState):
        _count(c["state_reads"], cls, "read", lambda s, *a: type(s).__name__)
    from vaestream.beam.scoring import ScoringModelHandler

    c["model"] = collections.Counter()
    for name in ("_load", "run_inference"):  # model loads (past the per-process cache) and model calls, timed
        orig_m = getattr(ScoringModelHandler, name)

        def timed_m(self, *a, _orig=orig_m, _name=name, **k):
            t = time.perf_counter()
            try:
                return _orig(self, *a, **k)
            finally:
                c["model"][_name + "_calls"] += 1
                c["model"][_name + "_seconds"] += time.perf_counter() - t

        setattr(ScoringModelHandler, name, timed_m)
    return c


IDLE = {"wait", "_serve", "channel_spin", "sleep", "select", "_wait_once", "poll", "wait_for", "_read_from_socket",
        "supervise", "sample"}


def profile_redis(args) -> dict:
    """The broker job sampled at ``args.redis_rate`` records/s (see the module docstring)."""
    import gc
    import threading

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_streaming as bsm

    from vaestream.beam import streaming as bs
    from vaestream.beam.scoring import ScoringModelHandler
    from vaestream.broker import BrokerReader
    from vaestream.broker.server import RedisServer
    from vaestream.broker.wire import id_time
    from vaestream.data import load_records

    work = Path(tempfile.mkdtemp(prefix="profile_broker-"))
    model = Path(args.model) if args.model else bsm.pretrain(load_records("fashion-mnist", "train"), work / "model",
                                                             100)
    records = str(work / "x.npy")
    np.save(records, load_records(str(MNIST), "train"))
    ScoringModelHandler(str(model)).load_model()
    leaf: collections.Counter = collections.Counter()
    ticks, done = [0], threading.Event()

    def sample():
        me = threading.get_ident()
        while not done.is_set():
            time.sleep(0.005)
            ticks[0] += 1
            for tid, f in sys._current_frames().items():
                if tid != me and f.f_code.co_name not in IDLE:
                    leaf[(f.f_code.co_filename.split("site-packages/")[-1].replace(str(ROOT) + "/", ""),
                          f.f_code.co_name)] += 1

    def types() -> collections.Counter:
        return collections.Counter(type(o).__name__ for o in gc.get_objects())

    with RedisServer(work / "redis", fsync="everysec") as srv:
        url = srv.url("profile")
        BrokerReader(url, "stream-encode").setup().close()
        pub = bsm._publisher(url, args.redis_rate, args.seconds, 100, records)
        stop, snaps = threading.Event(), []

        def supervise():
            t0, end = time.monotonic(), None
            while True:
                time.sleep(1.0)
                if len(snaps) == 0 and time.monotonic() - t0 >= 8:
                    snaps.append(types())
                if pub.poll() is not None:
                    end = end or time.monotonic()
                    r = BrokerReader(url, "stream-encode")
                    b = r.backlog()
                    r.close()
                    if (b["pending"] == 0 and not b["lag"]) or time.monotonic() - end > 20:
                        break
            snaps.append(types())
            stop.set()

        threading.Thread(target=supervise, daemon=True).start()
        threading.Thread(target=sample, daemon=True).start()
        cfg = bs.StreamConfig(window=args.window, max_latency=args.max_latency)
        summary = bs.run_stream(str(work / "out"), model_dir=str(model), config=cfg, source=url, stop=stop,
                                batch_messages=400)
        done.set()
        pub.communicate()
        panes = bs.read_windows(str(work / "out"))
    lat = sorted(p["written_at"] - id_time(m) for p in panes for m in p.get("messages", []))
    import ctypes

    rss = bsm.rss_mib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    grew = (snaps[-1] - snaps[0]) if len(snaps) == 2 else collections.Counter()
    res = {"offered_records_per_s": args.redis_rate, "records": summary["records"], "reads": summary["reads"],
           "elements": summary.get("elements"), "latency_s_p50": round(pct(lat, 50), 3) if lat else None,
           "latency_s_p99": round(pct(lat, 99), 3) if lat else None,
           "busy_fraction_of_wall_by_function": {f"{k[0]}:{k[1]}": round(v / max(ticks[0], 1), 3)
                                                 for k, v in leaf.most_common(30)},
           "objects_grown_8s_to_end": dict(grew.most_common(15)),
           "rss_mib_end": round(rss, 1), "rss_mib_after_malloc_trim": round(bsm.rss_mib(), 1)}
    print(json.dumps(res, indent=1))
    return res


def step_costs(args) -> dict:
    """CPU microseconds per record of each step of the broker job's per-record work (module docstring)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_streaming as bsm

    from vaestream import beam as vb
    from vaestream.beam import panes
    from vaestream.beam.scoring import ScoringModelHandler
    from vaestream.broker import BrokerReader, wire
    from vaestream.broker.server import RedisServer
    from vaestream.data import COUNT_SCALE, load_records

    work = Path(tempfile.mkdtemp(prefix="profile_costs-"))
    model = args.model or str(bsm.pretrain(load_records("fashion-mnist", "train"), work / "model", 100))
    n_msg, per = 440, 100
    x = load_records(str(MNIST), "train")[:n_msg * per]
    h = ScoringModelHandler(str(model), score_every=32)
    m = h.load_model()
    res: dict = {}

    def timed(name, f, reps=3):
        best, out = float("inf"), None
        for _ in range(reps):
            c = time.process_time()
            out = f()
            best = min(best, time.process_time() - c)
        res[name] = round(best / (n_msg * per) * 1e6, 3)
        return out

    with RedisServer(work / "redis", fsync="everysec") as srv:
        reader, client = BrokerReader(srv.url("costs"), "g").setup(), srv.client()
        reads = []
        for _ in range(3):
            pipe = client.pipeline()
            for j in range(n_msg):
                pipe.xadd("costs", wire.encode(x[j * per:(j + 1) * per]))
            pipe.execute()
            c, msgs = time.process_time(), []
            while len(msgs) < n_msg:
                msgs += reader.read(count=400)
            reads.append(time.process_time() - c)
            reader.ack([msg.id for msg in msgs])
        res["read_redis_client"] = round(min(reads) / (n_msg * per) * 1e6, 3)
        reader.close()

    def decode_all():
        out = []
        for msg in msgs:
            r = wire.decode(msg)
            out.append(vb.RecordBatch(msg.ref, vb.KeyRange(msg.id, 0, len(r)), r.reshape((len(r), 28, 28, 1)),
                                      COUNT_SCALE))
        return out

    batches = timed("decode_keys", decode_all)
    xx = np.concatenate([b.records.reshape(-1, 784) for b in batches[:40]])
    rows = np.arange(0, len(xx), 8, dtype=np.int32)
    timed("model_encoder", lambda: [m.score_fn(xx, rows[:0], COUNT_SCALE) for _ in range(n_msg // 40)])
    timed("model_encoder_elbo_1_in_8", lambda: [m.score_fn(xx, rows, COUNT_SCALE) for _ in range(n_msg // 40)])
    timed("model_encoder_elbo_1_in_32", lambda: [m.score_fn(xx, rows[::4], COUNT_SCALE)
                                                 for _ in range(n_msg // 40)])
    for every in (8, 0):
        h.score_every = every
        timed(f"run_inference_all_score_every_{every}", lambda: [s for a in range(0, n_msg, 40)
                                                                 for s in h.run_inference(batches[a:a + 40], m)])
    h.score_every = 32
    scored = timed("run_inference_all", lambda: [s for a in range(0, n_msg, 40)
                                                 for s in h.run_inference(batches[a:a + 40], m)])
    for layout in ("record", "block"):
        examples = timed(f"pane_examples_{layout}", lambda: panes.pane_examples(scored, layout))
        timed(f"pane_tfrecord_{layout}", lambda: panes.write_tfrecord_atomic(str(work / "c.tfrecord"), examples))
    timed("pane_container", lambda: m.codec.compress_codes(np.concatenate([s.symbols for s in scored])))
    from pipelines import encode as batch_encode

    np.save(work / "batch.npy", np.concatenate([x] * 5))   # 220,000 records: the job's start-up amortised
    c = time.process_time()
    bsum = batch_encode.run(["--input", str(work / "batch.npy"), "--model", str(model), "--output",
                             str(work / "batch_out")])
    res["batch_job_whole"] = round((time.process_time() - c) / bsum["records"] * 1e6, 3)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"cpu_us_per_record": res}, indent=1))
    return res


def pct(values, q):
    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--files", type=int, default=4, help="files per round")
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--window", type=float, default=2.0)
    ap.add_argument("--step", type=float, default=0.5, help="event-time seconds between rounds")
    ap.add_argument("--max-latency", type=float, default=None)
    ap.add_argument("--model", default=None, help="a model directory (default: train a small one)")
    ap.add_argument("--cprofile", default=None, help="write cProfile stats here")
    ap.add_argument("--redis-rate", type=float, default=None,
                    help="profile the broker job at this many records/s instead (see the module docstring)")
    ap.add_argument("--seconds", type=float, default=20.0, help="--redis-rate: seconds of publishing")
    ap.add_argument("--step-costs", action="store_true", help="CPU per record of each step (module docstring)")
    args = ap.parse_args(argv)
    if args.step_costs:
        return step_costs(args)
    if args.redis_rate:
        if args.max_latency is None:
            args.max_latency = 3.0
        return profile_redis(args)

    import apache_beam as beam
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    from vaestream import beam as vb
    from vaestream.beam import streaming as bs
    from vaestream.data import load_records

    x = load_records(str(MNIST), "test")
    work = Path(tempfile.mkdtemp(prefix="profile_streaming-"))
    model = args.model
    if model is None:
        from vaestream.config import ModelConfig
        from vaestream.data import make_dataset
        from vaestream.training import TrainConfig, train

        model = str(work / "model")
        train(make_dataset(x, "bernoulli", "t"), model, ModelConfig(latent_dim=10, hidden=(200,)),
              TrainConfig(steps=100, seed=1), progress=False)
    src = work / "in"
    src.mkdir()
    t0 = 1_000_000.0
    stream = TestStream(coder=beam.coders.StrUtf8Coder())
    k = 0
    for r in range(args.rounds):
        t = t0 + r * args.step
        paths = []
        for _ in range(args.files):
            p = src / f"f{k:05d}.npy"
            np.save(p, x[(k * args.records) % 9000:(k * args.records) % 9000 + args.records])
            paths.append(TimestampedValue(str(p), t))
            k += 1
        stream = stream.add_elements(paths).advance_watermark_to(t)
    stream = stream.advance_watermark_to_infinity()
    counters = install_counters()
    cfg = bs.StreamConfig(window=args.window, max_latency=args.max_latency)
    p = bs.streaming_pipeline()
    p | stream | bs.StreamEncode(str(work / "out"), model_dir=model, config=cfg)
    prof = None
    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t_start = time.perf_counter()
    vb.run_pipeline(p)
    seconds = time.perf_counter() - t_start
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.cprofile)
    wins = bs.read_windows(str(work / "out"))
    n_win = len({w["window_start_s"] for w in wins})
    records = sum(w["records"] for w in wins)
    secs = counters.pop("seconds")
    model_calls = {k: round(v, 3) for k, v in counters.pop("model").items()}
    tot = {name: sum(c.values()) for name, c in counters.items()}
    res = {"rounds": args.rounds, "files_per_round": args.files, "records_per_file": args.records,
           "window_s": cfg.window, "records": records, "expected_records": args.rounds * args.files * args.records,
           "windows": n_win, "panes": len(wins), "seconds": round(seconds, 2),
           "records_per_s": round(records / seconds, 1), "totals": tot,
           "per_window": {name: round(v / max(n_win, 1), 1) for name, v in tot.items()},
           "per_round": {name: round(v / args.rounds, 1) for name, v in tot.items()},
           "bundles_by_transform": dict(counters["bundles"].most_common()),
           "timer_firings_by_transform": dict(counters["timer_firings"]),
           "state_reads_by_kind": dict(counters["state_reads"]),
           "bundle_seconds_by_transform": {k: round(v, 3) for k, v in secs.most_common()},
           "model": model_calls}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

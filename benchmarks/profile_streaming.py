"""Profile of the streaming encoder on Beam's in-process streaming runner: what each round costs.

A ``TestStream`` of ``--rounds`` rounds, each adding ``--files`` files of ``--records`` MNIST test records at
event time ``t0 + round * --step`` and advancing the watermark to it, runs through
:class:`vaestream.beam.streaming.StreamEncode`. Counted (by wrapping the runner's own classes, in-process):
bundles executed per transform, timer firings per transform, user-state reads, and the wall time; then the
counts per window. Prints one JSON object.

    python benchmarks/profile_streaming.py [--rounds 20] [--files 4] [--records 500] [--window 2] [--step 0.5]
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
    args = ap.parse_args(argv)

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

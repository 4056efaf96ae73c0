"""Online AEVB at training speed: ``OnlineLearner`` examples/s beside batch ``training.train`` on the same model
and data, in the same run, and the bits/record after a distribution switch.

The stream (as the online section of RESULTS_streaming.md): 40 files of 500 records, 20 of Fashion-MNIST then 20
of MNIST (training sets), a 784-200-10 Bernoulli VAE pretrained for 600 steps on Fashion-MNIST, M = 100 (50 new
+ 50 replayed), replay buffer 2000, 5 % held out (500 kept), a checkpoint every 10 files, versions published to
a registry when the held-out bound improves.

* ``online``: the learner over the 40 files (``process_file`` for the first, ``process_files`` for the rest
  where the learner has it, else ``process_file`` each; then the final checkpoint and the wait for its
  publication): wall seconds, training examples/s (steps x M) and new records/s, and where the time went
  (prequential scoring, training, checkpoints, the wait for background publishing) from the learner's log.
  ``online_inline`` is the same stream with ``background_publish=False`` (evaluation and export inside the
  checkpoint, as before).
* ``batch``: ``training.train`` from the same pretrained checkpoint on the same 20,000 records, M = 100, as
  many steps as the online run took (end to end, one XLA compile, like the online run), and again for
  ``max(3x, that + --batch-extra-steps)`` steps (``batch_long``): the difference of the two runs is the steady
  rate without compilation (at least ``--batch-extra-steps`` x M examples, so that it is not the difference of
  two sub-second runs on a shared machine). The same pair also runs before the online run
  (``batch_before_online``, unless ``--no-batch-before``); ``batch.steady_examples_per_s`` is the mean of the
  two steady rates (other jobs on the machine come and go between them).
* the ratios online / batch, end to end and steady (online steady: files 1-39, from the end of file 0, so
  without the first compile, with checkpoints and publications).
* bits/record (prequential -ELBO / ln 2 of each file before it is trained on) online and for the frozen
  pretrained model, last 3 files after the switch (the frozen model is scored after the timed run).

* ``publication_seconds``: the medians of the publisher's evaluation, coder tables and export per version
  (wall seconds on the publisher's thread, while learning goes on beside it).

    python benchmarks/bench_online.py [--files 40] [--records 500] [--buffer 2000] [--mnist ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def pretrain(fashion: np.ndarray, out: Path, steps: int) -> Path:
    from vaestream.coding import codec
    from vaestream.config import ModelConfig
    from vaestream.data import make_dataset
    from vaestream.training import TrainConfig, train

    ds = make_dataset(fashion, "bernoulli", "fashion-train")
    train(ds, out, ModelConfig(latent_dim=10, hidden=(200,)), TrainConfig(steps=steps, seed=1), progress=False)
    codec.write_tables(out, fashion[:2000])
    return out


def run_online(model: Path, paths: list[Path], work: Path, args, background: bool) -> dict:
    from vaestream.online import OnlineConfig, OnlineLearner
    from vaestream.training import TrainConfig

    # (publish_interval is passed only to code that has it, so that this harness also measures earlier code)
    interval = {"publish_interval": args.publish_interval} \
        if "publish_interval" in OnlineConfig.__dataclass_fields__ else {}
    learner = OnlineLearner(work / "work", registry=work / "registry", initial_model=model,
                            train_config=TrainConfig(seed=1),
                            online_config=OnlineConfig(batch_size=args.batch, buffer_size=args.buffer,
                                                       holdout_fraction=0.05, holdout_size=500,
                                                       checkpoint_every_files=args.checkpoint_every,
                                                       background_publish=background, seed=1,
                                                       publish_share=args.publish_share, **interval))
    rows = []
    t0, t0_wall = time.perf_counter(), time.time()
    warm = learner.warm_up(np.load(paths[0])[:args.buffer]) if args.warm else 0.0
    rows.append(learner.process_file(paths[0]))
    t_first = time.perf_counter()
    if hasattr(learner, "process_files") and not args.one_by_one:
        # the files after the first as ``follow`` takes the files it finds
        rows += learner.process_files(paths[1:])
    else:
        rows += [learner.process_file(p) for p in paths[1:]]
    if learner.pending:
        learner.checkpoint()
    t_wait = time.perf_counter()
    learner.close()
    t1 = time.perf_counter()
    log = [json.loads(s) for s in (work / "work" / "log.jsonl").read_text().splitlines()]
    steps = sum(r["steps"] for r in rows)
    m = args.batch
    seconds = t1 - t0
    ckpt = sum(e["seconds"] for e in log if e["event"] == "checkpoint")
    prep = sum(r["seconds_prepare"] for r in rows)
    trainsec = sum(r["seconds_score_train"] for r in rows)
    records = sum(r["records"] for r in rows)
    return {
        "background_publish": background, "files": len(rows), "records": records, "steps": steps,
        "examples": steps * m, "seconds": round(seconds, 3),
        "examples_per_s": round(steps * m / seconds, 1), "new_records_per_s": round(records / seconds, 1),
        "learning": {"note": "files 1-39 until the last is learned and checkpointed, without the wait for "
                             "the last publication (what a long-running stream sees)",
                     "seconds": round(t_wait - t_first, 3),
                     "examples_per_s": round((steps - rows[0]["steps"]) * m / (t_wait - t_first), 1),
                     "new_records_per_s": round((records - rows[0]["records"]) / (t_wait - t_first), 1)},
        "steady": {"files": len(rows) - 1, "seconds": round(t1 - t_first, 3),
                   "examples_per_s": round((steps - rows[0]["steps"]) * m / (t1 - t_first), 1),
                   "new_records_per_s": round((records - rows[0]["records"]) / (t1 - t_first), 1)},
        "process_files": hasattr(learner, "process_files") and not args.one_by_one,
        "publish_share": args.publish_share, "publish_interval": interval.get("publish_interval"),
        "breakdown_s": {"first_file (compiles the training chunk and the scoring; with --warm the publisher's "
                        "tracing)": round(t_first - t0, 3), "of which publisher warm-up": round(warm, 3),
                        "reading_validation_holdout": round(prep, 3),
                        "compiled_scoring_and_training": round(trainsec, 3),
                        "checkpoints (model, optimizer, buffer, ledger)": round(ckpt, 3),
                        "wait_for_last_publication": round(t1 - t_wait, 3),
                        "other (buffer, drift, logs)": round(
                            seconds - warm - prep - trainsec - ckpt - (t1 - t_wait), 3)},
        "versions_published": learner.registry.versions(),
        "publication_seconds": _publication_seconds(log),
        "wait_started_at_s": round(t_wait - t0, 3),
        "publisher_events": [{k: e[k] for k in ("event", "step", "seconds", "seconds_tables", "seconds_export",
                                                "version") if k in e} | {"ended_at_s": round(e["time"] - t0_wall, 3)}
                             for e in log if e["event"] in ("evaluate", "publish")],
        "bits": [r["bits_per_record"] for r in rows]}


def _publication_seconds(log: list[dict]) -> dict:
    """Medians over the publisher's events: evaluation (every checkpoint judged), coder tables and export (every
    version published), and their sum per version."""
    ev = [e["seconds"] for e in log if e["event"] == "evaluate"]
    pub = [e for e in log if e["event"] == "publish"]
    med = lambda v: round(statistics.median(v), 4) if v else None  # noqa: E731
    return {"evaluations": len(ev), "versions": len(pub), "evaluate": med(ev),
            "tables": med([e["seconds_tables"] for e in pub]), "export": med([e["seconds_export"] for e in pub]),
            "tables_plus_export": med([e["seconds_tables"] + e["seconds_export"] for e in pub]),
            "first_version_tables_plus_export": round(pub[0]["seconds_tables"] + pub[0]["seconds_export"], 4)
            if pub else None}


def run_batch(model: Path, records: np.ndarray, out: Path, steps: int, args) -> dict:
    from vaestream.data import make_dataset
    from vaestream.training import TrainConfig, train

    shutil.copytree(model, out)
    ds = make_dataset(records, "bernoulli", "stream")
    res = train(ds, out, train_config=TrainConfig(steps=args.pretrain_steps + steps, seed=1, batch_size=args.batch),
                progress=False)
    n = (res.steps - args.pretrain_steps) * args.batch
    # fit's own clock: from its first chunk (the XLA compile included) to its last checkpoint; without the
    # model building before and the final train-set evaluation after
    return {"steps": res.steps - args.pretrain_steps, "examples": n, "seconds": round(n / res.examples_per_second, 3),
            "examples_per_s": round(res.examples_per_second, 1)}


def run_batch_pair(model: Path, records: np.ndarray, out: Path, steps: int, args) -> tuple[dict, dict]:
    """Batch training for ``steps`` and for ``max(3 steps, steps + --batch-extra-steps)``; the first dict gets
    ``steady_examples_per_s``: the difference of the two runs (the compile-free rate)."""
    short = run_batch(model, records, out / "short", steps, args)
    long = run_batch(model, records, out / "long", max(3 * steps, steps + args.batch_extra_steps), args)
    short["steady_examples_per_s"] = round((long["examples"] - short["examples"]) /
                                           max(long["seconds"] - short["seconds"], 1e-9), 1)
    return short, long


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=40, help="files (half Fashion-MNIST, half MNIST)")
    ap.add_argument("--records", type=int, default=500, help="records per file")
    ap.add_argument("--buffer", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--mnist", default=str(MNIST), help="the MNIST IDX folder")
    ap.add_argument("--no-inline", action="store_true", help="skip the background_publish=False run")
    ap.add_argument("--warm", action="store_true",
                    help="trace the publisher's tables and export before the stream (OnlineLearner.warm_up), "
                         "timed with the first file's compile")
    ap.add_argument("--batch-extra-steps", type=int, default=2000,
                    help="the long batch run takes at least this many steps more than the short one")
    ap.add_argument("--no-batch-before", action="store_true",
                    help="measure the batch peer only after the online run (default: before and after, the "
                         "ratios against the mean of the two steady rates)")
    ap.add_argument("--publish-interval", type=float, default=1.0,
                    help="OnlineConfig.publish_interval: the least seconds between two evaluations of the "
                         "background publisher (0: every checkpoint)")
    ap.add_argument("--one-by-one", action="store_true",
                    help="process_file for each file, also where the learner has process_files")
    ap.add_argument("--publish-share", type=float, default=1.0,
                    help="OnlineConfig.publish_share: the most of the wall time the background publisher is busy")
    args = ap.parse_args(argv)

    from vaestream import store
    from vaestream.data import load_records
    from vaestream.training import dataset_elbo

    fashion = load_records("fashion-mnist", "train")
    mnist = load_records(args.mnist, "train")
    work = Path(tempfile.mkdtemp(prefix="bench_online-"))
    t00 = time.perf_counter()
    model = pretrain(fashion, work / "pretrained", args.pretrain_steps)
    half, r = args.files // 2, args.records
    chunks = [fashion[i * r:(i + 1) * r] if i < half else mnist[(i - half) * r:(i - half + 1) * r]
              for i in range(args.files)]
    (work / "in").mkdir()
    paths = []
    for i, x in enumerate(chunks):
        paths.append(work / "in" / f"part-{i:04d}.npy")
        np.save(paths[-1], x)
    res = {"benchmark": "online", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{os.cpu_count()}-core, shared", "python": platform.python_version(),
           "load_average_start": os.getloadavg(),
           "model": "784-200-10 Bernoulli, pretrained on Fashion-MNIST", "files": args.files, "records_per_file": r}
    stream = np.concatenate(chunks)
    before = None
    if not args.no_batch_before:  # the same pair before the online run (about the steps it will take)
        before = run_batch_pair(model, stream, work / "before", 10 * args.files, args)
    online = run_online(model, paths, work / "online", args, background=True)
    batch, batch3 = run_batch_pair(model, stream, work / "after", online["steps"], args)
    inline = None if args.no_inline else run_online(model, paths, work / "online_inline", args, background=False)
    peers = ([] if before is None else [before[0]["steady_examples_per_s"]]) + [batch["steady_examples_per_s"]]
    batch["steady_examples_per_s_after_online"] = batch["steady_examples_per_s"]
    batch["steady_examples_per_s"] = round(statistics.mean(peers), 1)
    if before is not None:
        res["batch_before_online"] = {"short": before[0], "long": before[1]}
        batch["steady_examples_per_s_before_online"] = before[0]["steady_examples_per_s"]
    frozen = store.load_model(model)
    frozen_bits = [-dataset_elbo(frozen, x.reshape(len(x), -1).astype(np.float32) / 255.0)["elbo"] / np.log(2)
                   for x in chunks]
    bits = online.pop("bits")
    last3_online = statistics.mean(bits[-3:])
    last3_frozen = statistics.mean(frozen_bits[-3:])
    res.update({
        "online": online, "batch": batch, "batch_long": batch3,
        "ratio_online_to_batch_examples_per_s": round(online["examples_per_s"] / batch["examples_per_s"], 3),
        "ratio_online_to_batch_steady": round(online["steady"]["examples_per_s"] / batch["steady_examples_per_s"], 3),
        "ratio_online_learning_to_batch_steady": round(online["learning"]["examples_per_s"] /
                                                       batch["steady_examples_per_s"], 3),
        "ratio_online_to_each_batch_peer (before, after)": [round(online["steady"]["examples_per_s"] / b, 3)
                                                            for b in peers],
        "bits_per_record": {
            "last3_before_switch": {"online": round(statistics.mean(bits[half - 3:half]), 2),
                                    "frozen": round(statistics.mean(frozen_bits[half - 3:half]), 2)},
            "first_after_switch": {"online": round(bits[half], 2), "frozen": round(frozen_bits[half], 2)},
            "last3_after_switch": {"online": round(last3_online, 2), "frozen": round(last3_frozen, 2)},
            "ratio_frozen_to_online_last3": round(last3_frozen / last3_online, 3)},
    })
    if inline is not None:
        bits_inline = inline.pop("bits")
        res["online_inline"] = inline
        res["ratio_inline_to_batch_examples_per_s"] = round(inline["examples_per_s"] / batch["examples_per_s"], 3)
        res["inline_same_bits"] = bool(np.allclose(bits_inline, bits, rtol=0, atol=1e-3))
    res["load_average_end"] = os.getloadavg()
    res["seconds_total"] = round(time.perf_counter() - t00, 1)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

"""Reproduce the paper's Figure 2 (lower bound vs. training samples for several Nz) and Figure 3 setting.

For each data set (MNIST from an MNIST-layout directory, Fashion-MNIST from Debian) and each Nz, train a
784-500-Nz VAE (tanh, Bernoulli decoder, M = 100, L = 1, estimator B, Adagrad with the paper's step size
0.02, the N(0, I) weight prior as weight decay) for a budget of training samples, evaluating the train and
test lower bounds on a log-spaced schedule. Then the Figure 3 setting (Nz = 3, 100 hidden units): the
importance-sampled marginal likelihood on train and test subsets.

Prints one JSON document; writes learning-curve PNGs and the JSON next to --out.

    python benchmarks/paper_reproduction.py --mnist ../shared/data/mnist --samples 3000000 --out benchmarks/paper
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from vaestream import ModelConfig, TrainConfig, train
from vaestream.data import load_records, make_dataset
from vaestream.evaluate import evaluate
from vaestream.plots import learning_curves


def run_one(name, train_x, test_x, nz, hidden, samples, out: Path, optimizer, lr, seed=0):
    model_dir = out / f"{name}-nz{nz}-h{hidden}"
    train_ds = make_dataset(train_x, "bernoulli", f"{name}-train")
    test_ds = make_dataset(test_x, "bernoulli", f"{name}-test")
    steps = samples // 100
    # log-spaced evaluation points, as the paper's log-x Figure 2
    points = sorted({int(round(v)) for v in np.logspace(math.log10(100), math.log10(steps), 12)})
    t0 = time.time()
    res = train(train_ds, model_dir, ModelConfig(latent_dim=nz, hidden=(hidden,)),
                TrainConfig(steps=steps, optimizer=optimizer, learning_rate=lr, map_prior=True, seed=seed,
                            eval_steps=tuple(points), eval_records=10000, checkpoint_every=10**9),
                test_data=test_ds, progress=False)
    done = res.steps
    history = res.history
    return {"data": name, "nz": nz, "hidden": hidden, "steps": done, "samples": done * 100,
            "seconds": round(time.time() - t0, 1), "final_train_elbo": history[-1]["train_elbo"],
            "final_test_elbo": history[-1]["test_elbo"], "curve": history, "model_dir": str(model_dir)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", required=True, help="MNIST-layout directory (e.g. ../shared/data/mnist)")
    ap.add_argument("--fashion", default="fashion-mnist")
    ap.add_argument("--samples", type=int, default=3_000_000, help="training samples per run")
    ap.add_argument("--nz", type=int, nargs="+", default=[3, 5, 10, 20, 200])
    ap.add_argument("--optimizer", default="adagrad")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--k", type=int, default=1000, help="importance samples for the Figure 3 estimate")
    ap.add_argument("--ll-records", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/paper", help="JSON and PNGs")
    ap.add_argument("--work", default="/tmp/vaestream-paper", help="model directories (a run resumes from its "
                                                                  "checkpoint: a larger --samples extends the curves)")
    ap.add_argument("--sets", nargs="+", default=["mnist", "fashion-mnist"], choices=["mnist", "fashion-mnist"],
                    help="data sets to run; results.json keeps the other sets' earlier results")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": "python benchmarks/paper_reproduction.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "samples_per_run": a.samples, "optimizer": a.optimizer, "lr": a.lr, "runs": []}
    sets = {name: spec for name, spec in (("mnist", a.mnist), ("fashion-mnist", a.fashion)) if name in a.sets}
    earlier = out / "results.json"
    if earlier.exists():  # keep the other data sets' results (and say which command made them)
        old = json.loads(earlier.read_text())
        kept = [r for r in old.get("runs", []) if r["data"] not in sets]
        if kept:
            results["runs"] = kept
            results["figure3"] = [f for f in old.get("figure3", []) if f["data"] not in sets]
            results["earlier"] = {"command": old.get("command"), "samples_per_run": old.get("samples_per_run"),
                                  "sets": sorted({r["data"] for r in kept})}
    for name, spec in sets.items():
        tr, te = load_records(spec, "train"), load_records(spec, "test")
        for nz in a.nz:
            r = run_one(name, tr, te, nz, 500, a.samples, Path(a.work), a.optimizer, a.lr)
            results["runs"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
        learning_curves({f"Nz={r['nz']}": r["curve"] for r in results["runs"] if r["data"] == name},
                        out / f"figure2_{name}.png", title=f"{name}: 784-500-Nz, M=100 (AEVB)")
        # Figure 3 setting: Nz = 3, 100 hidden units, marginal likelihood by importance sampling
        r = run_one(name, tr, te, 3, 100, a.samples, Path(a.work), a.optimizer, a.lr)
        from vaestream.store import load_model

        model = load_model(r["model_dir"])
        n = a.ll_records
        ll = {split: evaluate(model, make_dataset(x[:n], "bernoulli", split), k=a.k)
              for split, x in (("train", tr), ("test", te))}
        fig3 = {"data": name, "nz": 3, "hidden": 100, "samples": r["samples"], "k": a.k, "records": n,
                "train_log_px": ll["train"]["log_px"], "test_log_px": ll["test"]["log_px"],
                "train_elbo": ll["train"]["elbo"], "test_elbo": ll["test"]["elbo"]}
        results.setdefault("figure3", []).append(fig3)
        print(json.dumps(fig3), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"} | {
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results["runs"]]}))


if __name__ == "__main__":
    main()

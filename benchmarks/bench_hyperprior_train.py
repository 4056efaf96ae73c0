"""Train one variable-rate learned-entropy-model (mean-scale hyperprior) conv model for the RD measurement, with
an exponential step-size decay and a time budget (what ``vaestream train`` has no flags for).

    PYTHONPATH=. python benchmarks/bench_hyperprior_train.py --data mnist --out /tmp/hp/mnist \
        --channels 16 32 --latent-channels 16 --lmbdas 1e6 2.5e5 6e4 1.5e4 4e3 1e3 --steps 20000 \
        --lr 1e-3 --lr-final 1e-4 --max-minutes 55

The step size falls from ``--lr`` to ``--lr-final`` over ``--steps`` (exponentially); ``--max-minutes`` stops
earlier (with a checkpoint). A rerun resumes. Writes OUT/bench_training.json (steps, minutes, the last logged
noisy-rate proxy per level) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DATASETS = {"mnist": "/work/shared/data/mnist", "fashion-mnist": "/usr/share/datasets/fashion-mnist"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist", choices=list(DATASETS))
    p.add_argument("--out", required=True)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    p.add_argument("--latent-channels", type=int, default=16)
    p.add_argument("--lmbdas", type=float, nargs="+", default=[1e6, 2.5e5, 6e4, 1.5e4, 4e3, 1e3])
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-final", type=float, default=1e-4)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.config import latent_grid
    from vaestream.data import load_records, make_dataset

    records = load_records(DATASETS[a.data], "train")
    ds = make_dataset(records, "gaussian", a.data)
    h, w = latent_grid(records.shape[1:], tuple(a.channels))
    cfg = ModelConfig(latent_dim=h * w * a.latent_channels, hidden=(), activation="relu", likelihood="gaussian",
                      arch="conv", channels=tuple(a.channels), latent_channels=a.latent_channels,
                      entropy_model="hyperprior", rd_lambdas=tuple(sorted(a.lmbdas, reverse=True)))
    tc = TrainConfig(objective="rd", batch_size=a.batch_size, steps=a.steps, learning_rate=a.lr,
                     lr_decay_rate=a.lr_final / a.lr, lr_decay_steps=a.steps, seed=a.seed, eval_every=a.eval_every,
                     eval_records=2000, checkpoint_every=1000,
                     max_seconds=None if a.max_minutes is None else 60 * a.max_minutes)
    out = Path(a.out)
    log = out / "bench_training.json"
    before = json.loads(log.read_text()) if log.is_file() else {"train_seconds": 0.0}
    t0 = time.perf_counter()
    res = train(ds, out, cfg, tc, progress=False, on_eval=lambda r: print(json.dumps(r), flush=True))
    secs = before["train_seconds"] + time.perf_counter() - t0
    info = {"data": a.data, "channels": a.channels, "latent_channels": a.latent_channels, "lmbdas": a.lmbdas,
            "steps": res.steps, "planned_steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
            "lr_final": a.lr_final, "train_seconds": round(secs, 1), "train_minutes": round(secs / 60, 1),
            "last_eval": res.history[-1] if res.history else None}
    out.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps(info, indent=1))
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

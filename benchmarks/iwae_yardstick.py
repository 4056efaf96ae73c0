"""The standard yardstick: the IWAE paper's protocol (Burda, Grosse & Salakhutdinov, 2016).

Dynamically binarised MNIST (60k training images, a fresh Bernoulli sample of every image each minibatch),
a VAE with 2 x 200 tanh hidden units in encoder and decoder and 50 latents, trained with Adam (M = 100,
L = 1), then log p(x) on the 10k test images (one fixed binarisation) estimated by importance sampling with
k = 5000. The IWAE paper reports -86.76 nats for this one-layer VAE after 3,280 epochs.

    python benchmarks/iwae_yardstick.py --mnist ../shared/data/mnist --minutes 30 --out /tmp/iwae
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vaestream import ModelConfig, TrainConfig, train
from vaestream.data import load_records, make_dataset
from vaestream.evaluate import evaluate


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", required=True)
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="total training budget over all runs in --out (the issue allows up to 120); a run in an "
                         "existing --out resumes from its checkpoint and trains for what is left of the budget")
    ap.add_argument("--epochs", type=float, default=10000, help="an upper bound: the time budget ends the run")
    ap.add_argument("--lr-decay-rate", type=float, default=0.05)
    ap.add_argument("--lr-decay-steps", type=int, default=3_000_000,
                    help="Adam's step size is 1e-3 * rate^(step / steps): with the defaults 5e-5 after the ~3M steps "
                         "(5,000 epochs) the 2-hour budget allows on an idle machine")
    ap.add_argument("--k", type=int, default=5000)
    ap.add_argument("--test-records", type=int, default=10000)
    ap.add_argument("--out", default="/tmp/vaestream-iwae")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the model already trained in --out")
    a = ap.parse_args(argv)
    tr = make_dataset(load_records(a.mnist, "train"), "bernoulli", "mnist-train", binarize="none")
    tr.binarize = "dynamic"
    te = make_dataset(load_records(a.mnist, "test")[: a.test_records], "bernoulli", "mnist-test")
    te.binarize = "dynamic"  # evaluated on one fixed Bernoulli sample (seeded), as the protocol
    cfg = ModelConfig(latent_dim=50, hidden=(200, 200), activation="tanh")
    # Adam with a slow exponential decay of the step size (IWAE: 1e-3 decayed to 1e-4 over the run).
    budget_file = Path(a.out) / "budget.json"
    spent = json.loads(budget_file.read_text())["train_seconds"] if budget_file.exists() else 0.0
    t0 = time.time()
    if a.eval_only:
        from vaestream.store import load_model, read_log

        last = read_log(a.out)[-1]
        model, steps, train_s = load_model(a.out), last["step"], spent
    else:
        if a.minutes * 60 - spent <= 0:
            raise SystemExit(f"{a.out}: the {a.minutes}-minute budget is spent ({spent / 60:.1f} min); use --eval-only")
        res = train(tr, a.out, cfg, TrainConfig(epochs=a.epochs, optimizer="adam", learning_rate=1e-3,
                                            lr_decay_rate=a.lr_decay_rate,
                                            lr_decay_steps=a.lr_decay_steps, binarize="dynamic",
                                            max_seconds=a.minutes * 60 - spent, eval_every=30000, eval_records=10000,
                                            checkpoint_every=20000, steps_per_call=100),
                    test_data=te, progress=False)
        model, steps, train_s = res.model, res.steps, spent + time.time() - t0
        Path(a.out).mkdir(parents=True, exist_ok=True)
        budget_file.write_text(json.dumps({"train_seconds": round(train_s, 1)}) + "\n")
    t1 = time.time()
    ev = evaluate(model, te, k=a.k, batch_size=100)
    out = {"benchmark": "iwae_yardstick",
           "command": "python benchmarks/iwae_yardstick.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d"), "model": "784-200-200-50-200-200-784 tanh, Bernoulli",
           "steps": steps, "epochs": round(steps / 600, 1), "train_minutes": round(train_s / 60, 1),
           "test_records": len(te), "k": a.k, "test_log_px": round(ev["log_px"], 2), "test_elbo": round(ev["elbo"], 2),
           "reference_log_px": -86.76, "gap_nats": round(-86.76 - ev["log_px"], 2),
           "eval_minutes": round((time.time() - t1) / 60, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

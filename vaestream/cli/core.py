"""``vaestream train``, ``vaestream evaluate`` and ``vaestream demo``: thin shells over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vaestream.cli.console import show_progress
from vaestream.data import FASHION_MNIST_DIR


def _has_test_split(spec: str) -> bool:
    """Whether ``spec`` is a data set with a test split (Fashion-MNIST or an MNIST-layout directory)."""
    d = Path(spec)
    return spec == "fashion-mnist" or (d.is_dir() and any(d.glob("t10k-images*")))


def load_dataset(spec: str, split: str, likelihood: str, binarize: str, key: str | None = None,
                 scale: float | None = None):
    """Read and validate a data-set spec (see :func:`vaestream.data.resolve`) as a ``Dataset``; ``scale``: model
    input = value x scale (default: :func:`vaestream.data.input_scale`'s rule)."""
    from vaestream import data

    path = data.resolve(spec, split)
    records = data.read_array(path, key=key)
    return data.make_dataset(records, likelihood, str(path), binarize=binarize, scale=scale)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, default=20, help="Nz (default 20)")
    g.add_argument("--hidden", type=int, nargs="+", default=[500], help="hidden widths (default: 500)")
    g.add_argument("--activation", default=None,
                   help="hidden units' activation (a Keras name; default tanh, relu with --entropy-model)")
    g.add_argument("--likelihood", default=None, choices=["bernoulli", "gaussian", "gaussian_sigmoid", "beta_binomial"],
                   help="p(x|z); default bernoulli, or gaussian_sigmoid with --objective rd (MSE needs a Gaussian)")
    g.add_argument("--top-latent-dim", type=int, default=0,
                   help="N2 > 0: a second, top stochastic layer z2 (x -> z -> z2; lossless coding codes it in "
                        "Bit-Swap order); default 0, the paper's one layer")
    g.add_argument("--top-hidden", type=int, nargs="+", default=[256], help="hidden widths between z and z2")
    g.add_argument("--arch", choices=["mlp", "conv"], default="mlp",
                   help="mlp (the paper's) or conv: strided convolutions around the vector latent (vaestream.conv)")
    g.add_argument("--channels", type=int, nargs="+", default=[32, 64],
                   help="with --arch conv: channels of the stride-2 convolutions (default 32 64)")
    g.add_argument("--latent-channels", type=int, default=0, metavar="C",
                   help="with --arch conv: a spatial latent of C maps over the last feature grid (no dense "
                        "layers; --latent-dim and --hidden are then unused: Nz = grid size x C); default 0, a "
                        "vector latent")
    g.add_argument("--objective", choices=["elbo", "rd"], default="elbo",
                   help="elbo (AEVB, default) or rd: rate (bits) + LMBDA x MSE, a Gaussian decoder")
    g.add_argument("--lmbda", type=float, default=None, help="with --objective rd: lambda (stored in config.json)")
    g.add_argument("--entropy-model", choices=["factorized", "hyperprior"], default=None,
                   help="with --objective rd --arch conv --latent-channels C: a learned entropy model trained with the "
                        "transform (vaestream.entropy_models; hyperprior = mean-scale), one model at every --lmbdas")
    g.add_argument("--lmbdas", type=float, nargs="+", default=None, metavar="LAMBDA",
                   help="with --entropy-model: the rate levels' lambdas (one variable-rate model; instead of --lmbda)")


TRAIN_DEFAULTS = {"batch_size": 100, "num_samples": 1, "estimator": "B", "optimizer": "adam", "init": "glorot",
                  "seed": 0, "binarize": "none", "validation": 0, "eval_every": 0, "checkpoint_every": 5000,
                  "steps_per_call": 50}
""":class:`vaestream.training.TrainConfig`'s defaults, written out so that building the parser (``--help``)
does not import TensorFlow (a test checks that they agree)."""


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    g = p.add_argument_group("training (AEVB)")
    g.add_argument("--batch-size", "-M", type=int, default=d["batch_size"],
                   help="M, records per minibatch (default %(default)s)")
    g.add_argument("--samples", "-L", type=int, default=d["num_samples"],
                   help="L, z samples per record (default %(default)s)")
    g.add_argument("--estimator", choices=["A", "B"], default=d["estimator"],
                   help="SGVB estimator: A (Monte Carlo KL) or B (analytic KL; default %(default)s)")
    g.add_argument("--optimizer", choices=["adam", "adagrad"], default=d["optimizer"],
                   help="default %(default)s")
    g.add_argument("--lr", type=float, default=None, help="step size (adam 1e-3, adagrad 0.02)")
    g.add_argument("--map-prior", action="store_true", help="weight decay from the N(0, I) prior on the weights")
    g.add_argument("--init", choices=["glorot", "paper"], default=d["init"],
                   help="weight initialisation: glorot (default) or paper, N(0, 0.01^2)")
    g.add_argument("--seed", type=int, default=d["seed"],
                   help="seed of the weights, minibatches and samples (default %(default)s)")
    g.add_argument("--steps", type=int, default=None,
                   help="train until this many minibatch steps in all (wins over --epochs; a rerun resumes)")
    g.add_argument("--epochs", type=float, default=None,
                   help="train until this many passes over the training records in all (default: 1 when --steps "
                        "is not given either)")
    g.add_argument("--binarize", choices=["none", "static", "dynamic"], default=d["binarize"],
                   help="Bernoulli decoder: binarise the records once (static), per minibatch (dynamic), or not "
                        "(default)")
    g.add_argument("--validation", type=int, default=d["validation"],
                   help="records held out for validation (default %(default)s)")
    g.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="steps between logged evaluations (default %(default)s: only at the end)")
    g.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                   help="steps between checkpoints (default %(default)s; also at the end and on Ctrl-C)")
    g.add_argument("--steps-per-call", type=int, default=d["steps_per_call"],
                   help="minibatch steps per compiled call (default %(default)s)")
    g.add_argument("--no-jit", action="store_true", help="do not compile the training step with XLA")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only when stderr is a terminal)")


def _train_config(a: argparse.Namespace):
    from vaestream.training import TrainConfig

    return TrainConfig(batch_size=a.batch_size, num_samples=a.samples, estimator=a.estimator,
                       objective=getattr(a, "objective", "elbo"), optimizer=a.optimizer,
                       learning_rate=a.lr, map_prior=a.map_prior, init=a.init, seed=a.seed, steps=a.steps,
                       epochs=a.epochs, binarize=a.binarize, validation=a.validation, eval_every=a.eval_every,
                       checkpoint_every=a.checkpoint_every, steps_per_call=a.steps_per_call, jit=not a.no_jit)


def model_config(a: argparse.Namespace):
    """The :class:`vaestream.config.ModelConfig` of the model arguments (``--objective rd`` needs ``--lmbda``)."""
    from vaestream.config import ModelConfig
    from vaestream.errors import ConfigError

    entropy = getattr(a, "entropy_model", None) or ""
    if entropy and (a.objective != "rd" or a.lmbda is not None or not a.lmbdas):
        raise ConfigError("--entropy-model trains with --objective rd and --lmbdas (one model at every lambda), "
                          "not --lmbda")
    if not entropy and getattr(a, "lmbdas", None):
        raise ConfigError("--lmbdas (rate levels) go with --entropy-model")
    if not entropy and (a.objective == "rd") != (a.lmbda is not None):
        raise ConfigError("--objective rd and --lmbda go together")
    if a.activation is None:
        a.activation = "relu" if entropy else "tanh"
    channels = tuple(a.channels) if a.arch == "conv" else ()
    spatial = getattr(a, "latent_channels", 0)
    if spatial:   # Nz for the default 28 x 28 picture; training sets it from the data's shape
        from vaestream.config import latent_grid

        h, w = latent_grid((28, 28), channels)
        latent_dim, hidden = h * w * spatial, ()
    else:
        latent_dim, hidden = a.latent_dim, tuple(a.hidden)
    return ModelConfig(latent_dim=latent_dim, hidden=hidden, activation=a.activation,
                       likelihood=a.likelihood, arch=a.arch, channels=channels,
                       lmbda=a.lmbda, top_latent_dim=getattr(a, "top_latent_dim", 0),
                       top_hidden=tuple(getattr(a, "top_hidden", (256,))), latent_channels=spatial,
                       entropy_model=entropy, rd_lambdas=tuple(sorted(a.lmbdas or (), reverse=True)))


def cmd_train(a: argparse.Namespace) -> int:
    from vaestream.training import train

    if a.activation is None:
        a.activation = "relu" if getattr(a, "entropy_model", None) else "tanh"
    if a.likelihood is None:  # a learned entropy model decodes exactly: a linear (gaussian) mean
        a.likelihood = ("gaussian" if getattr(a, "entropy_model", None) else "gaussian_sigmoid") \
            if a.objective == "rd" else "bernoulli"
    tc = _train_config(a)
    if a.follow:
        from vaestream.cli.stream import follow_from_train

        return follow_from_train(a, tc)
    from vaestream.shards import train_from_shards
    from vaestream.shardset import is_shard_spec

    test_spec = a.test_data or (a.data if _has_test_split(a.data) else None)
    test_ds = load_dataset(test_spec, "test", a.likelihood, tc.binarize, a.key, a.scale) if test_spec else None
    cfg = model_config(a)
    if a.distributed:
        if not is_shard_spec(a.data):
            from vaestream.errors import ConfigError

            raise ConfigError(f"--distributed trains from a shard set (vaestream prepare), not {a.data}")
        from vaestream.distributed import train_distributed

        rec = train_distributed(a.data, a.out, cfg, tc, num_workers=a.distributed)
        print(json.dumps({"model_dir": str(a.out), **rec}, indent=None if a.json else 2))
        return 0
    if is_shard_spec(a.data):  # minibatches streamed from the prepare job's shards through tf.data
        res = train_from_shards(a.data, a.out, cfg, tc, test_data=test_ds, progress=show_progress(a))
    else:
        train_ds = load_dataset(a.data, "train", a.likelihood, tc.binarize, a.key, a.scale)
        res = train(train_ds, a.out, cfg, tc, test_data=test_ds, progress=show_progress(a))
    last = res.history[-1] if res.history else {}
    # a rerun on a directory that already holds all its steps trains nothing: no rate to report
    already = not res.interrupted and res.steps > 0 and res.examples_per_second == 0
    summary = {"model_dir": str(res.model_dir), "steps": res.steps, "interrupted": res.interrupted,
               "already_trained": already,
               "examples_per_second": None if already else round(res.examples_per_second, 1), **last}
    if already:
        print(f"vaestream: {res.model_dir} is already trained to step {res.steps}: nothing to do (more --steps or "
              "--epochs train on from there)", file=sys.stderr)
    print(json.dumps(summary, indent=None if a.json else 2))
    return 130 if res.interrupted else 0


def _table(rows: dict) -> str:
    width = max(len(k) for k in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in rows.items())


def cmd_evaluate(a: argparse.Namespace) -> int:
    from vaestream import plots
    from vaestream.evaluate import evaluate
    from vaestream.store import load_model, read_log

    model = load_model(a.model)
    tc = json.loads((Path(a.model) / "train_config.json").read_text()) if (Path(a.model) / "train_config.json"
                                                                            ).exists() else {}
    binarize = a.binarize or tc.get("binarize", "none")
    ds = load_dataset(a.data, a.split, model.config.likelihood, binarize, a.key, a.scale)
    result = evaluate(model, ds, k=a.k, max_records=a.n, batch_size=a.batch_size, progress=show_progress(a))
    result["model"] = str(a.model)
    result["fingerprint"] = model.fingerprint()[:16]
    if a.plots:
        out = Path(a.plots)
        out.mkdir(parents=True, exist_ok=True)
        written = [str(plots.reconstructions(model, ds.batch(slice(0, 16)), out / "reconstructions.png"))]
        log = read_log(a.model)
        if log:
            written.append(str(plots.learning_curves({Path(a.model).name: log}, out / "learning_curves.png")))
        if model.config.latent_dim == 2:
            written.append(str(plots.manifold(model, out / "manifold.png")))
        result["plots"] = written
    if a.json:
        print(json.dumps(result))
    else:
        print(_table(result))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Train on the default data set, evaluate, draw, and (where the coder is installed) compress."""
    out = Path(a.out)
    steps = ["train", "--data", a.data, "--out", str(out / "model"), "--epochs", str(a.epochs),
             "--latent-dim", str(a.latent_dim), "--validation", "0",
             "--eval-every", str(max(1, round(60 * a.epochs)))]  # ~10 points on the curve (600 steps an epoch)
    from vaestream.cli import main

    flags = (["--no-progress"] if a.no_progress else []) + (["--verbose"] if getattr(a, "verbose", False) else [])
    rc = main(steps + flags)
    if rc:
        return rc
    rc = main(["evaluate", "--model", str(out / "model"), "--data", a.data, "--split", "test", "--k", str(a.k),
               "--n", str(a.n), "--plots", str(out / "plots")] + flags)
    if rc:
        return rc
    return _demo_compress(a, out)


def _demo_compress(a: argparse.Namespace, out: Path) -> int:
    """Compress the test images with the trained model, decompress them, and report bits and distortion."""
    import numpy as np

    from vaestream import data
    from vaestream.coding import codec

    records = data.load_records(a.data, "test")[: a.n]
    c = codec.load(out / "model", calibration=data.load_records(a.data, "train")[:20000])
    blob = c.compress(records)
    (out / "test_images.vae").write_bytes(blob)
    x = records.reshape(len(records), -1).astype(np.float32) / 255.0
    x_hat = np.asarray(c.decompress((out / "test_images.vae").read_bytes())).reshape(len(x), -1)
    mse = float(np.mean((x - x_hat) ** 2))
    summary = {"records": len(x), "bytes": len(blob), "bits_per_record": 8 * len(blob) / len(x),
               "raw_bytes": int(records.nbytes), "ratio": round(records.nbytes / len(blob), 1),
               "kl_bits_per_record": float(np.mean(c.kl_bits(records))), "mse": mse,
               "psnr_db": float(10 * np.log10(1.0 / mse)), "file": str(out / "test_images.vae")}
    # Deployment: a versioned SavedModel that decodes the same stream with no model code or checkpoint.
    from vaestream.serving.export import export

    path = export(out / "model", out / "export")
    x_export = np.asarray(codec.load(path).decompress(blob)).reshape(len(x), -1)
    summary["export"] = str(path)
    summary["export_max_abs_diff"] = float(np.abs(x_export - x_hat).max())
    print(json.dumps({"compress": summary}, indent=2))
    return 0


def add_subcommands(sub) -> None:
    from vaestream.beam.jobs.options import add_scale_argument  # --scale S: the input-scaling rule's override

    p = sub.add_parser("train", help="train a VAE with AEVB", description=cmd_train.__doc__)
    p.add_argument("--data", required=True,
                   help="'fashion-mnist', an MNIST-layout directory, a file (IDX, .mat, .npy, .npz, .csv), or a "
                        "shard set of `vaestream prepare` (its directory or manifest.json)")
    p.add_argument("--test-data", default=None, help="test set (default: the test split of an MNIST-layout --data)")
    p.add_argument("--key", default=None, help="array name in .npz / variable in .mat")
    add_scale_argument(p)
    p.add_argument("--out", required=True, help="model directory (resumes if it holds a checkpoint)")
    p.add_argument("--json", action="store_true", help="one-line JSON summary")
    p.add_argument("--follow", nargs="+", default=None, metavar="PATTERN",
                   help="online AEVB: learn from --data once, then from each new file matching PATTERN "
                        "(vaestream.online); --out is then the work directory, the model DIR/model")
    p.add_argument("--distributed", type=int, default=0, metavar="N",
                   help="train on N local worker processes with MultiWorkerMirroredStrategy (vaestream.distributed; "
                        "--data must be a shard set; worker i reads shards i, i+N, ...; chief-only checkpoints)")
    p.add_argument("--registry", default=None, help="with --follow: publish numbered model versions here")
    p.add_argument("--poll-interval", type=float, default=1.0, help="with --follow: seconds between polls")
    p.add_argument("--idle-timeout", type=float, default=None, help="with --follow: stop after S idle seconds")
    _add_model_args(p)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test lower bound and importance-sampled log p(x)",
                       description="The mean ELBO and its terms (nats per record, bits/dim) of a model on a data "
                                   "set and, with --k, the importance-sampled log p(x) (IWAE-k).")
    p.add_argument("--model", required=True, help="model directory (config.json + ckpt/)")
    p.add_argument("--data", required=True,
                   help="'fashion-mnist', an MNIST-layout directory, or a file (IDX, .mat, .npy, .npz, .csv)")
    p.add_argument("--split", choices=["train", "test"], default="test",
                   help="the split of a data set with two (default test)")
    p.add_argument("--key", default=None, help="array name in .npz / variable in .mat")
    add_scale_argument(p)
    p.add_argument("--k", type=int, default=0,
                   help="importance samples for log p(x) (0: ELBO only; 5000 as the paper: minutes, with progress)")
    p.add_argument("--n", type=int, default=None, help="evaluate the first N records only")
    p.add_argument("--batch-size", type=int, default=100,
                   help="records per importance-sampling batch (memory; not the result; default 100)")
    p.add_argument("--binarize", choices=["none", "static", "dynamic"], default=None,
                   help="default: as the model was trained")
    p.add_argument("--plots", default=None, help="write PNGs (learning curves, reconstructions, manifold) here")
    p.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="the main job: train, evaluate, plot and compress on the default data set")
    p.add_argument("--data", default="fashion-mnist", help=f"default: Fashion-MNIST from {FASHION_MNIST_DIR}")
    p.add_argument("--out", default="runs/demo",
                   help="work directory: OUT/model, OUT/plots, OUT/export, OUT/test_images.vae (default runs/demo)")
    p.add_argument("--epochs", type=float, default=10, help="training epochs (default 10; 1 for a quick look)")
    p.add_argument("--latent-dim", type=int, default=20, help="Nz (default 20)")
    p.add_argument("--k", type=int, default=100, help="importance samples for the test log p(x) (default 100)")
    p.add_argument("--n", type=int, default=1000, help="test records to evaluate and compress (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (drawn only when stderr is a terminal)")
    p.set_defaults(func=cmd_demo)

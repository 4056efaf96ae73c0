"""``vaestream follow``, ``vaestream stream-encode``, ``vaestream registry``: streaming and online learning.

* ``follow PATTERN --work DIR [--registry REG]``: online AEVB (:class:`vaestream.online.OnlineLearner`): learn
  from each new file matching PATTERN once, checkpoint, publish numbered versions to REG when the held-out
  bound improves; resumes from DIR's ledger after a kill.
* ``stream-encode``: the streaming Beam job (``pipelines/stream_encode.py``; same flags).
* ``registry list REG`` / ``registry decode REG FILE.vaez [--out x.npy]``: versions, and decoding a container
  with the version whose fingerprint it names.
"""

from __future__ import annotations

import argparse
import json


def _follow(a: argparse.Namespace) -> int:
    from vaestream.config import ModelConfig
    from vaestream.data import load_records
    from vaestream.online.drift import DriftConfig
    from vaestream.online import OnlineConfig, OnlineLearner
    from vaestream.training import TrainConfig

    mc = ModelConfig(latent_dim=a.latent_dim, hidden=tuple(a.hidden), likelihood=a.likelihood)
    tc = TrainConfig(optimizer=a.optimizer, learning_rate=a.learning_rate, binarize=a.binarize, seed=a.seed)
    oc = OnlineConfig(batch_size=a.batch_size, new_fraction=a.new_fraction, passes=a.passes,
                      buffer_size=a.buffer_size, holdout_fraction=0.0 if a.holdout else a.holdout_fraction,
                      holdout_size=a.holdout_size, checkpoint_every_files=a.checkpoint_every_files,
                      checkpoint_seconds=a.checkpoint_seconds, publish=a.registry is not None,
                      publish_min_improvement=a.min_improvement, seed=a.seed)
    holdout = load_records(a.holdout, "test") if a.holdout else None
    learner = OnlineLearner(a.work, registry=a.registry, model_config=mc, train_config=tc, online_config=oc,
                            holdout=holdout, initial_model=a.init_model, drift=DriftConfig(threshold=a.drift_threshold))

    def show(rec: dict) -> None:
        if a.json:
            print(json.dumps(rec, default=str), flush=True)
        elif "rejected" in rec:
            print(f"rejected {rec['source']}: {rec['rejected']}", flush=True)
        else:
            flag = "  DRIFT" if rec.get("drift_flagged") else ""
            print(f"{rec['source']}: {rec['records']} records, {rec['steps']} steps, prequential ELBO "
                  f"{rec['prequential_elbo']:.2f} nats ({rec['bits_per_record']:.1f} bits/record){flag}", flush=True)

    if a.source:
        summary = learner.follow_source(a.source, max_messages=a.max_files, idle_timeout=a.idle_timeout,
                                        on_file=show)
    else:
        summary = learner.follow(a.pattern, poll_interval=a.poll_interval, max_files=a.max_files,
                                 idle_timeout=a.idle_timeout, on_file=show)
    print(json.dumps(summary, default=str))
    return 0


def follow_from_train(a: argparse.Namespace, train_config) -> int:
    """``vaestream train --data SPEC --out DIR --follow PATTERN [--registry REG]``: online AEVB with the train
    command's model and training flags: learn from ``--data`` once (recorded in the ledger as ``data:SPEC``),
    then from every new file matching PATTERN; ``--out`` is the work directory (the model is ``DIR/model``)."""
    from vaestream.config import ModelConfig
    from vaestream.data import load_records
    from vaestream.online import OnlineConfig, OnlineLearner

    mc = ModelConfig(latent_dim=a.latent_dim, hidden=tuple(a.hidden), activation=a.activation,
                     likelihood=a.likelihood)
    registry = getattr(a, "registry", None)
    oc = OnlineConfig(batch_size=train_config.batch_size, steps_per_call=min(train_config.steps_per_call, 50),
                      publish=registry is not None, seed=train_config.seed)
    learner = OnlineLearner(a.out, registry=registry, model_config=mc, train_config=train_config, online_config=oc)
    if a.data:
        learner.process_records(load_records(a.data, "train", getattr(a, "key", None)), f"data:{a.data}")
    summary = learner.follow(a.follow, poll_interval=getattr(a, "poll_interval", 1.0),
                             idle_timeout=getattr(a, "idle_timeout", None))
    print(json.dumps(summary, default=str))
    return 0


def _stream_encode(a: argparse.Namespace) -> int:
    import shlex

    from vaestream.beam.jobs import stream_encode

    pipeline_args = ([f"--runner={a.runner}"] if a.runner else []) + shlex.split(a.beam_args or "")
    summary = stream_encode.run_job(a, pipeline_args)
    print(json.dumps(summary, indent=None if a.json else 2))
    return 0


def _registry(a: argparse.Namespace) -> int:
    from vaestream.online.registry import open_registry

    reg = open_registry(a.registry, must_exist=True)
    if a.action == "list":
        log = {r["version"]: r for r in reg.log()}
        for v, fp in reg.index().items():
            extra = {k: log.get(v, {}).get(k) for k in ("holdout_elbo", "step", "published") if k in log.get(v, {})}
            print(json.dumps({"version": v, "fingerprint": fp, **extra}))
        return 0
    import numpy as np

    x = reg.decode_file(a.file)
    ver = reg.version_of(open(a.file, "rb").read(), a.file)
    if a.out:
        np.save(a.out, x)
    print(json.dumps({"file": a.file, "version": ver.version, "fingerprint": ver.fingerprint,
                      "records": int(x.shape[0]) if x.ndim > 1 else 1, "out": a.out}))
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("follow", help="online AEVB: keep training as new files appear, publish model versions",
                       description=_follow.__doc__ or "Online AEVB on new files (vaestream.online).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("pattern", nargs="*", default=[], help="glob(s) of record files (quote them)")
    src.add_argument("--source", default=None, metavar="URL",
                     help="a broker stream of records instead, redis://HOST:PORT/STREAM[?group=G] (consumer group "
                          "follow by default; vaestream.broker)")
    p.add_argument("--work", required=True, help="work directory (model, ledger, logs); resumes if it has a ledger")
    p.add_argument("--registry", default=None, help="registry directory to publish versions to")
    p.add_argument("--init-model", default=None, help="start from this model directory")
    p.add_argument("--holdout", default=None, help="a fixed held-out set (file or data spec); default: a share "
                                                   "of every file")
    p.add_argument("--latent-dim", type=int, default=20, help="Nz of a new model (default 20)")
    p.add_argument("--hidden", type=int, nargs="+", default=[500], help="hidden widths of a new model (default 500)")
    p.add_argument("--likelihood", default="bernoulli", help="p(x|z) of a new model (default bernoulli)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adagrad"], help="default adam")
    p.add_argument("--learning-rate", type=float, default=None, help="step size (adam 1e-3, adagrad 0.02)")
    p.add_argument("--binarize", default="none", choices=["none", "static", "dynamic"],
                   help="Bernoulli decoder: binarise records once (static), per minibatch (dynamic), or not (default)")
    p.add_argument("--batch-size", type=int, default=100, help="M, records per minibatch (default 100)")
    p.add_argument("--new-fraction", type=float, default=0.5,
                   help="share of a minibatch from the newest file, the rest from the replay buffer (default 0.5)")
    p.add_argument("--passes", type=float, default=1.0,
                   help="times each new record is used, in expectation (sets the steps per file; default 1)")
    p.add_argument("--buffer-size", type=int, default=10000, help="records in the replay buffer (default 10000)")
    p.add_argument("--holdout-fraction", type=float, default=0.05,
                   help="share of each file held out for the published bound (default 0.05; unused with --holdout)")
    p.add_argument("--holdout-size", type=int, default=2000,
                   help="the most recent held-out records kept (default 2000)")
    p.add_argument("--checkpoint-every-files", type=int, default=1,
                   help="checkpoint (and ledger) after this many files (default 1) ...")
    p.add_argument("--checkpoint-seconds", type=float, default=60.0,
                   help="... or this many seconds, whichever comes first (default 60)")
    p.add_argument("--min-improvement", type=float, default=0.0, help="nats/record to beat the published version by")
    p.add_argument("--drift-threshold", type=float, default=0.1,
                   help="relative rise of bits/record over the reference that flags drift (default 0.1: 10%%)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between looks for new files (default 1)")
    p.add_argument("--max-files", type=int, default=None, help="stop after this many files (default: never)")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="stop after this many seconds with no new file (default: never)")
    p.add_argument("--seed", type=int, default=0, help="seed of minibatch sampling and hold-out selection")
    p.add_argument("--json", action="store_true", help="one JSON line per file")
    p.set_defaults(func=_follow)

    s = sub.add_parser("stream-encode", help="streaming Beam encode of new files in windows",
                       description="The streaming encode job (python -m pipelines.stream_encode): new files -> codes "
                                   "in fixed windows, dead letters, drift log.")
    from vaestream.beam.jobs import stream_encode

    stream_encode.add_arguments(s)
    s.add_argument("--runner", default=None, help="a Beam runner with streaming (default: in-process)")
    s.add_argument("--beam-args", "--beam_args", default="", help="further pipeline options, one string")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    s.set_defaults(func=_stream_encode)

    r = sub.add_parser("registry", help="list model versions, or decode a container with the version that wrote it")
    r.add_argument("action", choices=["list", "decode"],
                   help="list: the versions; decode: a container with the version whose fingerprint it names")
    r.add_argument("registry", help="registry directory")
    r.add_argument("file", nargs="?", help="container file (decode)")
    r.add_argument("--out", default=None, help="write the reconstructions to this .npy")
    r.set_defaults(func=_registry)

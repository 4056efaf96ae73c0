"""Beam streaming job: new record files -> latent codes in fixed event-time windows (vaestream.beam.streaming).

    python -m pipelines.stream_encode --watch 'incoming/*.npy' --model runs/model --output out/ --window 10
    python -m pipelines.stream_encode --source redis://127.0.0.1:6379/mnist --model runs/model --output out/
    python -m pipelines.stream_encode --pubsub_subscription projects/P/subscriptions/S --saved_model REG/3 \
        --output gs://bucket/codes --runner DataflowRunner ...

Output: ``OUTPUT/codes/codes-START-END-pPANE.{tfrecord,vaez,json}`` per window pane (``--code_layout``: the
``.tfrecord``'s Examples, ``block`` by default as the batch encode job's, or ``record``),
``OUTPUT/dead_letter/*.jsonl`` (unreadable, malformed or late input, with the reason), ``OUTPUT/drift.jsonl``
(per-window mean ELBO, bits/record and the drift flag) and ``OUTPUT/summary.json``. With no ``--runner`` the
job runs on Beam's in-process streaming runner until ``--stop_after`` / ``--idle_timeout`` / ``--max_files``
(or Ctrl-C). Unknown flags are Beam pipeline options.
"""

from __future__ import annotations

import argparse
import json
import os

SUMMARY = "summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--watch", "--input", dest="watch", nargs="+", help="glob(s) of record files to watch")
    src.add_argument("--source", default=None, metavar="URL",
                     help="a broker stream of records, redis://HOST:PORT/STREAM[?group=G] (vaestream.broker; "
                          "consumer group stream-encode by default)")
    src.add_argument("--pubsub_topic", "--pubsub-topic", default=None, help="Pub/Sub topic of file paths")
    src.add_argument("--pubsub_subscription", "--pubsub-subscription", default=None,
                     help="Pub/Sub subscription of file paths")
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", "--model_dir", dest="model", help="model directory (config.json + ckpt/)")
    g.add_argument("--saved_model", "--saved-model", dest="saved_model",
                   help="SavedModel export (a version directory, or an export base / registry: its latest)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--window", type=float, default=10.0, help="window length, seconds of event time")
    parser.add_argument("--allowed_lateness", "--allowed-lateness", type=float, default=0.0,
                        help="seconds after a window's end that late input is still encoded (later: dead letter)")
    parser.add_argument("--poll_interval", "--poll-interval", type=float, default=1.0,
                        help="seconds between looks for new files (default 1)")
    parser.add_argument("--max_latency", "--max-latency", type=float, default=None, metavar="SECONDS",
                        help="size windows and polls so that a file's codes are on disk within SECONDS of its "
                             "arrival: window = min(--window, SECONDS/3), poll = min(--poll_interval, SECONDS/10)")
    parser.add_argument("--stop_after", "--stop-after", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--idle_timeout", "--idle-timeout", type=float, default=None,
                        help="stop when no new file (message, with --source) appeared for S seconds")
    parser.add_argument("--max_files", "--max-files", type=int, default=None,
                        help="stop after N files (messages, with --source)")
    parser.add_argument("--coder", choices=["auto", "yes", "no"], default="auto",
                        help="write .vaez containers (auto: when the model has coder tables)")
    parser.add_argument("--quality", type=float, default=None, help="coder quality")
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=4096, help="records per element")
    parser.add_argument("--drift_threshold", "--drift-threshold", type=float, default=0.1,
                        help="flag a window whose bits/record exceed the reference by this fraction")
    parser.add_argument("--score_every", "--score-every", type=int, default=32, metavar="K",
                        help="the drift signal's sample: the ELBO of one record in K (by key hash; 1: every "
                             "record; 0: none, no window judged); every record is coded (default 32)")
    parser.add_argument("--code_layout", "--code-layout", default="block", choices=["block", "record"],
                        help="the .tfrecord's code Examples: block (default; one a chunk or broker message, as "
                             "the batch encode job's default) or record (one a record)")


def run_job(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """Run the streaming encode job; returns (and writes to ``OUTPUT/summary.json``) its summary."""
    from vaestream.beam import streaming as bs
    from vaestream.online.drift import DriftConfig

    kw = dict(allowed_lateness=args.allowed_lateness, chunk_size=args.chunk_size, batch_size=args.chunk_size,
              score_every=getattr(args, "score_every", 32), code_layout=getattr(args, "code_layout", "block"))
    max_latency = getattr(args, "max_latency", None)
    cfg = (bs.StreamConfig(window=args.window, **kw) if max_latency is None
           else bs.StreamConfig.for_max_latency(max_latency, window=args.window, **kw))
    coder = {"auto": None, "yes": True, "no": False}[args.coder]
    summary = bs.run_stream(args.output, args.watch, args.model, args.saved_model, cfg,
                            DriftConfig(threshold=args.drift_threshold), args.poll_interval, args.stop_after,
                            args.idle_timeout, args.max_files, None, args.pubsub_topic, args.pubsub_subscription,
                            coder, args.quality, pipeline_args, source=getattr(args, "source", None))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, SUMMARY), "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (job flags, then Beam pipeline options) and run the job."""
    from vaestream.beam.running import run_job_argv

    return run_job_argv(__doc__.splitlines()[0], add_arguments, run_job, argv)

"""``vaestream publish``: put records on a broker stream (:func:`vaestream.broker.publish`), for
``vaestream stream-encode --source`` and ``vaestream follow --source`` to consume.

    vaestream publish --to redis://127.0.0.1:6379/mnist --input data/mnist/t10k-images-idx3-ubyte.gz \
        --records-per-message 100 --rate 10000
"""

from __future__ import annotations

import argparse
import json


def _publish(a: argparse.Namespace) -> int:
    from vaestream.broker import publish
    from vaestream.data import load_records
    from vaestream.errors import ConfigError

    if a.records_per_message < 1:
        raise ConfigError(f"--records-per-message must be positive, got {a.records_per_message}")
    x = load_records(a.input, a.split, a.key)
    if a.limit is not None:
        x = x[:a.limit]
    summary = publish(a.to, x, a.records_per_message, a.rate, a.format, a.event_time, a.input)
    print(json.dumps(summary))
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("publish", help="publish records to a broker stream (redis://HOST:PORT/STREAM)",
                       description="Publish records to a Redis stream in vaestream's wire format "
                                   "(vaestream.broker.wire): one message per --records-per-message records.")
    p.add_argument("--to", required=True, metavar="URL", help="the stream: redis://HOST:PORT/STREAM")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="records: a file (.npy, .npz, IDX, CSV, .mat) or a data-set directory")
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="the split of a data-set directory (default train)")
    p.add_argument("--key", default=None, help="the array's name in a .npz or .mat file")
    p.add_argument("--records-per-message", type=int, default=100, metavar="N",
                   help="records per message (default 100; 1: one record per message)")
    p.add_argument("--rate", type=float, default=None, metavar="R",
                   help="at most R records/s (default: as fast as the broker takes them)")
    p.add_argument("--format", default="raw", choices=["raw", "npy"],
                   help="the payload: raw bytes with dtype/shape fields (default) or .npy bytes")
    p.add_argument("--event-time", type=float, default=None, metavar="SECONDS",
                   help="an event time (seconds since the epoch) for every message (default: the broker's)")
    p.add_argument("--limit", type=int, default=None, help="publish only the first N records")
    p.set_defaults(func=_publish)

"""BD-rates of saved rate-distortion results, recomputed with each interpolation method.

    python benchmarks/bd_recompute.py benchmarks/results/rd_run5_rdo.json [more.json ...]

Reads the JSON that ``bench_rd.py`` wrote (its ``points`` and ``peers`` keep every measured point), and
prints one JSON document: for each file, data set and peer, the BD-rate over the overlap cut to the file's
PSNR range (``psnr_range``, default 18-32 dB) with ``pchip`` (the library's default since stop 29; the
JCT-VC / JVET sheets), ``akima`` and ``cubic`` (the single polynomial of VCEG-M33 that runs 1-5 reported).
Nothing is measured again: the points are the ones in the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaestream.metrics import BD_METHODS, bd_rate  # noqa: E402


def recompute(path: Path) -> dict:
    """``{data: {peer: {method: {"bd_rate_pct", "psnr_from", "psnr_to"}}}}`` for one saved result."""
    saved = json.loads(path.read_text())
    out = {}
    for res in saved["results"]:
        rng = tuple(res.get("psnr_range", (18.0, 32.0)))
        out[res["data"]] = {
            peer: {m: {k: v for k, v in bd_rate(res["points"], curve, rng, method=m).items() if k != "method"}
                   for m in BD_METHODS}
            for peer, curve in res["peers"].items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args(argv)
    print(json.dumps({"benchmark": "bd_recompute", "methods": list(BD_METHODS),
                      "results": {str(p): recompute(p) for p in args.results}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

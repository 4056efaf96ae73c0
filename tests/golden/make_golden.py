"""Write the golden streams of ``tests/golden/`` with the code of the day, kept for the record.

The streams, the tiny models that decode them and what they decode to are committed; ``tests/test_golden.py``
checks that the decoders (and encoders) of later code still read (and write) them bit for bit. Do not rerun this
to "fix" a failing golden test: a new golden set proves nothing about the old format. It is kept to show how each
file was made (the CLI and the Python API, as a user would), and to make a golden set for a new format version.

    python tests/golden/make_golden.py            # from the repository root; trains the models if missing
    python tests/golden/make_golden.py --force    # rebuild everything (models too)

    python tests/golden/make_golden.py --from-commit HEAD   # with the committed code (git archive), not the tree's

The manifest records the commit of the code that wrote the files.

Models: a few hundred AEVB steps on real MNIST (``../shared/data/mnist``) each, small enough that every file
stays under 1 MB. Streams: the first 16 records of the MNIST test set.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

GOLDEN = Path(__file__).resolve().parent
ROOT = GOLDEN.parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
MODELS = GOLDEN / "models"
FAMILY = MODELS / "family"
N = 16
STEPS = "300"

TRAINING = {  # model directory (relative to GOLDEN) -> the CLI commands that made it
    "models/family/lmbda-30000": [
        ["train", "--data", "MNIST", "--out", "DIR", "--objective", "rd", "--lmbda", "30000", "--latent-dim", "4",
         "--hidden", "32", "--activation", "elu", "--steps", "600", "--seed", "1"],
        ["build-tables", "--model", "DIR", "--data", "MNIST", "--n", "2000"]],
    "models/family/lmbda-300000-conv": [
        ["train", "--data", "MNIST", "--out", "DIR", "--objective", "rd", "--lmbda", "300000", "--arch", "conv",
         "--channels", "4", "8", "--latent-dim", "8", "--hidden", "32", "--activation", "elu", "--steps", "600",
         "--seed", "2"],
        ["build-tables", "--model", "DIR", "--data", "MNIST", "--n", "2000"]],
    "models/family/bitsback": [
        ["train", "--data", "MNIST", "--out", "DIR", "--likelihood", "beta_binomial", "--latent-dim", "8",
         "--hidden", "32", "--steps", STEPS, "--seed", "3"],
        ["train-context", "--model", "DIR", "--data", "MNIST", "--n", "1000", "--levels", "4", "--epochs", "1",
         "--window", "3", "--hidden", "16", "--recon-epochs", "1", "--recon-window", "3", "--recon-hidden", "8",
         "--seed", "1"]],
    "models/bernoulli": [
        ["train", "--data", "MNIST", "--out", "DIR", "--likelihood", "bernoulli", "--binarize", "static",
         "--latent-dim", "4", "--hidden", "32", "--steps", STEPS, "--seed", "4"]],
    "models/two-layer": [
        ["train", "--data", "MNIST", "--out", "DIR", "--likelihood", "beta_binomial", "--latent-dim", "8",
         "--hidden", "32", "--top-latent-dim", "4", "--top-hidden", "16", "--steps", STEPS, "--seed", "5"]],
}

# Each stream: name, kind, model (relative to GOLDEN), how it was made, and the spec tests/test_golden.py reads to
# decode and re-encode it (``coder``: lossy | lossy-file | bits-back | family | per-record).
BB = "models/family/bitsback"
STREAMS = [
    ("lossy", "lossy, MLP rate-distortion model", "models/family/lmbda-30000",
     "python: vaestream.load(model).compress(x)", {"coder": "lossy"}),
    ("lossy-single", "lossy, one record (SINGLE flag)", "models/family/lmbda-30000",
     "python: vaestream.load(model).compress(x[0])", {"coder": "lossy", "single": True}),
    ("lossy-conv-q2", "lossy, convolutional model, quality 2", "models/family/lmbda-300000-conv",
     "cli: vaestream compress input.npy OUT --model MODEL --quality 2", {"coder": "lossy", "quality": 2.0}),
    ("lossy-file", "lossy, indexed file (write + append: 2 frames, index, footer)", "models/family/lmbda-30000",
     "python: c = vaestream.load(model, frame_records=8); c.write(OUT, x[:8]); c.write(OUT, x[8:], append=True)",
     {"coder": "lossy-file", "frame_records": 8, "split": 8}),
    ("lossless-bb", "lossless, one layer, beta_binomial", BB,
     "cli: vaestream compress input.npy OUT --model MODEL --lossless", {"coder": "bits-back"}),
    ("lossless-bb-frames", "lossless, one layer, beta_binomial, flat records, 3 frames", BB,
     "python: vaestream.coding.bitsback.coder.compress_lossless(load_model(MODEL), x.reshape(16, 784), "
     "frame_records=6)",
     {"coder": "bits-back", "flat": True, "frame_records": 6}),
    ("lossless-bern", "lossless, one layer, bernoulli (binarised records)", "models/bernoulli",
     "cli: vaestream compress input_binary.npy OUT --model MODEL --lossless",
     {"coder": "bits-back", "input": "input_binary.npy"}),
    ("lossless-two-layer", "lossless, two stochastic layers (Bit-Swap, --top-latent-dim)", "models/two-layer",
     "cli: vaestream compress input.npy OUT --model MODEL --lossless", {"coder": "bits-back"}),
    ("levels-8", "near-lossless K=8, level reconstruction, no context model for K", BB,
     "cli: vaestream compress input.npy OUT --model MODEL --levels 8", {"coder": "bits-back", "levels": 8}),
    ("levels-8-mean", "near-lossless K=8, reconstruction mean, no context model", BB,
     "cli: vaestream compress input.npy OUT --model MODEL --levels 8 --reconstruction mean",
     {"coder": "bits-back", "levels": 8, "reconstruction": "mean"}),
    ("levels-4-no-context", "near-lossless K=4, --no-context (the directory has one for K=4)", BB,
     "cli: vaestream compress input.npy OUT --model MODEL --levels 4 --no-context",
     {"coder": "bits-back", "levels": 4, "use_context": False}),
    ("levels-4-context", "near-lossless K=4 with the pixel context model", BB,
     "cli: vaestream compress input.npy OUT --model MODEL --levels 4", {"coder": "bits-back", "levels": 4}),
    ("levels-4-context-mean", "near-lossless K=4, context model, reconstruction mean", BB,
     "cli: vaestream compress input.npy OUT --model MODEL --levels 4 --reconstruction mean",
     {"coder": "bits-back", "levels": 4, "reconstruction": "mean"}),
    ("levels-4-learned", "near-lossless K=4, context model, reconstruction learned", BB,
     "cli: vaestream compress input.npy OUT --model MODEL --levels 4 --reconstruction learned",
     {"coder": "bits-back", "levels": 4, "reconstruction": "learned"}),
    ("family-psnr-lossy", "family stream (compress --family --psnr): a lossy member's point", "models/family",
     "cli: vaestream compress --family MODEL --psnr PSNR input.npy OUT", {"coder": "family", "psnr": None}),
    ("family-psnr-levels", "family stream (compress --family --psnr): the near-lossless member's point",
     "models/family", "cli: vaestream compress --family MODEL --psnr PSNR input.npy OUT",
     {"coder": "family", "psnr": None}),
    ("per-record", "per-record stream (\"VM\", compress --family --per-record --psnr)", "models/family",
     "cli: vaestream compress --family MODEL --per-record --psnr PSNR input.npy OUT",
     {"coder": "per-record", "psnr": None}),
    ("per-record-mixed", "per-record stream (\"VM\") of three streams with its record map (records i % 3)",
     "models/family", "python: vaestream.coding.per_record.compress(points, np.arange(16) % 3, x) with points: "
     "lmbda-30000 quality 1, lmbda-300000-conv quality 2, bitsback K=4 learned",
     {"coder": "per-record", "points": [
         {"model": "models/family/lmbda-30000", "quality": 1.0, "levels": None, "reconstruction": None},
         {"model": "models/family/lmbda-300000-conv", "quality": 2.0, "levels": None, "reconstruction": None},
         {"model": BB, "quality": None, "levels": 4, "reconstruction": "learned"}]}),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(args: list[str], model: str | None = None) -> dict:
    """Run ``vaestream ARGS`` (MNIST and DIR substituted) in a subprocess; its last JSON line."""
    args = [str(MNIST) if a == "MNIST" else str(GOLDEN / model) if a == "DIR" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "vaestream.cli", *args, "--no-progress"] if args[0] == "train" else
                       [sys.executable, "-m", "vaestream.cli", *args], capture_output=True, text=True, cwd=GOLDEN)
    if r.returncode:
        raise SystemExit(f"vaestream {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    for start in [0] + [i for i, ln in enumerate(r.stdout.splitlines()) if ln.startswith("{")][::-1]:
        try:
            return json.loads("\n".join(r.stdout.splitlines()[start:]))
        except json.JSONDecodeError:
            continue
    return {}


def slim(model_dir: Path) -> None:
    """Keep only the model's weights in the checkpoint (not the optimizer's slots: a third of the size); the
    weights, and so the fingerprint, are the same."""
    import tensorflow as tf

    from vaestream.store import CKPT, load_model

    model = load_model(model_dir)
    fp = model.fingerprint()
    step = int(tf.train.latest_checkpoint(str(model_dir / CKPT)).rsplit("-", 1)[1])
    shutil.rmtree(model_dir / CKPT)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(model_dir / CKPT), 1).save(step)
    assert load_model(model_dir).fingerprint() == fp


def train_models(force: bool) -> None:
    for model, commands in TRAINING.items():
        d = GOLDEN / model
        if d.is_dir() and not force:
            continue
        shutil.rmtree(d, ignore_errors=True)
        for c in commands:
            print("vaestream", " ".join(c), flush=True)
            cli(c, model)
        (d / "log.jsonl").unlink(missing_ok=True)  # evaluation log: not needed to decode
        slim(d)


def per_record_near_half(fam: Path, blob: bytes) -> np.ndarray:
    """Where a per-record stream's lossy records round a float within 1e-3 counts of .5 (another CPU kind's last
    ulp may round those the other way): bool [N, D]."""
    from vaestream.coding import open_stream, per_record

    _, streams, sym = per_record.read(blob)
    out = np.zeros((len(sym), 784), bool)
    for i, (_, s) in enumerate(streams):
        y = np.asarray(open_stream(s, fam).decompress(s))
        if y.dtype != np.uint8:
            v = np.clip(y.astype(np.float64), 0, 1) * 255.0
            out[sym == i] = np.abs(v - np.floor(v) - 0.5) < 1e-3
    return out


def lossy_margin_ok(codec, x, quality=None) -> bool:
    """Whether the codes of ``x`` survive a 1e-5 relative change of the posterior means (so re-encoding on another
    CPU kind gives the same codes)."""
    from vaestream.coding.tables import quantize

    q = codec.ladder_quality(quality)
    mean, _ = codec.posterior(x)
    codes = quantize(mean, codec.tables, q)
    return all((quantize(mean * (1 + s * 1e-5) + s * 1e-7, codec.tables, q) == codes).all() for s in (-1, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="retrain the models too")
    ap.add_argument("--from-commit", default=None,
                    help="run the code of this commit (git archive into a temporary directory on PYTHONPATH)")
    a = ap.parse_args()
    if a.from_commit and "GOLDEN_CODE_COMMIT" not in os.environ:
        import tempfile

        sha = subprocess.run(["git", "rev-parse", a.from_commit], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.strip()
        with tempfile.TemporaryDirectory() as tmp:
            tar = subprocess.run(["git", "archive", sha, "vaestream"], capture_output=True, cwd=ROOT, check=True)
            subprocess.run(["tar", "-x", "-C", tmp], input=tar.stdout, check=True)
            env = {**os.environ, "PYTHONPATH": tmp, "GOLDEN_CODE_COMMIT": sha}
            sys.exit(subprocess.run([sys.executable, __file__] + sys.argv[1:], env=env, cwd=tmp).returncode)
    import tensorflow as tf

    import vaestream
    from vaestream.coding import family, open_stream, per_record
    from vaestream.coding.bitsback.coder import compress_lossless
    from vaestream.data import read_idx
    from vaestream.store import load_model

    train_models(a.force)
    x = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:N]
    np.save(GOLDEN / "input.npy", x)
    np.save(GOLDEN / "input_binary.npy", (x >= 128).astype(np.uint8))
    streams_dir = GOLDEN / "streams"
    shutil.rmtree(streams_dir, ignore_errors=True)
    streams_dir.mkdir()
    # targets between the members' points (measured on these records: a lossy point, then a near-lossless one)
    points = [p for d in family.members(FAMILY) for p in family.member_points(d, x)]
    lossy = [p for p in points if not p.levels]
    best_lossy = max(p.psnr_db for p in lossy)
    psnr_lossy = float(np.floor(sorted(p.psnr_db for p in lossy)[len(lossy) // 2]))
    psnr_levels = float(np.ceil(best_lossy + 0.5))
    psnr_mixed = float(np.floor(best_lossy))  # on 16 records one stream is cheapest: see per-record-mixed
    manifest = []
    for name, kind, model, how, spec in STREAMS:
        spec = dict(spec)
        ext = ".vm" if spec["coder"] == "per-record" else ".vzl" if spec["coder"] == "bits-back" else ".vaez"
        out = streams_dir / (name + ext)
        rel_out = str(out.relative_to(GOLDEN))
        mdir = GOLDEN / model
        inp = spec.get("input", "input.npy")
        xi = np.load(GOLDEN / inp)
        expected, notes = {}, []
        if spec["coder"] == "family" or spec["coder"] == "per-record":
            spec["psnr"] = (psnr_mixed if spec["coder"] == "per-record" else
                            psnr_lossy if name.endswith("lossy") else psnr_levels)
            how = how.replace("PSNR", f"{spec['psnr']:g}")
        if how.startswith("cli:"):
            args = how[len("cli: vaestream "):].split()
            args = [str(mdir) if t == "MODEL" else str(out) if t == "OUT" else str(GOLDEN / t) if t.endswith(".npy")
                    else t for t in args]
            info = cli(args)
            if spec["coder"] == "per-record":  # the operating point of each of its streams, in stream order
                spec["points"] = [{"model": str(Path(p["model"]).relative_to(GOLDEN)), "quality": p["quality"],
                                   "levels": p["levels"], "reconstruction": p["reconstruction"]}
                                  for p in info["streams"]]
                notes.append(f"records per stream: {[p['records'] for p in info['streams']]}")
            if spec["coder"] == "family":  # the point compress --family chose (its JSON line)
                spec.update(member=str(Path(info["model"]).relative_to(GOLDEN)), quality=info["quality"],
                            levels=info["levels"], reconstruction=info["reconstruction"])
        elif name == "per-record-mixed":  # per-record streams pay a stream's header per point: 16 records mix none
            points = [family.OperatingPoint(**{**p, "model": GOLDEN / p["model"]}) for p in spec["points"]]
            out.write_bytes(per_record.PerRecordCoder(mdir, points=points).compress(xi, np.arange(N) % 3))
        elif name == "lossless-bb-frames":
            out.write_bytes(compress_lossless(load_model(mdir), xi.reshape(N, -1), frame_records=6))
        elif spec["coder"] == "lossy-file":
            c = vaestream.load(mdir, frame_records=8)
            c.write(out, xi[:8])
            c.write(out, xi[8:], append=True)
        elif spec.get("single"):
            out.write_bytes(vaestream.load(mdir).compress(xi[0]))
        else:
            out.write_bytes(vaestream.load(mdir).compress(xi))
        blob = out.read_bytes()
        if spec["coder"] in ("lossy", "lossy-file") or (spec["coder"] == "family" and not blob[3] & 2):
            c = open_stream(blob, mdir) if spec["coder"] == "family" else vaestream.load(mdir)
            codes, h = c.decompress_codes(blob)
            y = c.read(out) if spec["coder"] == "lossy-file" else c.decompress(blob)
            xs = xi[0] if spec.get("single") else xi
            assert (y == c.decode(c.encode(xs, h.quality), h.quality)).all(), name
            expected = {"output": y, "codes": codes}
            spec["exact"] = False
            spec["encoder_margin_ok"] = lossy_margin_ok(c, xs, h.quality)
        elif spec["coder"] == "per-record":
            y = open_stream(blob, mdir).decompress(blob)
            expected = {"output": y, "near_half": per_record_near_half(mdir, blob)}
            spec["exact"] = True
            notes.append(f"{int(expected['near_half'].sum())} values of lossy records within 1e-3 counts of .5")
        else:
            coder = open_stream(blob, mdir)
            y = coder.decompress(blob)
            levels = spec.get("levels")
            ref = near_lossless_reference(mdir, xi, spec)
            assert (y.reshape(N, -1) == ref.reshape(N, -1)).all(), name
            if not levels:
                assert (y.reshape(xi.shape) == xi).all(), name
            expected = {"output": y}
            spec["exact"] = True
        np.savez_compressed(streams_dir / (name + ".npz"), **expected)
        manifest.append({"name": name, "kind": kind, "file": rel_out, "model": model, "made_by": how,
                         "input": inp, "spec": spec, "bytes": len(blob), "sha256": sha256(out),
                         "expected": str((streams_dir / (name + ".npz")).relative_to(GOLDEN)),
                         "expected_sha256": sha256(streams_dir / (name + ".npz")), "notes": notes})
        print(f"{name}: {len(blob)} bytes", flush=True)
    files = sorted(p for p in (GOLDEN / "models").rglob("*") if p.is_file())
    doc = {"format": 1,
           "about": "golden streams written by the code of the commit below; tests/test_golden.py decodes them",
           "written_by": {"commit": os.environ.get("GOLDEN_CODE_COMMIT") or "working tree of " + subprocess.run(
                              ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
                          "python": platform.python_version(), "numpy": np.__version__, "tensorflow": tf.__version__,
                          "constriction": importlib.metadata.version("constriction"), "machine": platform.machine(),
                          "vaestream": str(Path(vaestream.__file__).parent)},
           "records": f"the first {N} images of the MNIST test set (t10k-images-idx3-ubyte), input.npy; "
                      "input_binary.npy = (input >= 128)",
           "inputs": {p: sha256(GOLDEN / p) for p in ("input.npy", "input_binary.npy")},
           "models": {m: {"made_by": [" ".join(["vaestream"] + c) for c in cmds]} for m, cmds in TRAINING.items()},
           "model_files": {str(p.relative_to(GOLDEN)): sha256(p) for p in files},
           "streams": manifest}
    (GOLDEN / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    print(f"total {total} bytes in {GOLDEN}")


def near_lossless_reference(mdir: Path, x: np.ndarray, spec: dict) -> np.ndarray:
    """What the encoder says the decoder returns: the records (lossless), their level image, or (mean / learned)
    the reconstruction computed while coding."""
    from vaestream.coding.bitsback.context import load_contexts
    from vaestream.coding.bitsback.coder import LosslessCoder
    from vaestream.store import load_model

    if not spec.get("levels"):
        return x
    d = GOLDEN / spec["member"] if spec["coder"] == "family" else mdir
    return LosslessCoder(load_model(d), levels=spec["levels"], reconstruction=spec.get("reconstruction") or "level",
                         contexts=load_contexts(d),
                         use_context=spec.get("use_context", True)).compress_and_reconstruct(x)[1]


if __name__ == "__main__":
    main()

"""``vaestream build-tables``, ``compress``, ``decompress`` and ``rd``: thin shells over
:mod:`vaestream.coding.codec`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vaestream.cli.console import show_progress


def _codec(a: argparse.Namespace, quality: float | None = None):
    from vaestream import data
    from vaestream.coding import codec

    calibration = None
    if getattr(a, "calibration", None):
        calibration = data.load_records(a.calibration, "train")
    return codec.load(a.model, calibration=calibration, quality=quality)


def cmd_build_tables(a: argparse.Namespace) -> int:
    """Derive the coder tables of a model from calibration records (MODEL_DIR/coder_tables.npz)."""
    from vaestream import data
    from vaestream.coding import codec

    records = data.load_records(a.data, a.split, key=a.key)[: a.n]
    path = codec.write_tables(a.model, records, model_kind=a.table_model, inactive_kl_bits=a.inactive_kl_bits)
    from vaestream.coding.tables import CoderTables

    t = CoderTables.load(path)
    print(json.dumps({"tables": str(path), "active_dims": int(t.active.sum()), "latent_dim": t.latent_dim,
                      "kl_bits_per_dim": [round(float(v), 3) for v in t.kl_bits],
                      "qualities": [float(q) for q in t.qualities]}))
    return 0


def _check_model_or_family(a: argparse.Namespace) -> None:
    from vaestream.errors import ConfigError

    if (a.model is None) == (getattr(a, "family", None) is None):
        raise ConfigError("give --model or --family")


def _compress_from_family(a: argparse.Namespace, records) -> int:
    """--family with --psnr / --bpp: the operating point of vaestream.coding.family, measured on the input
    (or on --select-on records), then compressed with that model and quality."""
    from vaestream import data
    from vaestream.coding import family
    from vaestream.errors import ConfigError

    if a.append or a.lossless or a.levels or a.quality is not None or a.target_bits is not None or (
            a.rdo_lmbda is not None):
        raise ConfigError("--family picks the model and quality itself: no --append, --lossless, --levels, "
                          "--quality, --target-bits, --rdo-lmbda (--rdo adds the RDO points to its choice)")
    if a.per_record:
        return _compress_per_record(a, records)
    probe = data.read_array(a.select_on, key=a.key) if a.select_on else records
    pick = family.choose(a.family, probe, psnr=a.psnr, bpp=a.bpp, rdo=a.rdo)
    blob = pick.compress(records)
    tmp = Path(str(a.output) + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(a.output)
    print(json.dumps({"output": str(a.output), "records": int(len(records)), "bytes": len(blob),
                      "bits_per_record": 8 * len(blob) / max(len(records), 1), "model": str(pick.model),
                      "lmbda": pick.lmbda, "quality": pick.quality, "rdo_lmbda": pick.rdo_lmbda,
                      "levels": pick.levels, "reconstruction": pick.reconstruction,
                      "selected_on": str(a.select_on) if a.select_on else "input",
                      "selection_psnr_db": pick.psnr_db,
                      "selection_bits_per_record": pick.bits_per_record}))
    return 0


def _compress_per_record(a: argparse.Namespace, records) -> int:
    """--family --per-record: each record at its own point of the family (vaestream.coding.per_record), one stream."""
    from vaestream.binio import atomic_write
    from vaestream.coding import per_record
    from vaestream.errors import ConfigError

    if a.select_on or a.rdo:
        raise ConfigError("--per-record chooses on the records themselves: no --select-on or --rdo")
    result = per_record.PerRecordCoder(a.family, psnr=a.psnr, bpp=a.bpp).encode(records)
    atomic_write(a.output, result.blob)
    print(json.dumps({"output": str(a.output), "records": int(len(records)), "bytes": len(result.blob),
                      "per_record": True, **result.summary()}))
    return 0


def cmd_compress(a: argparse.Namespace) -> int:
    """Compress the records of a data file into a vaestream container."""
    from vaestream import data
    from vaestream.errors import ConfigError

    _check_model_or_family(a)
    records = data.read_array(a.input, key=a.key)
    if getattr(a, "scale", None) is not None:  # --scale S: model inputs = values x S (float records)
        records = data.model_inputs(records, a.scale).reshape(records.shape)
    if a.family is not None:
        if a.psnr is None and a.bpp is None:
            raise ConfigError("--family needs a target: --psnr DB or --bpp BITS")
        return _compress_from_family(a, records)
    from vaestream.cli import learned

    if (a.psnr is not None or a.bpp is not None) and learned.is_learned_model(a.model):
        return learned.compress_to_target(a, records)  # the rate level meeting the target
    if a.psnr is not None or a.bpp is not None or a.select_on or a.rdo or a.per_record:
        raise ConfigError("--psnr, --bpp, --select-on, --rdo and --per-record choose among the models of a --family"
                          " (or, --psnr / --bpp / --select-on, among the rate levels of a learned entropy model)")
    if a.lossless or a.levels:
        if a.append or a.quality is not None or a.target_bits is not None or (a.lossless and a.levels) or (
                a.rdo_lmbda is not None):
            raise ConfigError("--lossless / --levels take no --append, --quality, --target-bits, --rdo-lmbda or each "
                              "other")
        coder = _bits_back_coder(a.model, a.levels, a.reconstruction, use_context=not a.no_context)
        blob = coder.compress(records)
        tmp = Path(str(a.output) + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(a.output)
        d = int(np.prod(records.shape[1:]))
        print(json.dumps({"output": str(a.output), "records": int(len(records)), "bytes": len(blob),
                          "bits_per_record": 8 * len(blob) / max(len(records), 1),
                          "bits_per_dim": 8 * len(blob) / max(len(records) * d, 1), "lossless": not a.levels,
                          "levels": a.levels or 256, "reconstruction": coder.reconstruction,
                          "max_error": coder.max_error, "context": coder.context is not None}))
        return 0
    c = _codec(a)
    if a.append:
        if a.target_bits is not None:
            from vaestream.errors import ConfigError

            raise ConfigError("--append takes --quality, not --target-bits")
        n = c.write(a.output, records, quality=a.quality, append=True, rdo_lmbda=a.rdo_lmbda,
                    rdo_steps=a.rdo_steps)
        size = Path(a.output).stat().st_size
        quality = c.ladder_quality(a.quality)
    else:
        blob = c.compress(records, quality=a.quality, target_bits=a.target_bits, rdo_lmbda=a.rdo_lmbda,
                          rdo_steps=a.rdo_steps)
        tmp = Path(str(a.output) + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(a.output)
        n, size = len(records), len(blob)
        from vaestream.coding.container import read_header
        import io

        quality = read_header(io.BytesIO(blob)).quality
    print(json.dumps({"output": str(a.output), "records": int(n), "bytes": int(size),
                      "bits_per_record": 8 * size / max(n, 1), "quality": float(quality), "rdo_lmbda": a.rdo_lmbda}))
    return 0


def _bits_back_coder(path: str, levels: int | None = None, reconstruction: str = "level", use_context: bool = True):
    """The bits-back coder of the model directory ``path`` (lossless, or near-lossless with ``levels``, with the
    directory's pixel context model for that K if it has one and ``use_context``); it needs no coder tables."""
    from vaestream.coding.family import bitsback_coder

    return bitsback_coder(path, levels, reconstruction, use_context=use_context)


def cmd_train_context(a: argparse.Namespace) -> int:
    """Train pixel context models for near-lossless bits-back coding (vaestream.coding.bitsback.context): one per K,
    for the frozen beta-binomial model in --model, written to MODEL_DIR/context/levels-K.npz. ``compress
    --levels K`` (and a family's near-lossless points) then code with it; decoders find it by the stream's
    fingerprint. Each also gets a reconstruction network (``--recon-epochs``, 0 for none), which ``compress
    --reconstruction learned`` decodes with."""
    from vaestream import data
    from vaestream.coder_training import context as context_training
    from vaestream.coding.bitsback import context as context_mod
    from vaestream.errors import ConfigError

    model = _bits_back_coder(a.model).model  # refuses what bits-back coding cannot take
    records = data.load_records(a.data, a.split, key=a.key)[: a.n]
    held = data.load_records(a.data, "test", key=a.key)[: a.held_out] if a.held_out else None
    for k in a.levels:
        t0 = time.time()
        if a.recon_only:  # the directory's context model for K, given a reconstruction network
            path = context_mod.context_path(a.model, k)
            if not path.is_file():
                raise ConfigError(f"--recon-only: {path} does not exist (train the context model first)")
            cm = context_mod.ContextModel.load(path)
        else:
            cm = context_training.train_context(model, records, k, window=a.window, hidden=tuple(a.hidden),
                                                epochs=a.epochs, learning_rate=a.learning_rate, seed=a.seed,
                                                held_out=held,
                                                log=lambda r, k=k: print(json.dumps({"levels": k, **r}), flush=True))
            cm.meta["train_seconds"] = round(time.time() - t0, 1)
        if a.recon_epochs:
            t0 = time.time()
            cm = context_training.train_reconstruction(
                model, records, cm, window=a.recon_window, hidden=tuple(a.recon_hidden), epochs=a.recon_epochs,
                seed=a.seed, held_out=held, log=lambda r, k=k: print(json.dumps({"levels": k, "recon": r}), flush=True))
            cm.meta["reconstruction"]["train_seconds"] = round(time.time() - t0, 1)
        path = cm.save(a.model)
        print(json.dumps({"levels": k, "context": str(path), "digest": cm.digest()[:16], **cm.meta}), flush=True)
    return 0


def cmd_train_joint(a: argparse.Namespace) -> int:
    """Fine-tune a bits-back member together with its pixel context model for one K (vaestream.coder_training.joint):
    the encoder, the decoder and the context network minimise the code length KL + the pixels' bits. Writes a
    new member to --out (config.json, ckpt/, context/levels-K.npz, joint.json); a family directory holding it
    measures and picks it like any member. Its reconstruction network (``--recon-epochs``, 0 for none) starts
    from the source's, if it has one."""
    from vaestream import data
    from vaestream.coder_training import context as context_training
    from vaestream.coder_training import joint as joint_training
    from vaestream.coding.bitsback import context as context_mod
    from vaestream.errors import ConfigError

    if (Path(a.out) / "config.json").exists():
        raise ConfigError(f"{a.out}: already a model directory; choose a new --out")
    model = _bits_back_coder(a.model).model
    path = context_mod.context_path(a.model, a.levels)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: train the context model for K = {a.levels} first "
                          "(vaestream train-context)")
    source = context_mod.ContextModel.load(path)
    records = data.load_records(a.data, a.split, key=a.key)[: a.n]
    held = data.load_records(a.data, "test", key=a.key)[: a.held_out] if a.held_out else None
    t0 = time.time()
    member, cm = joint_training.train_joint(model, records, source.without_reconstruction(), epochs=a.epochs,
                                            batch_size=a.batch_size, learning_rate=a.learning_rate, seed=a.seed,
                                            held_out=held, log=lambda r: print(json.dumps({"levels": a.levels, **r}),
                                                                               flush=True))
    cm.meta["train_seconds"] = round(time.time() - t0, 1)
    if a.recon_epochs:
        t0 = time.time()
        init = source if source.has_reconstruction else None
        cm = context_training.train_reconstruction(
            member, records, cm, window=init.recon_window if init else context_mod.DEFAULT_RECON_WINDOW,
            hidden=tuple(w.shape[1] for w, _ in init.recon[:-1]) if init else context_mod.DEFAULT_RECON_HIDDEN,
            epochs=a.recon_epochs, seed=a.seed, held_out=held, init=init,
            log=lambda r: print(json.dumps({"levels": a.levels, "recon": r}), flush=True))
        cm.meta["reconstruction"]["train_seconds"] = round(time.time() - t0, 1)
    out = joint_training.save_member(a.out, member, cm,
                                     {"source": str(a.model), "data": a.data, "n": int(len(records))})
    print(json.dumps({"levels": a.levels, "member": str(out), "fingerprint": member.fingerprint()[:16],
                      "digest": cm.digest()[:16], **cm.meta}), flush=True)
    return 0


def _records_arg(a: argparse.Namespace):
    """--records I or I:J -> an index, a slice or None."""
    if not a.records:
        return None
    from vaestream.errors import DataError

    lo, sep, hi = a.records.partition(":")
    try:
        return slice(int(lo) if lo else None, int(hi) if hi else None) if sep else int(lo)
    except ValueError:
        raise DataError(f"--records {a.records!r}: expected I or I:J") from None


def cmd_decompress(a: argparse.Namespace) -> int:
    """Decompress a vaestream stream into a .npy of records (and optionally a PNG grid): the decoder is the one
    its head names (vaestream.coding.open_stream: lossy, bits-back with its context models, per-record)."""
    from vaestream.coding import codec as codec_mod
    from vaestream.coding.streams import open_stream, stream_kind
    from vaestream.errors import ConfigError

    _check_model_or_family(a)
    records = _records_arg(a)
    kind = stream_kind(a.input)
    if kind == "per_record" and a.family is None:
        raise ConfigError(f"{a.input}: a per-record stream of several models: decode it with --family")
    c = open_stream(a.input, a.model if a.family is None else a.family)
    from vaestream.coding.learned import LearnedCodec

    learned = isinstance(c, LearnedCodec)  # records of the stream's shape (a conv model codes other sizes too)
    if not isinstance(c, codec_mod.Codec) and not learned:
        # exact records / level images / per-record counts (uint8, their shape)
        if records is not None:
            raise ConfigError("--records: a lossless, near-lossless or per-record stream decodes whole")
        x = c.decompress(Path(a.input).read_bytes(), name=a.input)
        np.save(a.output, x)
        print(json.dumps({"output": str(a.output), "records": int(len(x)), "shape": list(x.shape),
                          "dtype": str(x.dtype), **({"per_record": True} if kind == "per_record" else
                                                    {"lossless": True})}))
        return 0
    x_hat = c.read(a.input, records)
    out = Path(a.output)
    shape = c.stream_shape(a.input) if learned else tuple(c.config.input_shape)
    x_img = x_hat.reshape((-1,) + shape) if x_hat.ndim == 2 else x_hat.reshape(shape)
    np.save(out, x_img.astype(np.float32))
    if a.png:
        _grid_png(x_hat.reshape(-1, int(np.prod(shape))), shape, a.png)
    print(json.dumps({"output": str(out), "records": int(len(np.atleast_2d(x_hat))),
                      "shape": list(x_img.shape)}))
    return 0


def _grid_png(x: np.ndarray, shape, path: str, max_images: int = 400) -> None:
    from PIL import Image

    if len(shape) != 2:
        return
    h, w = shape
    x = x[:max_images]
    cols = int(np.ceil(np.sqrt(len(x))))
    rows = int(np.ceil(len(x) / cols))
    grid = np.zeros((rows * h, cols * w), np.float32)
    for i, img in enumerate(x):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img.reshape(h, w)
    Image.fromarray((np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


def rate_distortion(codec, x: np.ndarray, qualities=None, progress: bool = False) -> list[dict]:
    """For each quality: bits/record of the container, ideal bits, KL bits, MSE and PSNR (data in [0, 1]).

    ``x`` is ``[N, D]`` float32 model inputs in [0, 1]; ``progress``: a bar over the qualities on stderr. A model
    with a learned entropy model (:class:`vaestream.coding.learned.LearnedCodec`, ``x`` its pictures): each rate
    level's container bits, ideal and side-stream bits, MSE and PSNR of the decoded stream.
    """
    from vaestream.coding.learned import LearnedCodec

    if isinstance(codec, LearnedCodec):
        return _rate_distortion_learned(codec, x, qualities)
    kl = float(np.mean(codec.kl_bits(x)))
    mean, _ = codec.posterior(x)
    rows = []
    from tqdm.auto import tqdm

    from vaestream.coding.tables import quantize

    for q in tqdm(qualities or codec.qualities, desc="rd", unit="quality", disable=not progress, dynamic_ncols=True):
        blob = codec.compress(x, quality=q)
        codes = quantize(mean, codec.tables, q)
        x_hat = codec.decode(codes, q)
        mse = float(np.mean((x - x_hat) ** 2))
        rows.append({"quality": float(q), "bits_per_record": 8 * len(blob) / len(x),
                     "ideal_bits_per_record": float(np.mean(codec.ideal_bits(codes, q))),
                     "kl_bits_per_record": kl, "mse": mse,
                     "psnr_db": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")})
    return rows


def _rate_distortion_learned(codec, x: np.ndarray, qualities=None) -> list[dict]:
    rows = []
    for q in qualities or codec.qualities:
        blob = codec.compress(x, quality=q)
        mse = float(np.mean((x.reshape(len(x), -1) - codec.decompress(blob)) ** 2))
        ideal, side = codec.bits(x, quality=q, side=True)
        rows.append({"quality": float(q), "lmbda": codec.config.rd_lambdas[codec.level(q)],
                     "bits_per_record": 8 * len(blob) / len(x), "ideal_bits_per_record": float(np.mean(ideal)),
                     "side_bits_per_record": float(np.mean(side)), "kl_bits_per_record": None, "mse": mse,
                     "psnr_db": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")})
    return rows


def _rd_family(a: argparse.Namespace) -> int:
    """``vaestream rd FAMILY``: the family's envelope vs the Pillow peers, BD-rates, one plot."""
    from vaestream import data
    from vaestream.evaluation import rdcurve

    records = data.load_records(a.data, a.split, key=a.key)[: a.n]
    if records.ndim == 2:  # flat records: the pictures' shape is the family's
        from vaestream.coding.family import members
        from vaestream.store import read_config

        records = records.reshape((len(records),) + tuple(read_config(members(a.family)[0]).input_shape))
    result = rdcurve.compare(a.family, records, formats=[f.upper() for f in a.peers], per_image_n=a.per_image_n,
                             rdo=a.rdo, per_record=a.per_record or ())
    if a.plot:
        result["plot"] = str(rdcurve.plot(result, a.plot, f"{Path(a.family).name}: {len(records)} records of {a.data}"))
    print(json.dumps({"family": str(a.family), "data": str(a.data), **result}, indent=1, default=str))
    return 0


def cmd_rd(a: argparse.Namespace) -> int:
    """Rate-distortion sweep over the quality ladder on a data set; JSON to stdout, optional PNG plot. With a
    FAMILY directory: every model of it against JPEG, WebP, AVIF and JPEG XL, with BD-rates."""
    from vaestream import data

    if a.family is not None:
        return _rd_family(a)
    if a.model is None:
        from vaestream.errors import ConfigError

        raise ConfigError("give a FAMILY directory or --model")
    c = _codec(a)
    records = data.load_records(a.data, a.split, key=a.key)[: a.n]
    x, _ = c.model_inputs(records, str(a.data))
    rows = rate_distortion(c, x, a.qualities, progress=show_progress(a))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["bits_per_record"] for r in rows], [r["psnr_db"] for r in rows], "o-", label="vaestream")
        if rows[0]["kl_bits_per_record"] is not None:
            ax.axvline(rows[0]["kl_bits_per_record"], ls=":", c="grey", label="mean KL(q||p)")
        ax.set_xscale("log")
        ax.set_xlabel("bits per record")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"rate-distortion, {len(x)} records of {a.data}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        plt.close(fig)
    print(json.dumps({"model": str(a.model), "data": str(a.data), "records": len(x), "rd": rows}, indent=1))
    return 0


def _model_and_records(p, model_help: str, data_help: str) -> None:
    """--model, and the records a command learns from: --data, --split (train), --key, --n (20000)."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--data", required=True, help=f"{data_help}: 'fashion-mnist', an MNIST-layout dir, a file")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="the split of a data set with two (default train)")
    p.add_argument("--key", default=None, help="array name in .npz / variable in .mat")
    p.add_argument("--n", type=int, default=20000, help="use the first N records (default 20000)")


def _add_build_tables(sub) -> None:
    """The ``build-tables`` sub-command's parser."""
    p = sub.add_parser("build-tables", help="derive a model's coder tables from calibration records",
                       description=cmd_build_tables.__doc__)
    _model_and_records(p, "model directory", "calibration records")
    p.add_argument("--table-model", choices=["aggregate", "prior"], default="aggregate",
                   help="probability model: KDE of the calibration posterior means (default) or N(0, 1)")
    p.add_argument("--inactive-kl-bits", type=float, default=0.1,
                   help="dimensions with mean KL below this many bits are not coded (default 0.1)")
    p.set_defaults(func=cmd_build_tables)


def _add_compress(sub) -> None:
    """The ``compress`` sub-command's parser."""
    from vaestream.coding import rdo
    from vaestream.coding.bitsback.coder import RECONSTRUCTIONS

    p = sub.add_parser("compress", help="compress a data file into a vaestream container",
                       description=cmd_compress.__doc__)
    p.add_argument("input", help="records: IDX, .npy, .npz, .csv, .mat")
    p.add_argument("output", help="the container file")
    p.add_argument("--model", default=None, help="model directory or SavedModel export")
    p.add_argument("--family", default=None,
                   help="a directory of model directories (e.g. one per lambda): with --psnr or --bpp, the model and "
                        "quality are picked (vaestream.coding.family)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quality", type=float, default=None,
                   help="bin width in posterior stds (default 1.0); a model with a learned entropy model: the quality "
                        "2^(k/2) of its rate level k (lambdas largest first; default level 0)")
    g.add_argument("--target-bits", type=float, default=None, help="bits per record to fit in")
    g.add_argument("--psnr", type=float, default=None, help="with --family (or a model with a learned entropy "
                   "model: its rate levels): the fewest bits with at least this PSNR")
    g.add_argument("--bpp", type=float, default=None,
                   help="with --family (or a learned entropy model): the best PSNR within this many bits per value")
    p.add_argument("--select-on", default=None,
                   help="with --psnr / --bpp: measure the operating points on these held-back records, not the input")
    p.add_argument("--rdo-lmbda", type=float, default=None,
                   help="rate-distortion optimised quantisation: each record's codes chosen for bits + L * MSE "
                        "(L in the training lambda's units; e.g. the model's lmbda) by a search through the decoder; "
                        "an ordinary stream, ~20x slower to encode (vaestream.coding.rdo)")
    p.add_argument("--rdo-steps", type=int, default=rdo.DEFAULT_STEPS,
                   help=f"with --rdo-lmbda: Adam steps of the search (default {rdo.DEFAULT_STEPS})")
    p.add_argument("--rdo", action="store_true",
                   help="with --family: the members' rate-distortion optimised points are candidates too")
    p.add_argument("--per-record", action="store_true",
                   help="with --family and --psnr / --bpp: each record at its own operating point (bits + lambda "
                        "squared error), one stream of per-model streams (vaestream.coding.per_record)")
    p.add_argument("--append", action="store_true", help="append to an existing container")
    p.add_argument("--lossless", action="store_true",
                   help="exact bits-back coding (a beta_binomial or bernoulli model; records as stored)")
    p.add_argument("--levels", type=int, default=None,
                   help="near-lossless bits-back coding (a beta_binomial model; 8-bit records): each pixel rounded to "
                        "the nearest of K = 2..64 levels, every pixel within 255 / (2 (K - 1)) of its value")
    p.add_argument("--reconstruction", choices=list(RECONSTRUCTIONS), default="level",
                   help="with --levels: decode a pixel as its level (the bound above), as E[count | level, z] under "
                        "the model, or by the context model's reconstruction network from its neighbourhood (more "
                        "PSNR at the same bits each; both within the level's counts)")
    p.add_argument("--no-context", action="store_true",
                   help="with --levels: code pixels independently given z even where the model directory has a pixel "
                        "context model for K (vaestream train-context)")
    p.add_argument("--calibration", default=None, help="records to build missing coder tables from")
    p.add_argument("--key", default=None, help="array name in .npz / variable in .mat")
    from vaestream.beam.jobs.options import add_scale_argument

    add_scale_argument(p)
    p.set_defaults(func=cmd_compress)


def _add_train_context(sub) -> None:
    """The ``train-context`` sub-command's parser."""
    from vaestream.coding.bitsback import context as context_mod

    p = sub.add_parser("train-context", help="train pixel context models for near-lossless bits-back coding",
                       description=cmd_train_context.__doc__)
    _model_and_records(p, "a beta_binomial bits-back model directory", "8-bit pictures")
    p.add_argument("--levels", type=int, nargs="+", required=True, help="one context model per K")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each context model (default %(default)s)")
    p.add_argument("--window", type=int, default=context_mod.DEFAULT_WINDOW,
                   help="the context square's side (odd; default %(default)s)")
    p.add_argument("--hidden", type=int, nargs="+", default=list(context_mod.DEFAULT_HIDDEN),
                   help="hidden widths of the context network (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=2e-3,
                   help="Adam step size, decayed 10x over the run (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and minibatches (default 0)")
    p.add_argument("--held-out", type=int, default=0,
                   help="measure bits per record on the first N test records after each epoch (default 0: none)")
    p.add_argument("--recon-epochs", type=int, default=4,
                   help="epochs of the reconstruction network (reconstruction 'learned'); 0: none")
    p.add_argument("--recon-window", type=int, default=context_mod.DEFAULT_RECON_WINDOW,
                   help="the reconstruction network's square side (odd; default %(default)s)")
    p.add_argument("--recon-hidden", type=int, nargs="+", default=list(context_mod.DEFAULT_RECON_HIDDEN),
                   help="hidden widths of the reconstruction network (default %(default)s)")
    p.add_argument("--recon-only", action="store_true",
                   help="keep the directory's context models for these K and train only their reconstruction networks "
                        "(streams coded before stay decodable, except 'learned' ones, which name the old network)")
    p.set_defaults(func=cmd_train_context)


def _add_train_joint(sub) -> None:
    """The ``train-joint`` sub-command's parser."""
    p = sub.add_parser("train-joint", help="fine-tune a bits-back member with its pixel context model for one K",
                       description=cmd_train_joint.__doc__)
    _model_and_records(p, "a beta_binomial bits-back model directory with a context model for --levels",
                       "8-bit pictures")
    p.add_argument("--levels", type=int, required=True, help="the K whose context model is fine-tuned with it")
    p.add_argument("--out", required=True, help="the new member's directory (e.g. FAMILY/bitsback-k3)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of fine-tuning (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="pictures per minibatch (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=3e-4, help="Adam step size (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the minibatches (default 0)")
    p.add_argument("--held-out", type=int, default=0,
                   help="measure bits per record on the first N test records before and after each epoch")
    p.add_argument("--recon-epochs", type=int, default=2,
                   help="epochs of the new member's reconstruction network (from the source's); 0: none")
    p.set_defaults(func=cmd_train_joint)


def _add_decompress(sub) -> None:
    """The ``decompress`` sub-command's parser."""
    p = sub.add_parser("decompress", help="decompress a vaestream container into .npy",
                       description=cmd_decompress.__doc__)
    p.add_argument("input", help="a vaestream container (compress's output)")
    p.add_argument("output", help=".npy of reconstructions, shaped like the records")
    p.add_argument("--model", default=None,
                   help="the model directory or SavedModel export that wrote the stream (or --family)")
    p.add_argument("--family", default=None, help="the family directory the stream was written from (--family)")
    p.add_argument("--records", default=None, help="I or I:J: only these records (random access)")
    p.add_argument("--png", default=None, help="also write a grid of (up to 400) reconstructions")
    p.set_defaults(func=cmd_decompress)


def _add_rd(sub) -> None:
    """The ``rd`` sub-command's parser."""
    p = sub.add_parser("rd", help="rate-distortion sweep (JSON to stdout, PNG plot)", description=cmd_rd.__doc__)
    p.add_argument("family", nargs="?", default=None,
                   help="a family directory: its curve against the peer codecs, with BD-rates")
    p.add_argument("--model", default=None, help="a model directory: its sweep over the quality ladder")
    p.add_argument("--peers", nargs="+", default=["jpeg", "webp", "avif", "jxl"],
                   help="with FAMILY: peer codecs (Pillow; jxl needs pillow-jxl-plugin)")
    p.add_argument("--per-image-n", type=int, default=200, help="with FAMILY: records for the per-image peers")
    p.add_argument("--rdo", action="store_true",
                   help="with FAMILY: with the lossy members' rate-distortion optimised points (vaestream.coding.rdo)")
    p.add_argument("--per-record", type=float, nargs="+", default=None, metavar="PSNR",
                   help="with FAMILY: also code each record at its own point, at these PSNR targets "
                        "(vaestream.coding.per_record; what compress --per-record does)")
    p.add_argument("--data", required=True, help="'fashion-mnist', an MNIST-layout directory, a file")
    p.add_argument("--split", choices=["train", "test"], default="test",
                   help="the split of a data set with two (default test)")
    p.add_argument("--key", default=None, help="array name in .npz / variable in .mat")
    p.add_argument("--n", type=int, default=1000, help="use the first N records (default 1000)")
    p.add_argument("--qualities", type=float, nargs="+", default=None, help="default: the whole ladder")
    p.add_argument("--calibration", default=None, help="records to build missing coder tables from")
    p.add_argument("--plot", default=None, help="PNG of PSNR vs bits per record")
    p.set_defaults(func=cmd_rd)


def add_subcommands(sub) -> None:
    """The coder's sub-commands: build-tables, compress, train-context, train-joint, decompress, rd."""
    _add_build_tables(sub)
    _add_compress(sub)
    _add_train_context(sub)
    _add_train_joint(sub)
    _add_decompress(sub)
    _add_rd(sub)

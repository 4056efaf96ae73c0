"""A model with a learned entropy model in the rest of the toolkit, on conftest's tiny mean-scale hyperprior model
trained on real MNIST: exports published through an ExportCache (each version a full save, loaded in a fresh
process), ``vaestream.load`` / ``open_stream`` and the Beam jobs refusing its export with the directory named and
the model directory asked for, and ``vaestream compress --psnr / --bpp`` picking its rate level."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest


@pytest.fixture(scope="module")
def codec(hyperprior_trained):
    import vaestream

    return vaestream.load(hyperprior_trained[0], frame_records=64)


@pytest.fixture(scope="module")
def published(hyperprior_trained, tmp_path_factory):
    """(export base, [version paths]): the in-memory model exported through one ExportCache at rate level 0, then
    level 2, then level 2 again with ``skip_unchanged``."""
    from vaestream.coding.learned import level_quality
    from vaestream.serving.export import ExportCache, export_model
    from vaestream.store import load_model

    model_dir = hyperprior_trained[0]
    model, cache = load_model(model_dir), ExportCache()
    base = tmp_path_factory.mktemp("learned_exports") / "base"
    paths = [export_model(model, base, cache=cache, quality=level_quality(k), source=str(model_dir), **kw)
             for k, kw in ((0, {}), (2, {}), (2, {"skip_unchanged": True}))]
    return base, paths


def _psnr(x: np.ndarray, x_hat: np.ndarray) -> float:
    mse = float(np.mean((x.reshape(len(x), -1).astype(np.float64) / 255.0 - x_hat.reshape(len(x), -1)) ** 2))
    return 10 * np.log10(1.0 / mse)


# -- the export cache --------------------------------------------------------------------------------------------
def test_export_cache_publishes_learned_versions(hyperprior_trained, codec, published, tmp_path):
    """Versions published through an ExportCache (the online learner's path) are full exports at their levels:
    loaded in a fresh process, each version's ``reconstruct`` gives the float32 bits of the codec's decompress at
    its level; an unchanged one is not written twice."""
    base, paths = published
    assert [p.name for p in paths] == ["1", "2", "2"] and sorted(p.name for p in base.iterdir()) == ["1", "2"]
    x = hyperprior_trained[1][:40]
    np.save(tmp_path / "x.npy", x.reshape(len(x), -1).astype(np.float32) * np.float32(1 / 255))  # as the codec
    code = ("import sys, json, numpy as np; from vaestream.serving.export import ExportedModel; "
            "x = np.load(sys.argv[1]); out = {}\n"
            "for p in sys.argv[2:]:\n"
            "    m = ExportedModel(p); np.save(p + '.npy', m.reconstruct(x)); out[p] = m.info\n"
            "print(json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy")] + [str(p) for p in paths[:2]],
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    for level, p in zip((0, 2), paths[:2]):
        assert info[str(p)]["level"] == level and info[str(p)]["fingerprint"] == codec.fingerprint
        want = codec.decompress(codec.compress(x, quality=codec.qualities[level]))
        got = np.load(str(p) + ".npy")
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), level


# -- vaestream.load and open_stream on the export -----------------------------------------------------------------
def test_load_refuses_learned_export(hyperprior_trained, codec, published, tmp_path, capsys):
    """``vaestream.load``, ``open_stream`` and ``vaestream decompress --model`` on the export (a version directory)
    raise a ModelError naming it, its rate level and the model directory to use instead."""
    import vaestream
    from vaestream.cli import main
    from vaestream.errors import ModelError

    version = published[1][0]
    with pytest.raises(ModelError) as e:
        vaestream.load(version)
    msg = str(e.value)
    assert msg.startswith(str(version)) and "learned entropy model (hyperprior, rate level 0" in msg
    assert "vaestream.load(MODEL_DIR)" in msg and "quantize / decode / reconstruct" in msg
    blob = codec.compress(hyperprior_trained[1][:10], quality=codec.qualities[0])
    with pytest.raises(ModelError, match="learned entropy model"):
        vaestream.open_stream(blob, version)
    (tmp_path / "x.vz").write_bytes(blob)
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "x.vz"), str(tmp_path / "y.npy"), "--model", str(version)]) == 1
    assert "--model MODEL_DIR" in capsys.readouterr().err and not (tmp_path / "y.npy").exists()


# -- the Beam jobs ----------------------------------------------------------------------------------------------
def test_beam_jobs_refuse_learned_saved_model(hyperprior_trained, published, tmp_path):
    """The encode job (with or without ``--coder``) and the decode job given ``--saved_model`` of the export are
    refused with a ConfigError asking for ``--model``, before any record or code is read (the decode job's input
    does not even exist) and with no output written; a pipeline's own model handler refuses it too."""
    from vaestream import beam as vb
    from vaestream.beam.jobs import decode, encode
    from vaestream.errors import ConfigError, ModelError

    base = published[0]
    np.save(tmp_path / "x.npy", hyperprior_trained[1][:8])
    for extra in ([], ["--coder"]):
        with pytest.raises(ConfigError, match=r"learned entropy model \(hyperprior\).*needs --model MODEL_DIR"):
            encode.run(["--input", str(tmp_path / "x.npy"), "--saved_model", str(base), "--output",
                        str(tmp_path / "codes")] + extra)
    with pytest.raises(ConfigError, match="the decode job .* needs --model MODEL_DIR"):
        decode.run(["--input", str(tmp_path / "no-codes"), "--saved_model", str(base), "--output",
                    str(tmp_path / "recon")])
    assert not (tmp_path / "codes").exists() and not (tmp_path / "recon").exists()
    with pytest.raises(ModelError, match="learned entropy model.*--model MODEL_DIR"):  # a pipeline's own handler
        vb.LoadedVAE.load(None, str(base))


# -- compress --psnr / --bpp --------------------------------------------------------------------------------------
def test_compress_psnr_bpp_picks_rate_level(hyperprior_trained, tmp_path, capsys):
    """``vaestream compress --model MODEL_DIR --psnr T`` writes the stream of the rate level with the fewest bits
    reaching T dB on the input (the bytes ``compress`` gives at that level), ``--bpp B`` the one with the best PSNR
    within B bits per pixel, ``--select-on`` measures on other records; a target no level meets exits 1 naming
    the best level."""
    from vaestream.cli import main
    from vaestream.coding.container import read_header

    import vaestream

    c = vaestream.load(hyperprior_trained[0])  # the command's frames (1024 records)
    x, held = hyperprior_trained[1][:100], hyperprior_trained[1][100:200]
    np.save(tmp_path / "x.npy", x)
    blobs = [c.compress(x, quality=q) for q in c.qualities]
    psnr = [_psnr(x, c.decompress(b)) for b in blobs]
    bits = [8 * len(b) / len(x) for b in blobs]
    assert psnr[0] > psnr[1] > psnr[2] and bits[0] > bits[1] > bits[2], (psnr, bits)

    def run(*flags) -> dict:
        capsys.readouterr()
        assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.vz"), "--model",
                     str(hyperprior_trained[0]), *flags]) == 0
        return json.loads(capsys.readouterr().out)

    out = run("--psnr", str((psnr[1] + psnr[2]) / 2))
    assert out["level"] == 1 and out["selection_psnr_db"] == pytest.approx(psnr[1])
    assert (tmp_path / "x.vz").read_bytes() == blobs[1]
    out = run("--psnr", str(psnr[2] - 0.01))
    assert out["level"] == 2 and (tmp_path / "x.vz").read_bytes() == blobs[2]
    out = run("--bpp", str(bits[1] / 784 * 1.0001))
    assert out["level"] == 1 and out["bits_per_record"] == bits[1]
    assert read_header(io.BytesIO((tmp_path / "x.vz").read_bytes())).quality == c.qualities[1]
    np.save(tmp_path / "held.npy", held)
    held_psnr = [_psnr(held, c.decompress(c.compress(held, quality=q))) for q in c.qualities]
    target = (held_psnr[0] + held_psnr[1]) / 2
    out = run("--psnr", str(target), "--select-on", str(tmp_path / "held.npy"))
    assert out["selected_on"] == str(tmp_path / "held.npy") and out["level"] == 0
    assert out["selection_psnr_db"] == pytest.approx(held_psnr[0]) and (tmp_path / "x.vz").read_bytes() == blobs[0]
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "y.vz"), "--model", str(hyperprior_trained[0]),
                 "--psnr", str(psnr[0] + 20)]) == 1
    assert "no rate level" in capsys.readouterr().err and not Path(tmp_path / "y.vz").exists()

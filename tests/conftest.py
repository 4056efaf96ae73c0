"""Shared fixtures: the real data sets and one small model trained once per session on real MNIST."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"


def _fashion_dirs() -> list[Path]:
    """Where vaestream looks for Fashion-MNIST (as ``vaestream.data.fashion_mnist_dirs``): ``$VAESTREAM_DATA``,
    Debian's package, then the user data directory that ``scripts/setup.sh`` fills without root."""
    user = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "vaestream"
    dirs = [Path(os.environ["VAESTREAM_DATA"]) / "fashion-mnist"] if os.environ.get("VAESTREAM_DATA") else []
    return dirs + [Path("/usr/share/datasets/fashion-mnist"), user / "fashion-mnist"]


FASHION_DIRS = _fashion_dirs()
FASHION_DIR = next((d for d in FASHION_DIRS if (d / "train-images-idx3-ubyte.gz").exists()), FASHION_DIRS[-1])


# The order in which modules are handed to pytest-xdist's workers (``.ci/run``: ``-n 2 --dist loadfile
# --no-loadscope-reorder``), heaviest first so that both workers finish together; each module stays on one worker,
# so its module and session fixtures are built once. The scheduler queues the third module behind the first, so
# a light one goes there. Modules not listed run after these, in collection order.
MODULE_ORDER = (
    "test_readme", "test_pipelines", "test_data", "test_determinism", "test_training", "test_distributed",
    "test_near_lossless", "test_broker", "test_cli", "test_cli_quiet", "test_serve", "test_mixed", "test_bb_context",
    "test_bb_joint", "test_dask", "test_online", "test_lossless", "test_export", "test_open_stream", "test_rd",
    "test_golden", "test_lossless_two_layer", "test_objective", "test_streaming", "test_rdo", "test_codec",
    "test_registry", "test_codecs", "test_shards", "test_layout", "test_coder", "test_container",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Modules in :data:`MODULE_ORDER`, each module's tests in their own order."""
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.path.stem, i)
    items.sort(key=lambda it: (rank.get(it.path.stem, len(rank)), first[it.path.stem]))


def pytest_terminal_summary(terminalreporter) -> None:
    """The executed README's block counts (``test_readme``'s ``readme_blocks`` property), also from xdist workers."""
    shown = set()
    for rep in terminalreporter.getreports("passed") + terminalreporter.getreports("failed"):
        for key, value in getattr(rep, "user_properties", ()):
            if key == "readme_blocks" and rep.when == "call" and rep.nodeid not in shown:
                shown.add(rep.nodeid)
                terminalreporter.write_line(f"README.md blocks: {value}")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {MNIST_DIR} (the repository's ../shared/data/mnist)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {', '.join(map(str, FASHION_DIRS))}: run scripts/setup.sh")
    return FASHION_DIR


@pytest.fixture(scope="session")
def mnist_train(mnist_dir) -> np.ndarray:
    from vaestream.data import read_idx

    return read_idx(mnist_dir / "train-images-idx3-ubyte.gz")


@pytest.fixture(scope="session")
def mnist_test(mnist_dir) -> np.ndarray:
    from vaestream.data import read_idx

    return read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, mnist_train, mnist_test):
    """A 784-200-10 Bernoulli VAE trained for 3 epochs on real MNIST (a few seconds)."""
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.data import make_dataset

    out = tmp_path_factory.mktemp("small_model")
    ds = make_dataset(mnist_train, "bernoulli", "mnist-train")
    test = make_dataset(mnist_test[:2000], "bernoulli", "mnist-test")
    res = train(ds, out, ModelConfig(latent_dim=10, hidden=(200,)), TrainConfig(epochs=3, seed=1),
                test_data=test, progress=False)
    return res


@pytest.fixture(scope="session")
def coded_model_dir(small_model, mnist_train, tmp_path_factory) -> Path:
    """A copy of the session's small model with coder tables built from 10k training records."""
    import shutil

    from vaestream.coding import codec

    d = tmp_path_factory.mktemp("coded") / "model"
    shutil.copytree(small_model.model_dir, d)
    codec.write_tables(d, mnist_train[:10000])
    return d


@pytest.fixture(scope="session")
def coded_spatial_model_dir(tmp_path_factory, mnist_train) -> Path:
    """A small convolutional rate-distortion model with a *spatial* latent and GDN (4 maps over the 7 x 7 grid: Nz =
    196, no dense layers), 120 steps on real MNIST, with coder tables."""
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.coding import codec
    from vaestream.data import make_dataset

    d = tmp_path_factory.mktemp("spatial") / "model"
    cfg = ModelConfig(latent_dim=7 * 7 * 4, hidden=(), activation="gdn", likelihood="gaussian_sigmoid", arch="conv",
                      channels=(8, 16), latent_channels=4, lmbda=1000.0)
    train(make_dataset(mnist_train[:12000], "gaussian_sigmoid", "mnist-train"), d, cfg,
          TrainConfig(steps=120, objective="rd", seed=3), progress=False)
    codec.write_tables(d, mnist_train[:5000])
    return d


@pytest.fixture(scope="session")
def coded_conv_model_dir(tmp_path_factory, mnist_train) -> Path:
    """A small convolutional (arch="conv") rate-distortion model, 120 steps on real MNIST, with coder tables."""
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.coding import codec
    from vaestream.data import make_dataset

    d = tmp_path_factory.mktemp("conv") / "model"
    cfg = ModelConfig(latent_dim=16, hidden=(128,), activation="elu", likelihood="gaussian_sigmoid", arch="conv",
                      channels=(8, 16), lmbda=1000.0)
    train(make_dataset(mnist_train[:12000], "gaussian_sigmoid", "mnist-train"), d, cfg,
          TrainConfig(steps=120, objective="rd", seed=3), progress=False)
    codec.write_tables(d, mnist_train[:5000])
    return d


def _train_discrete(tmp_path_factory, records, likelihood: str, binarize: str = "none", steps: int = 400):
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.data import make_dataset

    out = tmp_path_factory.mktemp(f"lossless_{likelihood}")
    ds = make_dataset(records, likelihood, "mnist-train", binarize=binarize)
    res = train(ds, out, ModelConfig(latent_dim=10, hidden=(200,), likelihood=likelihood),
                TrainConfig(steps=steps, seed=3), progress=False)
    return res.model, out


@pytest.fixture(scope="session")
def bb_model(tmp_path_factory, mnist_train):
    """A 784-200-10 beta-binomial VAE trained for 400 steps on the real MNIST training images."""
    return _train_discrete(tmp_path_factory, mnist_train, "beta_binomial")


@pytest.fixture(scope="session")
def bern_model(tmp_path_factory, mnist_train):
    """A 784-200-10 Bernoulli VAE trained for 400 steps on statically binarised MNIST."""
    return _train_discrete(tmp_path_factory, mnist_train[:30000], "bernoulli", binarize="static")


@pytest.fixture(scope="session")
def ctx_member(bb_model, mnist_train, mnist_test, tmp_path_factory):
    """The session's beta-binomial model (bb_model) copied to a member directory, with a context model for K = 4 trained
    on 3,000 real MNIST training images (2 epochs, a 5 x 5 window), measured on 300 test images."""
    import shutil

    from vaestream.coder_training import context as context_training

    model, src = bb_model
    d = tmp_path_factory.mktemp("ctx") / "bitsback"
    shutil.copytree(src, d)
    cm = context_training.train_context(model, mnist_train[:3000], 4, window=5, hidden=(32, 32), epochs=2,
                                        held_out=mnist_test[:300], seed=1)
    cm.save(d)
    return model, d, cm


@pytest.fixture(scope="session")
def recon_member(ctx_member, mnist_train, mnist_test, tmp_path_factory):
    """``ctx_member``'s context model with a reconstruction network (5 x 5 window, 16 units, 2 epochs on 3,000
    real MNIST training images), in a member directory of its own."""
    import shutil

    from vaestream.coder_training import context as context_training

    model, src, cm = ctx_member
    d = tmp_path_factory.mktemp("recon") / "bitsback"
    shutil.copytree(src, d)
    rc = context_training.train_reconstruction(model, mnist_train[3000:6000], cm, window=5, hidden=(16,),
                                               epochs=2, held_out=mnist_test[:300], seed=2)
    rc.save(d)
    return model, d, rc


HYPERPRIOR_LAMBDAS = (3e4, 3e3, 3e2)
"""The rate levels of :func:`hyperprior_trained`'s model (tests/test_hyperprior.py's ``LAMBDAS``)."""


@pytest.fixture(scope="session")
def hyperprior_trained(mnist_dir, tmp_path_factory):
    """(model dir, 300 MNIST test records): a tiny variable-rate mean-scale hyperprior model (conv 16-32, 8 latent
    channels, lambdas :data:`HYPERPRIOR_LAMBDAS`) trained 300 steps on 6,000 real MNIST training records, shared
    by the learned entropy model's test modules (test_hyperprior, test_learned_integration)."""
    from vaestream import ModelConfig
    from vaestream.data import load_records, make_dataset
    from vaestream.training import TrainConfig, train

    config = ModelConfig(input_dim=784, input_shape=(28, 28), latent_dim=7 * 7 * 8, hidden=(), activation="relu",
                         likelihood="gaussian", arch="conv", channels=(16, 32), latent_channels=8,
                         entropy_model="hyperprior", rd_lambdas=HYPERPRIOR_LAMBDAS)
    d = tmp_path_factory.mktemp("hyper") / "model"
    ds = make_dataset(load_records(str(mnist_dir), "train")[:6000], "gaussian", "mnist[:6000]")
    train(ds, d, config, TrainConfig(objective="rd", steps=300, eval_records=500, seed=1), progress=False)
    return d, load_records(str(mnist_dir), "test")[:300]

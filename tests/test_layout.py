"""The package layout: the package's API names, the library never imports ``pipelines``, the import graph of
``vaestream`` has no cycle (module-level imports, and imports inside functions too) and its module-level
imports follow the layers of ARCHITECTURE.md; one module imports constriction."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vaestream"

# the public names of the old flat vaestream/beam.py (all of them stay importable from vaestream.beam)
OLD_BEAM_NAMES = [
    "NAMESPACE", "RECORDS", "DEAD_LETTER", "CHUNK", "SPLIT", "KEY_DIGITS", "RecordBatch", "CodeBatch", "DeadLetter",
    "expand_inputs", "probe", "plan_reads", "read_range", "ReadRecords", "default_scale", "validate_batch",
    "Validate", "BatchedTFRecordSink", "code_examples", "code_schema", "record_schema", "WriteBatches",
    "WriteDeadLetters", "WriteShards", "LoadedVAE", "read_model_config", "VAEModelHandler", "Encode", "Decode",
    "code_files", "read_codes", "ReadCodes", "first_fingerprint", "make_pipeline", "freeze_startup_heap",
    "counters", "check_counts", "count_written", "file_sizes", "count_lines", "run_pipeline", "job_summary",
    "clear_outputs", "DataError", "ModelError", "ModelMismatchError"]
BEAM_MODULES = ["elements", "formats", "readers", "validate", "sinks", "shards", "model_handler", "transforms",
                "running"]


def test_top_level_api_unchanged():
    import vaestream
    from vaestream.coding.codec import load
    from vaestream.config import ModelConfig
    from vaestream.model import VAE
    from vaestream.store import load_model
    from vaestream.training import TrainConfig, Trainer, train

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert (vaestream.load, vaestream.ModelConfig, vaestream.VAE, vaestream.load_model, vaestream.TrainConfig,
                vaestream.Trainer, vaestream.train) == (load, ModelConfig, VAE, load_model, TrainConfig, Trainer, train)
    for name in vaestream.__all__:
        assert hasattr(vaestream, name), name


def test_beam_package_keeps_every_old_name_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        vb = importlib.import_module("vaestream.beam")
        homes = [importlib.import_module(f"vaestream.beam.{m}") for m in BEAM_MODULES]
    import vaestream.errors

    for name in OLD_BEAM_NAMES:
        obj = getattr(vb, name)
        owners = [m for m in homes + [vaestream.errors] if name in vars(m) and vars(m)[name] is obj]
        assert owners, f"vaestream.beam.{name} is not the object of any of its modules"
        if isinstance(obj, type) or callable(obj):
            # one class object, defined in exactly one module (Beam pickles DoFns by qualified name)
            defined = [m for m in homes if getattr(obj, "__module__", None) == m.__name__]
            assert len(defined) <= 1
    assert set(OLD_BEAM_NAMES) - {"DataError", "ModelError", "ModelMismatchError"} <= set(vb.__all__)


def test_online_package_keeps_the_old_names():
    import vaestream.online as online
    from vaestream.online import learner, replay

    for name in ["OnlineConfig", "OnlineLearner", "LEDGER", "LOG", "DRIFT_LOG", "DEAD_LETTER", "MODEL"]:
        assert getattr(online, name) is getattr(learner, name)
    assert online.ReplayBuffer is replay.ReplayBuffer


def test_cli_entry_point_and_commands():
    import configparser

    import vaestream.cli

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "vaestream = vaestream.cli:main" in cfg["options.entry_points"]["console_scripts"]
    assert callable(vaestream.cli.main)
    for module in set(vaestream.cli.COMMANDS.values()):
        assert module.startswith("vaestream.cli."), module
        assert hasattr(importlib.import_module(module), "add_subcommands")


@pytest.mark.parametrize("job", ["prepare", "encode", "decode", "stream_encode"])
def test_pipelines_shells_are_the_library_jobs(job):
    shell = importlib.import_module(f"pipelines.{job}")
    lib = importlib.import_module(f"vaestream.beam.jobs.{job}")
    for name in shell.__all__:
        assert getattr(shell, name) is getattr(lib, name)
    assert shell.run is lib.run and shell.add_arguments is lib.add_arguments


# ---------------------------------------------------------------------------------------------------------
# the import graph, by ast over vaestream/**.py
# ---------------------------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str, module_level_only: bool) -> set[str]:
    """The modules ``name`` imports (absolute names; relative imports resolved).

    With ``module_level_only`` only the imports that run when the module is imported count: statements at
    module level, also inside module-level ``if`` / ``try`` / ``with`` blocks, but not under
    ``if TYPE_CHECKING:`` and not inside functions or classes' methods (those run later, once every module is
    initialised, so they cannot see a half-initialised module: that is what a lazy import is for)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.add(sub if sub in MODULES else base)
            visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def test_no_module_of_the_library_imports_pipelines():
    offenders = {n: sorted(i for i in _imports(n, module_level_only=False) if i.split(".")[0] == "pipelines")
                 for n in MODULES}
    assert {n: v for n, v in offenders.items() if v} == {}


def test_only_the_range_coder_imports_constriction():
    """One module of the library imports constriction (the entropy coders), also inside functions:
    ``vaestream.coding.range_coder`` wraps its range coder, ANS stack and models for the rest."""
    importers = sorted(n for n in MODULES
                       if any(i.split(".")[0] == "constriction" for i in _imports(n, module_level_only=False)))
    assert importers == ["vaestream.coding.range_coder"]


def _graph() -> dict[str, set[str]]:
    return {n: {i for i in _imports(n, module_level_only=True) if i in MODULES and i != n} for n in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(n: str) -> None:
        index[n] = low[n] = len(index)
        stack.append(n)
        on_stack.add(n)
        for m in sorted(graph[n]):
            if m not in index:
                visit(m)
                low[n] = min(low[n], low[m])
            elif m in on_stack:
                low[n] = min(low[n], index[m])
        if low[n] == index[n]:
            component = []
            while True:
                m = stack.pop()
                on_stack.discard(m)
                component.append(m)
                if m == n:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in sorted(graph):
        if n not in index:
            visit(n)
    return found


def test_module_level_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_import_graph_with_imports_inside_functions_has_no_cycle():
    """Every import counts here, also those inside functions (lazy imports): a lazy import may reach upwards
    without breaking a layer (the CLI imports its commands' modules lazily to start fast), but never close a
    circle, which would make the order of first use matter."""
    graph = {n: {i for i in _imports(n, module_level_only=False) if i in MODULES and i != n} for n in MODULES}
    assert _cycles(graph) == []


# which sub-packages each layer may import at module level (ARCHITECTURE.md, "the rule of imports")
LAYERS = {"core": set(), "coding": {"core"}, "broker": {"core"}, "serving": {"core", "coding"},
          "evaluation": {"core", "coding"}, "coder_training": {"core", "coding"},
          "online": {"core", "coding", "serving", "broker"}, "beam": {"core", "coding", "serving", "online", "broker"},
          "cli": {"core", "coding", "serving", "online", "beam", "broker", "evaluation", "coder_training"}}


CORE_PACKAGES = {"entropy_models"}  # parts of the model (vaestream.model builds them), as vaestream.conv is


def _layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in CORE_PACKAGES:
        return "core"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS and _is_package(name)) else "core"


def test_layers_import_only_downwards():
    bad = []
    for n, deps in _graph().items():
        if n == "vaestream":  # the package root re-exports the API (vaestream.load is the codec's)
            continue
        for d in deps:
            if d == "vaestream":
                continue
            if _layer(d) != _layer(n) and _layer(d) not in LAYERS[_layer(n)]:
                bad.append(f"{n} -> {d}")
    assert bad == []


def test_no_private_name_is_reached_across_modules():
    """``from vaestream.x import _y`` and ``x._y`` (x a vaestream module bound by an import) only inside x."""
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        bound: dict[str, str] = {}  # local name -> vaestream module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vaestream"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in MODULES:
                        bound[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__") and node.module != name:
                        bad.append(f"{name}: from {node.module} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("vaestream") and a.asname:
                        bound[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and bound[node.value.id] != name):
                bad.append(f"{name}: {node.value.id}.{node.attr}")
    assert sorted(set(bad)) == []

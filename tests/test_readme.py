"""README.md is executed: its ```bash and ```python blocks run in order, as a new user would run them.

The blocks run in one temporary working directory (the repository's ``deploy/`` and ``pipelines/`` are linked
into it, as a checkout has them), bash blocks with ``bash -euo pipefail``, python blocks with ``python``, each
block on its own. A command that starts a server or cluster (``vaestream serve ...``, or any command ending in
``&``) runs in the background: the harness waits until it is ready (``vaestream serve`` prints one JSON line
once it accepts requests; another daemon with ``--port N`` listens on N) and tears every one of them down at the
end, and on failure.

A marker comment on the line before a block, ``<!-- test: ... -->``, may only

* shrink size flags: ``<!-- test: --epochs 0.2 --k 10 -->`` rewrites ``--epochs VALUE`` (in a python block the
  keyword ``epochs=VALUE``) to a smaller value; only ``--epochs``, ``--n``, ``--k`` and ``--steps``, each of
  which must occur in the block, with a value smaller than every one it replaces; or
* skip a block that needs Docker, Kubernetes or a cloud account: ``<!-- test: skip docker -->``
  (``skip kubernetes``, ``skip cloud``).

Anything else fails the test. The set-up block (``bash demo.sh`` / ``bash .ci/run``) is not run: ``.ci/run``
runs this test suite, so running it here would recurse, and ``demo.sh`` is ``scripts/setup.sh`` (already done
where this test runs) plus ``vaestream demo``. The test reports how many blocks ran and were skipped, and why,
on the terminal and in ``readme_blocks.json`` under pytest's base temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINKED = ("deploy", "pipelines")
SIZE_FLAGS = ("--epochs", "--n", "--k", "--steps")
SKIP_KINDS = ("docker", "kubernetes", "cloud")
SETUP_COMMANDS = {"bash demo.sh", "bash .ci/run"}
BLOCK_TIMEOUT_S = 600
READY_TIMEOUT_S = 120

FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*test:(.*?)-->\s*$")


@dataclass
class Block:
    """One fenced block of the README: its language, first line of code (1-based) and text."""

    lang: str
    line: int
    code: str
    marker: str | None = None
    skip: str | None = None
    shrink: dict[str, str] = field(default_factory=dict)


def parse_blocks(text: str) -> list[Block]:
    """The README's ```bash and ```python blocks with the marker before each (if any)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[j]):
            j += 1
        body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j]]
        if lang in ("bash", "python"):
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            marker = MARKER.match(lines[k]) if k >= 0 else None
            blocks.append(Block(lang, i + 2, "\n".join(body) + "\n", marker.group(1).strip() if marker else None))
        i = j + 1
    return blocks


def _number(value: str) -> float:
    return float(value)


def apply_marker(block: Block) -> None:
    """Checks a block's marker (only shrinking size flags or skipping Docker/Kubernetes/cloud) and applies it."""
    if block.marker is None:
        return
    where = f"README.md:{block.line - 1}: marker <!-- test: {block.marker} -->"
    m = re.fullmatch(r"skip\s+(\w+)", block.marker)
    if m:
        assert m.group(1) in SKIP_KINDS, f"{where}: only {', '.join(SKIP_KINDS)} blocks may be skipped"
        block.skip = f"needs {m.group(1)}"
        return
    tokens = block.marker.split()
    assert tokens and len(tokens) % 2 == 0, f"{where}: expected 'skip KIND' or pairs of --flag VALUE"
    code = block.code
    for flag, value in zip(tokens[::2], tokens[1::2]):
        assert flag in SIZE_FLAGS, f"{where}: {flag} is not a size flag ({', '.join(SIZE_FLAGS)})"
        try:
            new = _number(value)
        except ValueError:
            raise AssertionError(f"{where}: {flag} {value} is not a number") from None
        if block.lang == "bash":
            pattern = re.compile(rf"(?<![\w-]){re.escape(flag)}(\s+|=)([0-9.eE+-]+)")
        else:
            pattern = re.compile(rf"\b{flag[2:]}(\s*=\s*)([0-9.eE+-]+)")
        found = pattern.findall(code)
        assert found, f"{where}: {flag} does not occur in the block"
        for _, old in found:
            assert new < _number(old), f"{where}: {flag} {value} does not shrink {old}"
        code = pattern.sub(lambda mm: mm.group(0)[: mm.start(2) - mm.start(0)] + value, code)
        block.shrink[flag] = value
    block.code = code


def commands(code: str) -> list[tuple[int, str]]:
    """A bash block's logical lines (continuations joined), each with its 0-based first line."""
    out: list[tuple[int, str]] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " " + lines[i].strip()
        out.append((start, text))
        i += 1
    return out


def _strip_comment(cmd: str) -> str:
    return re.sub(r"\s+#.*$", "", cmd if not cmd.lstrip().startswith("#") else "").strip()


def is_setup(block: Block) -> bool:
    """The set-up block: nothing but ``bash demo.sh`` / ``bash .ci/run``."""
    cmds = {_strip_comment(c) for _, c in commands(block.code)} - {""}
    return block.lang == "bash" and bool(cmds) and cmds <= SETUP_COMMANDS


PRELUDE = r"""
__readme_ready() {  # __readme_ready KIND ARG PID LOG: wait until a background command is ready
  local kind=$1 arg=$2 pid=$3 log=$4 t=0
  while true; do
    if [ "$kind" = json ] && grep -q '^{' "$log" 2>/dev/null; then return 0; fi
    if [ "$kind" = port ] && (exec 3<>"/dev/tcp/127.0.0.1/$arg") 2>/dev/null; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "README: background command exited before it was ready: $(tail -c 2000 "$log.err")" >&2; return 1
    fi
    t=$((t + 1))
    if [ $t -gt $((READY_TIMEOUT * 5)) ]; then echo "README: not ready after ${READY_TIMEOUT}s" >&2; return 1; fi
    sleep 0.2
  done
}
trap 'echo "README-FAILED-AT-LINE $((LINENO - __OFFSET)): $BASH_COMMAND" >&2' ERR
"""


def bash_script(block: Block, logdir: Path) -> str:
    """The block as a script: background commands redirected to logs, each followed by a readiness wait.

    The block's lines keep their positions after the header, so bash's ``LINENO`` maps back to the README.
    """
    header = ["set -euo pipefail", f"READY_TIMEOUT={READY_TIMEOUT_S}"] + PRELUDE.strip().splitlines()
    header.append(f"__OFFSET={len(header) + 1}")
    lines = block.code.splitlines()
    body: list[str] = []
    for start, cmd in commands(block.code):
        j = start
        while lines[j].endswith("\\") and j + 1 < len(lines):
            j += 1
        span = j - start + 1
        bare = _strip_comment(cmd)
        background = bare.endswith("&") and not bare.endswith("&&")
        serve = re.match(r"^(\S+=\S+\s+)*vaestream\s+serve\b", bare) is not None
        if not (background or serve):
            body += lines[start:j + 1]
            continue
        command = bare[:-1].strip() if background else bare
        log = logdir / f"bg-{block.line + start}.out"
        port = re.search(r"--port[ =](\d+)", command)
        kind, arg = ("json", "-") if serve else (("port", port.group(1)) if port else ("none", "-"))
        wait = f"__readme_ready {kind} {arg} $__pid {log}" if kind != "none" else ":"
        body.append(f"{{ {command} ; }} > {log} 2> {log}.err & __pid=$!; {wait}")
        body += [":"] * (span - 1)
    return "\n".join(header + body) + "\n"


def _tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _kill_group(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path_factory, fashion_dir, record_property, request):
    """Every bash and python block of README.md runs, in order, and succeeds (markers checked)."""
    blocks = parse_blocks(README.read_text())
    assert blocks, "README.md has no bash or python blocks"
    for b in blocks:
        apply_marker(b)
    work = tmp_path_factory.mktemp("readme")
    logdir = tmp_path_factory.mktemp("readme_logs")
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])

    ran: list[dict] = []
    skipped: list[dict] = []
    groups: list[int] = []
    t0 = time.monotonic()
    try:
        for b in blocks:
            if b.skip is None and is_setup(b):
                b.skip = ("set-up commands: .ci/run runs this test suite (it would recurse) and demo.sh is "
                          "scripts/setup.sh, already run here, plus `vaestream demo`")
            if b.skip:
                skipped.append({"line": b.line, "lang": b.lang, "why": b.skip})
                continue
            if b.lang == "bash":
                script = logdir / f"block-{b.line}.sh"
                script.write_text(bash_script(b, logdir))
                argv = ["bash", str(script)]
            else:
                script = logdir / f"README.md-line{b.line}.py"
                script.write_text(b.code)
                argv = [sys.executable, str(script)]
            t = time.monotonic()
            proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            groups.append(proc.pid)
            try:
                out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                out, err = proc.communicate()
                err += f"\n(killed after {BLOCK_TIMEOUT_S} s)"
            seconds = round(time.monotonic() - t, 1)
            if proc.returncode != 0:
                where = re.findall(r"README-FAILED-AT-LINE (\d+): (.*)", err)
                if where:
                    line = b.line + int(where[-1][0]) - 1
                    failed = where[-1][1]
                else:
                    tb = re.findall(r'README\.md-line\d+\.py", line (\d+)', err)
                    line = b.line + int(tb[-1]) - 1 if tb else b.line
                    failed = b.code.splitlines()[line - b.line] if line - b.line < len(b.code.splitlines()) else ""
                pytest.fail(f"README.md line {line} ({b.lang} block at line {b.line}) exited "
                            f"{proc.returncode} after {seconds} s\ncommand: {failed.strip()}\n"
                            f"marker: {b.marker}\nstderr (tail):\n{_tail(err)}\nstdout (tail):\n{_tail(out, 1500)}",
                            pytrace=False)
            ran.append({"line": b.line, "lang": b.lang, "seconds": seconds, "shrunk": b.shrink or None})
    finally:
        for pgid in groups:
            _kill_group(pgid)
        total = round(time.monotonic() - t0, 1)
        summary = {"ran": len(ran), "skipped": len(skipped), "seconds": total, "blocks": ran,
                   "skips": skipped}
        (tmp_path_factory.getbasetemp() / "readme_blocks.json").write_text(json.dumps(summary, indent=1))
        record_property("readme_blocks", json.dumps({"ran": len(ran), "skipped": skipped, "seconds": total}))
        text = [f"README.md: ran {len(ran)} blocks, skipped {len(skipped)}, {total} s"]
        text += [f"  line {s['line']} skipped: {s['why']}" for s in skipped]
        text += [f"  line {r['line']} ({r['lang']}) {r['seconds']} s" + (f" shrunk {r['shrunk']}" if r["shrunk"]
                                                                           else "") for r in ran]
        capture = request.config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            with capture.global_and_fixture_disabled():  # on the terminal with or without -s
                print("\n" + "\n".join(text))
        else:
            print("\n".join(text))


def test_marker_rules():
    """Markers may only shrink size flags or skip Docker/Kubernetes/cloud blocks; anything else is refused."""
    good = Block("bash", 10, "vaestream train --epochs 10 --out r\nvaestream evaluate --k 5000\n",
                 "--epochs 0.2 --k 10")
    apply_marker(good)
    assert good.code == "vaestream train --epochs 0.2 --out r\nvaestream evaluate --k 10\n"
    py = Block("python", 3, "cfg = TrainConfig(epochs=10)\nll(x, k=1000)\n", "--epochs 1 --k 5")
    apply_marker(py)
    assert py.code == "cfg = TrainConfig(epochs=1)\nll(x, k=5)\n"
    skip = Block("bash", 3, "docker run x\n", "skip docker")
    apply_marker(skip)
    assert skip.skip == "needs docker"
    for bad_marker, code in (("--epochs 20", "train --epochs 10\n"), ("--lr 0.1", "train --lr 1\n"),
                             ("skip slow", "train\n"), ("--k 5", "train --epochs 1\n"),
                             ("--out elsewhere", "train --out r\n"), ("SKIP", "x\n")):
        with pytest.raises(AssertionError):
            apply_marker(Block("bash", 3, code, bad_marker))


def test_setup_block_and_background_commands(tmp_path):
    """The set-up block is recognised; serve and `&` commands are backgrounded with a readiness wait."""
    blocks = parse_blocks("x\n\n```bash\nbash demo.sh   # a\nbash .ci/run\n```\n\n<!-- test: skip cloud -->\n"
                          "```python\nprint(1)\n```\n```bash\nvaestream serve --model_base_path e \\\n"
                          "    --port 8500\ndask scheduler --port 8786 &\necho done\n```\n")
    assert [(b.lang, b.line, b.marker) for b in blocks] == [("bash", 4, None), ("python", 10, "skip cloud"),
                                                           ("bash", 13, None)]
    assert is_setup(blocks[0]) and not is_setup(blocks[2])
    script = bash_script(blocks[2], tmp_path).splitlines()
    body = script[-4:]
    assert body[0].startswith("{ vaestream serve --model_base_path e --port 8500 ; }")
    assert body[0].endswith("__readme_ready json - $__pid " + str(tmp_path / "bg-13.out"))
    assert body[1] == ":"
    assert "__readme_ready port 8786" in body[2] and body[3] == "echo done"

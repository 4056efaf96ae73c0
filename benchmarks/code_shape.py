"""The shape of the library's code: lines per package and per module, the longest functions, the import
graph (module-level and lazy imports) and its cycles. Prints JSON.

    python benchmarks/code_shape.py [--root DIR]      # DIR: a checkout (default: this one)
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def modules(pkg: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``pkg``."""
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        parts = list(f.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def imports(name: str, tree: ast.AST, known: set[str], is_pkg: bool) -> tuple[set[str], set[str]]:
    """(module-level, inside-function) imports of ``name`` that are modules of the package."""
    top, lazy = set(), set()

    def targets(node) -> set[str]:
        found = set()
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            cands = [c for c in subs if c in known] or [base]  # `from pkg import module` names the module
        for c in cands:
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != name:
                found.add(c)
        return found

    def walk(node, in_func: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if in_func else top).update(targets(child))
            walk(child, in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(tree, False)
    return top, lazy - top


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    a = ap.parse_args(argv)
    mods = modules(Path(a.root) / "vaestream")
    known = set(mods)
    lines, funcs, top, both = {}, [], {}, {}
    for name, f in mods.items():
        src = f.read_text()
        lines[name] = src.count("\n")
        tree = ast.parse(src)
        t, lz = imports(name, tree, known, f.name == "__init__.py")
        top[name], both[name] = t, t | lz
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    packages = {}
    for name, n in lines.items():
        parts = name.split(".")
        pkg = ".".join(parts[:2]) if len(parts) > 2 or mods[name].name == "__init__.py" else "vaestream (core)"
        if mods[name].name == "__init__.py" and len(parts) == 1:
            pkg = "vaestream (core)"
        packages[pkg] = packages.get(pkg, 0) + n
    res = {"root": a.root, "lines_total": sum(lines.values()), "lines_per_package": dict(sorted(packages.items())),
           "modules_over_600_lines": {k: v for k, v in sorted(lines.items(), key=lambda kv: -kv[1]) if v > 600},
           "largest_modules": dict(sorted(lines.items(), key=lambda kv: -kv[1])[:12]),
           "longest_functions": [{"function": n, "lines": k} for k, n in sorted(funcs, reverse=True)[:10]],
           "functions_over_80_lines": sum(1 for k, _ in funcs if k > 80),
           "import_edges": {"module_level": sum(map(len, top.values())), "with_lazy": sum(map(len, both.values()))},
           "cycles_module_level": cycles(top), "cycles_with_lazy": cycles(both)}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

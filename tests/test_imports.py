"""The module graph has no cycles (every import, function-level ones included), and every module
imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "synthaug"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """synthaug modules ``name`` imports anywhere in its file (TYPE_CHECKING blocks excepted)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    out = set()
    for f in found:
        while f and f not in known:
            f = f.rpartition(".")[0]
        if f and f != name and f != "synthaug":
            out.add(f)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_cycles():
    mods = modules()
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# One fresh interpreter loads the third-party packages (torch alone takes seconds), then forks a
# child per synthaug module; each child starts with no synthaug module loaded and imports one.
# An import cycle or a missing import among synthaug's modules fails there as in a fresh
# interpreter, at a fraction of the time of one interpreter per module.
_FORK_EACH = """
import importlib, os, sys, traceback
for dep in ("numpy", "pyarrow", "PIL.Image", "torch", "torchvision", "timm", "diffusers", "torch_fidelity",
            "ray", "ray.data", "ray.train", "ray.tune", "yaml"):
    importlib.import_module(dep)
assert not [m for m in sys.modules if m.split(".")[0] == "synthaug"]
bad = []
for m in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(m)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc()[-400:].encode())
            code = 1
        os._exit(code)
    os.close(w)
    err = os.read(r, 1 << 16).decode()
    os.close(r)
    if os.waitpid(pid, 0)[1] != 0:
        bad.append((m, err))
print(repr(bad))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(modules())
    r = subprocess.run([sys.executable, "-c", _FORK_EACH, *names], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-4000:]


def test_a_module_that_fails_to_import_is_reported(tmp_path):
    (tmp_path / "broken_mod.py").write_text("import synthaug.config\nraise ImportError('circular')\n")
    r = subprocess.run([sys.executable, "-c", _FORK_EACH, "synthaug.stats", "broken_mod"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert "broken_mod" in r.stdout and "circular" in r.stdout and "synthaug.stats" not in r.stdout, r.stdout

"""The package graph, read from the source's imports (issue #16):

    model  <-  training            (training may use model and runtime; nothing imports training)
    index  <-  runtime  <-  service

- model/ knows nothing of serving or training; index/ knows nothing but itself;
- runtime/ (card, tokenizer, images, encoders, ingest) imports neither torch, nor training, nor service;
- service/ never imports torch or training, anywhere. Training's commands (`emkum train`,
  `export`, ...) reach `emkum` as a plugin (`training/cli.py`, the `emkum.commands` entry point),
  loaded only when one of them is asked for: `emkum serve` never loads training (checked on a real
  process below).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "training", "index", "runtime", "service")
FORBIDDEN = {
    "model": {"training", "index", "runtime", "service"},
    "index": {"model", "training", "runtime", "service", "torch"},
    "runtime": {"model", "training", "service", "torch"},
    "service": {"model", "training", "torch"},
    "training": {"service"},
}


def imports(path: Path, top_level_only: bool) -> set[str]:
    """First components of the modules `path` imports (only those at module level, if asked)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_package_imports_what_the_graph_forbids():
    broken = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = imports(path, top_level_only=False) & forbidden
            if bad:
                broken.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not broken, "\n".join(broken)


def test_the_graph_has_no_cycles():
    edges = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            edges[package] |= (imports(path, top_level_only=True) & set(PACKAGES)) - {package}
    seen: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if seen.get(node) == 1:
            raise AssertionError(f"cycle: {' -> '.join([*trail, node])}")
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for nxt in sorted(edges[node]):
            visit(nxt, [*trail, node])
        seen[node] = 2

    for package in PACKAGES:
        visit(package, [])


def test_serving_loads_neither_torch_nor_training():
    """`emkum serve` and `emkum index` resolved through the CLI (plugins included) load neither."""
    code = (
        "import sys, service.app, service.cli, runtime.ingest;"
        "from typer.testing import CliRunner;"
        "assert all(CliRunner().invoke(service.cli.app, [c, '--help']).exit_code == 0 for c in ('serve', 'index'));"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'model'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

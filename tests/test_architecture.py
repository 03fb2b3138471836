"""The shape of the package, checked on its source: layers, cycles, aliases, paths, light imports.

The dependency rule (docs/architecture.md): `cli -> {datagen, train, eval, demo}`; `train` and
`eval` read only the Parquet contract and never import `datagen`; neither imports the other
(what both need, e.g. the answer reading, sits below them in `lvr.answers`); `train/rl -> mrsp`;
`mrsp`, `models`, `backends`, `media` and the contract (`artifacts`, `layout`, `config`) never
import the stages above them; nothing in the product imports the test scaffolding
(`lvr.testing`). Imports inside functions count as much as module-level ones.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "lvr"

# (importer prefix, forbidden prefixes): a module under the first may not import the others.
STAGES = ("lvr.datagen", "lvr.train", "lvr.eval", "lvr.demo", "lvr.cli", "lvr.testing")
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("lvr.datagen", ("lvr.train", "lvr.eval", "lvr.mrsp", "lvr.demo", "lvr.cli")),
    ("lvr.train", ("lvr.datagen", "lvr.eval", "lvr.demo", "lvr.cli")),
    ("lvr.eval", ("lvr.datagen", "lvr.train", "lvr.mrsp", "lvr.demo", "lvr.cli")),
    ("lvr.mrsp", ("lvr.train", *STAGES)),
    ("lvr.models", ("lvr.mrsp", *STAGES)),
    ("lvr.backends", ("lvr.mrsp", *STAGES)),  # the local `hf` backend loads lvr.models
    ("lvr.media", ("lvr.mrsp", "lvr.models", "lvr.backends", *STAGES)),
    ("lvr.answers", ("lvr.mrsp", "lvr.models", "lvr.backends", "lvr.media", *STAGES)),
    ("lvr.stages", ("lvr.mrsp", "lvr.models", "lvr.backends", "lvr.media", *STAGES)),
    (
        "lvr.artifacts",
        ("lvr.stages", "lvr.mrsp", "lvr.models", "lvr.backends", "lvr.media", *STAGES),
    ),
    ("lvr.layout", ("lvr.artifacts", "lvr.mrsp", "lvr.models", "lvr.backends", *STAGES)),
    ("lvr.config", ("lvr.artifacts", "lvr.layout", "lvr.mrsp", "lvr.models", *STAGES)),
]
PRODUCT_NEVER = ("lvr.testing",)  # test scaffolding: tests and benchmarks only


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every lvr module `name` imports (module level and inside functions), with the line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lvr"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if not base.startswith("lvr"):
                continue
            for alias in node.names:  # `from lvr.train import checkpoint` imports a module
                yield base, node.lineno
                yield f"{base}.{alias.name}", node.lineno


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _ in _imports(name, path):
            if target in mods and target != name:
                graph[name].add(target)
    return graph


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_dependency_rule() -> None:
    violations = []
    mods = _modules()
    for name, path in mods.items():
        for target, line in _imports(name, path):
            for importer, forbidden in RULES:
                if _under(name, importer) and any(_under(target, f) for f in forbidden):
                    violations.append(f"{path.relative_to(REPO)}:{line} {name} -> {target}")
            if any(_under(target, f) for f in PRODUCT_NEVER) and not _under(name, "lvr.testing"):
                violations.append(f"{path.relative_to(REPO)}:{line} imports test scaffolding")
    assert not violations, "dependency rule broken:\n" + "\n".join(sorted(set(violations)))


def test_no_import_cycles() -> None:
    """No cycle in the module graph: packages' __init__ re-exports count as edges too, except a
    package importing its own submodules (that is what an __init__ is for)."""
    graph = _graph()
    for name in graph:  # a package's __init__ may import its children without making a cycle
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles, state, stack = [], dict.fromkeys(graph, 0), []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif state[nxt] == 0:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_one_letter_module_aliases() -> None:
    found = []
    for path in [
        *PKG.rglob("*.py"),
        *(REPO / "tests").glob("*.py"),
        *(REPO / "benchmarks").glob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    if alias.asname and len(alias.asname) == 1:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} as {alias.asname}")
    assert not found, "one-letter module aliases:\n" + "\n".join(found)


# Folder names of the run layout: only lvr/layout.py may join them onto a path.
_LAYOUT_NAMES = (
    "segment", "caption", "qa", "filter", "videos", "clips", "captions", "qa_raw", "qa_rejected",
    "pass_rates", "_stages", "inputs", "cache", "models", "sft", "rl", "eval", "export",
    "synthetic_videos", "task",
)  # fmt: skip
_JOIN = re.compile(r"""/\s*["'](""" + "|".join(_LAYOUT_NAMES) + r""")["']""")


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_only_the_layout_builds_run_paths(path: Path) -> None:
    if path == PKG / "layout.py":
        return
    hits = [
        f"{path.relative_to(REPO)}:{i} {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if _JOIN.search(line)
    ]
    assert not hits, "stage/table paths built by hand (use lvr.layout.RunLayout):\n" + "\n".join(
        hits
    )


def test_cli_starts_without_torch() -> None:
    """`lvr --help` and the datagen commands must not pay for torch/transformers at import."""
    code = (
        "import sys, lvr.cli, lvr.datagen.cli, lvr.train.cli, lvr.eval.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'vllm') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at CLI start: {out.stdout.strip()}"

"""The house's layers as the imports stand: every import of the package's own modules (at the top of a module,
inside a function, under ``TYPE_CHECKING``) points down or within its room, never up, and no circle of
imports exists. Read from the source with ``ast``, so a function-local import cannot hide a circle.

docs/design.md draws the same layers; this test is what keeps that page true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ema_average"

# Top to bottom. A module belongs to the first (longest) prefix that names it; it may import its own layer
# and the layers below. ``checkpoints`` is layered inside: discovery finds units through the registry, which
# loads the layouts, which read through base's interface, the contents rules and the reading tools.
LAYERS: list[tuple[str, ...]] = [
    ("ema_average", "ema_average.__main__"),  # the package's lazy facade and the entry point
    ("ema_average.cli",),
    ("ema_average.online",),
    ("ema_average.offline",),
    ("ema_average.output",),
    ("ema_average.checkpoints",),  # the package's facade
    ("ema_average.checkpoints.discovery",),
    ("ema_average.checkpoints.layouts",),
    ("ema_average.checkpoints.registry",),
    ("ema_average.checkpoints.base",),
    ("ema_average.checkpoints.contents",),
    ("ema_average.checkpoints.reading",),
    ("ema_average.checkpoints.safetensors_format",),
    ("ema_average.engine",),
    ("ema_average._platform", "ema_average.plugins"),
    ("ema_average.errors", "ema_average._version"),
]

TOP_LEVEL_MODULES = {"__init__", "__main__", "errors", "plugins", "_version"}  # the rest live in rooms


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules ``name`` imports, anywhere in its source (``from pkg import submodule`` is an
    import of the submodule, not of the package's ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``target`` itself
                found.add(target)
    return {target for target in found if target in MODULES and target != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    """The index in ``LAYERS`` of the longest prefix naming ``name``."""
    best, length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best is not None, f"{name} is in no layer of this test: add its room to LAYERS and docs/design.md"
    return best


def test_every_import_points_down_or_within_its_room() -> None:
    upward = [
        f"{name} -> {target}"
        for name, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if layer_of(target) < layer_of(name)
    ]
    assert upward == []


def test_no_circle_of_imports() -> None:
    """Tarjan's strongly connected components: any with two or more modules is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_top_level_holds_rooms_and_a_few_foundations() -> None:
    loose = sorted(p.stem for p in (SRC / PACKAGE).glob("*.py") if p.stem not in TOP_LEVEL_MODULES)
    assert loose == []


@pytest.mark.parametrize(
    "name",
    sorted(n for n, p in MODULES.items() if ".checkpoints.layouts." in n and "\nLAYOUT = " in p.read_text()),
)
def test_a_layout_imports_no_other_layout(name: str) -> None:
    """A layout module (one declaring ``LAYOUT``) reads through reading/, contents/, the registry or a helper
    module of its own format beside it, never through another layout's module."""
    layouts = {
        n for n, p in MODULES.items() if ".checkpoints.layouts." in n and "\nLAYOUT = " in p.read_text()
    }
    assert sorted(GRAPH[name] & layouts) == []


def test_the_checks_see_the_whole_package() -> None:
    """The graph is not empty by a wrong path: the engine, the command and a layout are in it, with edges."""
    assert {
        "ema_average.engine.kernel",
        "ema_average.cli.app",
        "ema_average.checkpoints.layouts.torch_file",
    } <= set(GRAPH)
    assert "ema_average.engine.kernel" in GRAPH["ema_average.engine.moving_average"]
    assert len(GRAPH) > 80


# The picture in docs/imports.md ---------------------------------------------------------------------------


def _reduced() -> dict[str, set[str]]:
    """The graph with every import implied by a longer path left out (a transitive reduction: the same
    layering, a readable picture)."""
    reach: dict[str, set[str]] = {}

    def reachable(v: str) -> set[str]:
        if v not in reach:
            reach[v] = set().union(*({w} | reachable(w) for w in GRAPH[v])) if GRAPH[v] else set()
        return reach[v]

    return {v: {w for w in GRAPH[v] if not any(w in reachable(u) for u in GRAPH[v] - {w})} for v in GRAPH}


def _room(name: str) -> str:
    prefixes = LAYERS[layer_of(name)]
    return max((p for p in prefixes if name == p or name.startswith(p + ".")), key=len)


def mermaid() -> str:
    """docs/imports.md's picture: the modules as boxes in their rooms (top to bottom as ``LAYERS``), an arrow
    for each import not implied by others."""
    node = {name: name.replace(".", "_") for name in GRAPH}
    lines = ["flowchart TB"]
    for prefixes in LAYERS:
        for prefix in prefixes:
            members = sorted(n for n in GRAPH if _room(n) == prefix)
            if not members:
                continue
            lines.append(f'  subgraph {node.get(prefix, prefix.replace(".", "_"))}_room["{prefix}"]')
            lines += [f'    {node[n]}["{n.removeprefix(prefix + ".") or n}"]' for n in members]
            lines.append("  end")
    reduced = _reduced()
    lines += [f"  {node[v]} --> {node[w]}" for v in sorted(reduced) for w in sorted(reduced[v])]
    return "\n".join(lines) + "\n"


def test_the_picture_in_the_docs_is_the_graph() -> None:
    """docs/imports.md shows the imports as they stand (regenerate: ``python tests/test_import_layers.py``)."""
    text = (SRC.parent / "docs" / "imports.md").read_text()
    assert f"```mermaid\n{mermaid()}```" in text


if __name__ == "__main__":
    page = SRC.parent / "docs" / "imports.md"
    head = page.read_text().split("```mermaid")[0] if page.exists() else "# The import graph\n\n"
    page.write_text(f"{head}```mermaid\n{mermaid()}```\n")

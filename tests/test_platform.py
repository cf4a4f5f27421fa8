"""The systems layer stays fenced off: no module outside ``ema_average._platform.torch_compat`` names a
private torch API, so a torch upgrade that moves one breaks in one place (docs/platform.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ema_average"
FENCE = PACKAGE / "_platform" / "torch_compat.py"


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_torch_uses(source: Path) -> list[str]:
    """Each private torch API ``source`` imports or reaches by attribute or ``getattr``, as written."""
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            parts = node.module.split(".") + [alias.name for alias in node.names]  # type: ignore[union-attr]
            if any(map(_private, parts)):
                found.append(f"from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            found += [
                a.name
                for a in node.names
                if a.name.startswith("torch.") and any(map(_private, a.name.split(".")))
            ]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id == "torch":
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and name.value in {"_checkpoint_offset", "_local_tensor"}:
                found.append(ast.unparse(node))
    return found


def test_private_torch_apis_are_named_only_in_torch_compat() -> None:
    uses = {
        str(source.relative_to(PACKAGE)): private_torch_uses(source)
        for source in sorted(PACKAGE.rglob("*.py"))
        if source != FENCE
    }
    assert {path: found for path, found in uses.items() if found} == {}
    assert private_torch_uses(FENCE)  # the check sees them where they are

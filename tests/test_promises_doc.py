"""docs/promises.md names, for every promise, the test files that keep it: each named file exists and holds
tests, so a promise cannot lose its test to a rename or a move without this failing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _named_tests() -> dict[str, set[str]]:
    """Each promise (its first cell) and the ``test_*`` files its last cell names."""
    rows = {}
    for line in (ROOT / "docs" / "promises.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and not set(cells[0]) <= {"-"} and cells[0] != "promise":
            rows[cells[0]] = set(re.findall(r"`(test_\w+)`", cells[-1]))
    return rows


def test_every_promise_names_tests_that_exist() -> None:
    rows = _named_tests()
    assert len(rows) >= 15, "the promises table was not read"
    assert [promise for promise, names in rows.items() if not names] == []
    missing = {
        f"{promise[:40]}: {name}"
        for promise, names in rows.items()
        for name in names
        if not re.search(r"^def test_", _source(name), re.MULTILINE)
    }
    assert missing == set()


def _source(name: str) -> str:
    path = ROOT / "tests" / f"{name}.py"
    return path.read_text() if path.is_file() else ""

"""Run folders written by real third-party trainers, made once per set of package versions and kept in the
pytest cache (``.pytest_cache/d/ema-producers/``), so a warm run does not train DeepSpeed, Lightning or the
HF Trainer again (the DeepSpeed runs alone take minutes).

An entry's name holds a hash of what could change the files: the versions of torch and of every producer
package, Python's version, and the test files that drive the producers (helpers.py, conftest.py, the producer
scripts). It is written into a temporary folder beside it and renamed into place once complete, under a file
lock, so two concurrent test runs never both write it and none sees half of it. A test gets its own copy of
the entry, never the entry itself, so a test that edits its input cannot spoil the cache.
``python -m pytest --cache-clear`` drops every entry; with the cache provider off (``-p no:cacheprovider``)
the producers simply run.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest
from filelock import FileLock

# Whose version is part of the key (a producer's output can change with any of them).
PRODUCER_PACKAGES = (
    "torch",
    "lightning",
    "transformers",
    "accelerate",
    "peft",
    "diffusers",
    "deepspeed",
    "sentence-transformers",
    "datasets",
    "tokenizers",
    "safetensors",
    "numpy",
)
HERE = Path(__file__).resolve().parent
# The test code that decides what the producers write.
PRODUCER_SOURCES = ("helpers.py", "conftest.py", "producer_cache.py", "deepspeed_producer.py")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cache_key(name: str, sources: tuple[str, ...] = ()) -> str:
    """What the files written for ``name`` depend on, hashed (``sources``: more test files, beside tests/)."""
    facts = {
        "name": name,
        "python": platform.python_version(),
        "packages": {package: _version(package) for package in PRODUCER_PACKAGES},
        "sources": {
            source: hashlib.sha256((HERE / source).read_bytes()).hexdigest()
            for source in (*PRODUCER_SOURCES, *sources)
        },
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def produced(
    config: pytest.Config,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    write: Callable[[Path], object],
    sources: tuple[str, ...] = (),
) -> Path:
    """A fresh copy of what ``write(folder)`` writes into an empty ``folder``, from the cache when an entry
    for the current versions is there, else written (once, whoever holds the lock) and cached. ``write``
    must be a producer alone (no code of ema-average decides what it writes: the key does not see src/);
    ``sources``: the test files beside this one it is defined in, besides the shared ones."""
    copy = tmp_path_factory.mktemp(name) / "tree"
    cache = getattr(config, "cache", None)
    if cache is None:  # -p no:cacheprovider: nothing kept
        copy.mkdir()
        write(copy)
        return copy
    root = cache.mkdir("ema-producers")
    entry = root / f"{name}-{cache_key(name, sources)}"
    with FileLock(str(root / f"{entry.name}.lock")):
        if not entry.is_dir():
            _write_entry(root, entry, write)
    shutil.copytree(entry, copy, symlinks=True)
    return copy


def _write_entry(root: Path, entry: Path, write: Callable[[Path], object]) -> None:
    """``write`` into a temporary beside ``entry``, renamed to it when complete; older entries of the same
    producer (other versions) are removed, so the cache holds one entry per producer."""
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{entry.name}-"))
    try:
        (staging / "tree").mkdir()
        write(staging / "tree")
        (staging / "tree").rename(entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    producer = entry.name.rsplit("-", 1)[0]
    for old in root.glob(f"{producer}-*"):
        if old.is_dir() and old != entry and old.name.rsplit("-", 1)[0] == producer:
            _remove_unless_in_use(root, old)


def _remove_unless_in_use(root: Path, old: Path) -> None:
    """An entry of other versions, removed only if no run holds its lock (one may be copying it)."""
    lock = FileLock(str(root / f"{old.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        return
    try:
        shutil.rmtree(old, ignore_errors=True)
    finally:
        lock.release()

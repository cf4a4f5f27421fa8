"""Runs ``ema-average`` once per hostile case, every case in this one process (tests/test_hostile.py starts it
under its address-space, CPU and file-size limits): one child and one torch import for the whole table,
where a child per case spent most of its time starting Python.

Usage: ``hostile_child.py PLAN RESULTS``. PLAN is a JSON list of ``{"name": ..., "argv": [...]}``; for each
case the command's own entry point (``ema_average.__main__.main``, what the console script calls) runs with
``argv`` as its arguments and file descriptors 1 and 2 sent to files, so whatever reaches stdout or stderr
(Python's streams, warnings, C code) is caught. One JSON line per case is appended to RESULTS as soon as the
case is over, ``{"name", "code", "stdout", "stderr"}``, so a case that takes the process down leaves the
earlier results readable and shows as the one missing.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
import warnings
from typing import Any

from ema_average.__main__ import main


def run_case(argv: list[str]) -> dict[str, Any]:
    """The command on ``argv``, its exit code and what it wrote to fds 1 and 2."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = ["ema-average", *argv]
        try:
            # as in a fresh process: warning filters the command sets are undone, and a warning an earlier
            # case showed is shown again (entering resets what Python remembers as already shown)
            with warnings.catch_warnings():
                main()
            code: object = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # what escaped the command: the test fails on it and shows the traceback
            traceback.print_exc()
            code = "escaped"
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        code = 0 if code is None else code
        code = code if isinstance(code, int) else f"{code}"
        return {"code": code, "stdout": _read(out), "stderr": _read(err)}


def _read(stream: Any) -> str:
    stream.seek(0)
    return stream.read().decode(errors="replace")


def run(plan_path: str, results_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    with open(results_path, "a") as results:
        for case in plan:
            outcome = {"name": case["name"], **run_case(case["argv"])}
            results.write(json.dumps(outcome) + "\n")
            results.flush()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])

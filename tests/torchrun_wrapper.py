"""What ``torchrun`` launches in the tests that lose a rank, instead of ``-m ema_average``: the command
itself, with a hook that makes one rank SIGKILL itself at a chosen point, so the shipped package holds no
test-only code.

The environment says which hook and which rank (``KILL_AFTER_FIRST_CHUNK=N``, ``KILL_AFTER_COMMIT=N``);
each replaces one function of ``ema_average.offline.torchrun`` at the point where the rank is to die, then
``ema_average.__main__.main()`` runs as ``python -m ema_average`` would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from ema_average.__main__ import main
from ema_average.offline import torchrun as distributed
from ema_average.output import SafetensorsWriter

# The rank whose number this holds SIGKILLs itself after its first chunk (a rank dying midway).
KILL_AFTER_FIRST_CHUNK = "EMA_AVERAGE_TEST_SIGKILL_RANK_AFTER_FIRST_CHUNK"
# The rank (not 0) whose number this holds SIGKILLs itself once rank 0 has named the output.
KILL_AFTER_COMMIT = "EMA_AVERAGE_TEST_SIGKILL_RANK_AFTER_COMMIT"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_first_chunk(rank: int) -> None:
    """Rank ``rank`` dies at its first progress report, which it makes once its first chunk is written."""
    report = distributed._SharedProgress.__call__

    def reported(self: distributed._SharedProgress, nbytes: int) -> None:
        if self.ranks.rank == rank:
            _die()
        report(self, nbytes)

    distributed._SharedProgress.__call__ = reported  # type: ignore[method-assign]


def kill_after_commit(rank: int) -> None:
    """Rank ``rank`` dies once rank 0 has named the outputs, before it agrees that rank 0 did: where it
    would otherwise join the commit's agreement."""
    commit_and_tell = distributed._commit_and_tell

    def doomed(
        ranks: distributed.Ranks,
        writers: list[SafetensorsWriter],
        on_committed: Callable[[], None],
        release: Callable[[], None],
    ) -> bool:
        if ranks.rank == rank and not ranks.lead:
            _wait_until_named(writers)
            _die()
        return commit_and_tell(ranks, writers, on_committed, release)

    distributed._commit_and_tell = doomed


def _wait_until_named(writers: list[SafetensorsWriter]) -> None:
    """Until every output exists under its final name (rank 0 renamed it): no deadline of its own, so a slow
    machine cannot make the rank die too early; the test's torchrun timeout ends a run that never names."""
    while not all(writer.path.exists() for writer in writers):
        time.sleep(0.001)


_HOOKS = {KILL_AFTER_FIRST_CHUNK: kill_after_first_chunk, KILL_AFTER_COMMIT: kill_after_commit}


def install_hooks() -> None:
    """Each hook whose variable the environment sets, for the rank it names."""
    for variable, install in _HOOKS.items():
        if variable in os.environ:
            install(int(os.environ[variable]))


if __name__ == "__main__":
    install_hooks()
    main()

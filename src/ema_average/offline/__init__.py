"""The offline job: ``ema-average CKPT_DIR``'s options, its plan (decays, weights, chunks, where outputs go),
its run (prepare -> stream -> commit), torchrun's ranks, ``--watch``, ``--resume`` and post-hoc EMA.

Knows nothing of the command line: the ``cli`` package above turns options into a run."""

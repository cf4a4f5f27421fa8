"""The fixed choices the command line offers, in one torch-free place.

The modules that act on them (plan, discovery) import these lists, and the command line builds its
choices from them, so ``--help`` lists exactly what the code accepts and answers without importing torch.
The averages themselves (``--method``) are not listed here: the ``MovingAverage`` registry is their only list.
"""

from __future__ import annotations

SCHEDULES = ("checkpoint", "step")  # one update per checkpoint, or the per-step rule over each gap
OUTPUT_DTYPES = ("as-input", "float32", "bfloat16", "float16")  # what averaged tensors are written as
STEPS_FROM = ("auto", "metadata", "filename")  # where a checkpoint's step is read from

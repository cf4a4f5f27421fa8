"""Where an average is written: one file or a folder of shards, whole or not at all, one run at a time.

``fs`` platform calls and atomic naming; ``lock`` one run per output and the cleanup of killed runs;
``pool`` the bound on open shard files; ``file`` the streaming safetensors writer; ``folder`` the
sharded output folder; ``commit`` several outputs named together. The rest of the package imports
from here.
"""

from ema_average._platform.fs import temp_name
from ema_average._platform.output_lock import OutputLock, remove_stale_temporaries
from ema_average.checkpoints.safetensors_format import TensorEntry, TensorSpec, name_problem
from ema_average.output.commit import commit_together
from ema_average.output.file import SafetensorsWriter
from ema_average.output.folder import ShardedWriter

__all__ = [
    "OutputLock",
    "SafetensorsWriter",
    "ShardedWriter",
    "TensorEntry",
    "TensorSpec",
    "commit_together",
    "name_problem",
    "remove_stale_temporaries",
    "temp_name",
]

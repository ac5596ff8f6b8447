"""Tasks: the registry and one module per task (pairs for a tokenizer, named positions, donor designs, metric).

Importing this package registers every built-in task (IOI); your own pairs need no task module (``actpatch run
--pairs-file``).
"""

from . import ioi  # noqa: F401  registers "ioi"
from .registry import TASKS, Task, get_task, register  # noqa: F401

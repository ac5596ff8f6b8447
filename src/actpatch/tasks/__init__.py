"""Tasks: the registry and one module per task (pairs for a tokenizer, named positions, donor designs, metric).

Importing this package registers every built-in task (IOI, facts, greater-than, sva, induction); your own pairs need no task module (``actpatch run
--pairs-file``).
"""

from . import facts, greater_than, induction, ioi, sva  # noqa: F401  each registers its task
from .registry import TASKS, Task, get_task, register  # noqa: F401

"""The task registry: what ``actpatch run TASK`` and ``run_pairs(task=...)`` know how to generate and tokenize.

A task is one module that builds a ``Task`` and calls ``register`` on import: how to generate pairs for a
tokenizer (one list per donor design), how to tokenize them (its named positions), and its default metric.
The engine never imports a task; tasks import the engine. Usage::

    register(Task("ioi", "indirect object identification", generate=..., tokenize=..., designs=("swap", "abc"),
                  positions=("IO", "S1", "S1+1", "S2", "END")))
    get_task("ioi").generate(tokenizer, 16, ("swap",), 0)["swap"]     # list[PromptPair]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..engine.batch import PairBatch, tokenize_pairs
from ..engine.pairs import PromptPair
from ..errors import ConfigError

TASKS: dict[str, "Task"] = {}


@dataclass(frozen=True)
class Task:
    """One contrastive task: its pairs, named positions, donor designs and default metric.

    ``generate(tokenizer, n_pairs, designs, seed)`` returns {design: [PromptPair, ...]}, the same recipients for
    every design; ``tokenize(tokenizer, pairs)`` returns a ``PairBatch`` with the task's named positions.

    Example::

        task = get_task("ioi"); pairs = task.generate(tok, 8, task.designs[:1], 0)
    """

    name: str
    description: str
    generate: Callable[..., dict[str, list[PromptPair]]] | None = None
    tokenize: Callable[[object, Sequence[PromptPair]], PairBatch] = tokenize_pairs
    designs: tuple[str, ...] = ()
    positions: tuple[str, ...] = ("END",)
    metric: str = "logit_diff"
    sites: tuple[str, ...] = ("hidden", "all_heads", "head")
    keep_correct: bool = False   # run only the pairs the model gets right (recipient LD > 0; a text donor's < 0)


def register(task: Task) -> Task:
    """Add ``task`` to the registry (a task module calls this on import); a second task of one name is refused.

    Example::

        register(Task("greater-than", "years after a start year", generate=my_generator, positions=("YY", "END")))
    """
    if task.name in TASKS and TASKS[task.name] != task:
        raise ConfigError(f"a task named {task.name!r} is already registered; choose another name.")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name``; ConfigError listing the known ones otherwise.

    Example::

        get_task("ioi").positions   # ('IO', 'S1', 'S1+1', 'S2', 'END')
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; expected one of {', '.join(sorted(TASKS))}, or a pairs file "
                          "(--pairs-file) for your own task.")
    return TASKS[name]


# Your own pairs (a JSONL file, ``pairs.load_pairs_file``): named positions from substrings, END always.
register(Task("pairs", "your own pairs from a JSONL file: named positions from substrings, answer sets"))

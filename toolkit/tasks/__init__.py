"""Tasks: a registry of what can be trained (`task:` in a recipe) and how it is scored.

Built in: mae (masked-autoencoder pretraining), sr (super-resolution) and classify. A new task
is one module with a `Task` subclass plus one line in `TASKS` (or `TASKS.register(name, cls)`
at run time).
"""

from toolkit.core.registry import Registry
from toolkit.core.schema import Recipe
from toolkit.tasks.base import BatchResult, Placement, Task

# One line per built-in task: name -> "module:Task subclass".
TASKS: Registry[type[Task]] = Registry(
    "task",
    {
        "mae": "toolkit.tasks.mae:MAETask",
        "sr": "toolkit.tasks.sr:SRTask",
        "classify": "toolkit.tasks.classify:ClassifyTask",
    },
)


def task_of(r: Recipe) -> Task:
    """The recipe's task, set up from it."""
    return TASKS.get(r.task)(r)


__all__ = ["TASKS", "BatchResult", "Placement", "Task", "task_of"]

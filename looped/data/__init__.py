"""Tasks: the built-in reasoning tasks (tasks.py) and text language modelling (text.py), behind
one interface (base.py)."""

from looped.data import tasks, text  # noqa: F401  register the built-in tasks
from looped.data import prefix_sums  # noqa: F401, E402  (after them: the registry keeps order)
from looped.data.base import IGNORE, TASKS, Batch, Task, register_task

__all__ = ["IGNORE", "TASKS", "Batch", "Task", "register_task", "build_task"]


def build_task(cfg, split: str = "train") -> Task:
    """The task named by a TaskConfig; split="eval" applies the held-out difficulty knobs."""
    task_cls = TASKS.lookup(cfg.name)
    knobs = {k: v for k, v in cfg.items() if k not in ("name", "eval")}
    if split == "eval":
        knobs.update({k: v for k, v in cfg.eval.items() if v is not None})
    return task_cls(**knobs, split=split)

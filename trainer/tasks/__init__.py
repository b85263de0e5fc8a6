"""Model families the training loop can train, by the config's ``task:`` value.

Each is a :class:`~trainer.tasks.base.TrainingTask` in its own module, imported only when chosen (so a
DLRM run never imports the fMRL task and vice versa, and this registry imports neither).
"""

from __future__ import annotations

import importlib

from trainer.tasks.base import TrainingTask

TASKS = {
    "fmrl": "trainer.tasks.fmrl:FMRLTask",
    "dlrm": "trainer.tasks.dlrm:DLRMTask",
}
"""``task:`` value -> ``module:class`` of its :class:`TrainingTask`."""


def task_class(name: str) -> type[TrainingTask]:
    """The :class:`TrainingTask` registered as ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: one of {sorted(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)

"""Tasks: the plugins of the one training loop, looked up by ``config.task``.

Built in: ``"classification"`` (:mod:`mrl_jax.tasks.classification`, images
through TFDS), ``"pairs"`` (:mod:`mrl_jax.tasks.pairs`, text embeddings from
(anchor, positive[, negatives]) files) and ``"adaptor"``
(:mod:`mrl_jax.tasks.adaptor`, Matryoshka-Adaptor on frozen embeddings).
Built-in tasks are imported on first use, so the text path never imports
TensorFlow. Add your own with :func:`register`.
"""

from __future__ import annotations

import importlib

from mrl_jax.tasks.base import Task

_BUILTIN = {
    "classification": "mrl_jax.tasks.classification:ClassificationTask",
    "pairs": "mrl_jax.tasks.pairs:PairsTask",
    "adaptor": "mrl_jax.tasks.adaptor:AdaptorTask",
}
_REGISTERED: dict[str, type[Task]] = {}

__all__ = ["Task", "get_task", "register", "task_names"]


def register(task: type[Task]) -> type[Task]:
  """Make ``task`` selectable as ``config.task = task.name`` (usable as a class decorator)."""
  if not (isinstance(task, type) and issubclass(task, Task)):
    raise TypeError(f"register() takes a Task subclass, got {task!r}")
  _REGISTERED[task.name] = task
  return task


def task_names() -> list[str]:
  """Every selectable ``config.task``."""
  return sorted({*_BUILTIN, *_REGISTERED})


def get_task(name: str) -> type[Task]:
  """The task class for ``config.task == name``.

  Raises:
    ValueError: ``name`` is not a registered task (the message lists them).
  """
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _BUILTIN:
    raise ValueError(f"config.task={name!r}; choose one of {task_names()}")
  module, _, cls = _BUILTIN[name].partition(":")
  return getattr(importlib.import_module(module), cls)

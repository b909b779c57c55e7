"""Training runs by name: ``config.task`` looked up in the task registry, handed to the loop.

The layer above the tasks (and so above the loop, which never looks a task up):
what ``train.py`` and the demo do to a training workdir.

* :func:`create` / :func:`train_and_evaluate`: the registered task of ``config.task``
  run by :class:`mrl_jax.train.loop.Experiment`.
* :func:`export_encoder`: a workdir's checkpoint exported as a bundle (no training).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from mrl_jax import tasks
from mrl_jax.core import fileio
from mrl_jax.train import config as config_lib
from mrl_jax.train import specs
from mrl_jax.train.loop import Experiment
from mrl_jax.train.loop import train_and_evaluate as _train_task


def task_of(config: ml_collections.ConfigDict) -> type[tasks.Task]:
  """The registered task class of ``config.task``.

  Raises:
    ValueError: ``config.task`` is missing or names no registered task (listing them).
  """
  if "task" not in config:
    raise ValueError(f"config.task is missing; choose one of {tasks.task_names()}")
  return tasks.get_task(config.task)


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None) -> ml_collections.ConfigDict:
  """:func:`mrl_jax.train.config.validate_config` with the task ``config.task`` names."""
  return config_lib.validate_config(config, task_of(config), num_devices)


def task_spec(config: ml_collections.ConfigDict,
              num_devices: int | None = None) -> specs.TaskSpec:
  """The typed spec of ``config.task``'s task (:meth:`~mrl_jax.train.task.Task.parse_spec`) of
  ``config`` validated: what a task is built from (``PairsTask(task_spec(config), ...)``).

  Raises:
    ValueError: naming the offending field (``config.NAME=value``).
  """
  task = task_of(config)
  return task.parse_spec(config_lib.validate_config(config, task, num_devices))


def create(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """The :class:`~mrl_jax.train.loop.Experiment` of ``config.task`` in ``workdir`` (resuming)."""
  return Experiment(config, workdir, task_of(config))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True, export_dir: str | None = None) -> dict[str, Any]:
  """Train ``config`` (any registered task) in ``workdir``, evaluate, export the encoder.

  Returns:
    :func:`mrl_jax.train.loop.train_and_evaluate`'s result: the final eval metrics
    and ``"export_dir"`` (``workdir/encoder`` unless ``export_dir``; ``""`` skips it).
  """
  return _train_task(config, workdir, task_of(config), progress=progress,
                     export_dir=export_dir)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (``DIR/config.json``, written by the loop).

  Raises:
    FileNotFoundError: ``workdir`` has no ``config.json``.
    ValueError: the file is not valid UTF-8 JSON (naming it).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir")
  # A workdir written before the config namespaces: its flat fields read in their new places.
  return ml_collections.ConfigDict(specs.migrate_flat(fileio.read_json(path)))


def export_encoder(workdir: str, out_dir: str | None = None, *, step: int | None = None) -> str:
  """Export the encoder of a training workdir (any task) to ``out_dir`` (default ``encoder/``).

  Rebuilds the run from ``workdir/config.json`` and its checkpoints (no
  training), then :meth:`mrl_jax.train.loop.Experiment.export`: the best step
  when the run kept one by ``best_metric``, else the latest (or ``step``).

  Raises:
    FileNotFoundError: ``workdir`` has no ``config.json`` or no checkpoint.
  """
  experiment = create(load_workdir_config(workdir), workdir)
  try:
    return experiment.export(out_dir, step=step)
  finally:
    experiment.close()

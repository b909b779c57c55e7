"""Orbax checkpoints of the train state, with JSON metadata (never pickles).

A checkpoint step folder holds two items: ``state`` (Orbax arrays of the train
state as a nested dict) and ``metadata`` (JSON: the config, nesting dims,
class count, library version). Loading one runs no code, and a checkpoint made
by a different model config is refused with a message that names the
difference.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
import jax
import orbax.checkpoint as ocp

import mrl_jax

# Config fields that decide the structure and shapes in a checkpoint; resuming with any of
# them changed cannot work, so it is refused up front.
MODEL_FIELDS = ("dataset", "encoder", "head", "nesting", "ff_dim", "optimizer")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: corrupt, partial or from another model."""


def model_signature(config_dict: dict) -> dict:
  """The part of a (JSON-able) config dict that fixes the model's shapes."""
  return {k: config_dict.get(k) for k in MODEL_FIELDS}


class Checkpointer:
  """Saves and restores the train state under ``directory``.

  Args:
    directory: where step folders go (created if missing).
    metadata: JSON-able dict stored with every step; its ``"config"`` entry is
      compared with the stored one on restore.
    max_to_keep: how many recent steps to keep.
  """

  def __init__(self, directory: str, metadata: dict[str, Any], *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.metadata = {**metadata, "mrl_jax_version": mrl_jax.__version__}
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
        item_names=("state", "metadata"),
    )

  def latest_step(self) -> int | None:
    """The newest complete step (orbax never lists a partial, uncommitted save)."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Save ``state`` at ``step`` (overwrites nothing: a step saved already is kept)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        metadata=ocp.args.JsonSave({**self.metadata, "step": int(step)})))
    self._manager.wait_until_finished()

  def read_metadata(self, step: int) -> dict:
    """The JSON metadata of ``step``; :class:`CheckpointError` if unreadable."""
    path = os.path.join(self.directory, str(step), "metadata", "metadata")
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise CheckpointError(f"checkpoint metadata {path} is missing or corrupt: {e}") from e

  def restore(self, step: int, target: Any) -> Any:
    """Restore ``step`` into the structure, shapes and shardings of ``target``.

    Raises:
      CheckpointError: the stored model config differs from this one, or the
        arrays are missing, truncated or of other shapes.
    """
    path = os.path.join(self.directory, str(step))
    stored = self.read_metadata(step)
    want = model_signature(self.metadata.get("config", {}))
    have = model_signature(stored.get("config", {}))
    if want != have:
      diff = {k: {"checkpoint": have[k], "now": want[k]} for k in want if have[k] != want[k]}
      raise CheckpointError(
          f"checkpoint {path} was written by a different model config: {json.dumps(diff)}")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        flax.serialization.to_state_dict(target))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # orbax raises many types; name the path and the cause
      raise CheckpointError(f"checkpoint {path} could not be restored: "
                            f"{type(e).__name__}: {e}") from e
    return flax.serialization.from_state_dict(target, restored)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

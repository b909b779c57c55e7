import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import run_python, tiny_config

from mrl_jax import experiments
from mrl_jax.train.checkpoints import Checkpointer, CheckpointError
from mrl_jax.train.preemption import Preempted


def _tree(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
          "step": jnp.asarray(seed, jnp.int32)}


def test_async_save_is_safe_when_the_next_step_donates_the_state(tmp_path):
  checkpointer = Checkpointer(str(tmp_path), async_save=True)
  state = _tree(1)
  saved = jax.device_get(state)
  checkpointer.save(1, state)
  donate = jax.jit(lambda t: jax.tree.map(lambda x: x * 2 + 1, t), donate_argnums=0)
  state = donate(state)  # the saved buffers are invalidated while the write may be in flight
  checkpointer.wait()
  restored = checkpointer.restore(1, _tree(0))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  checkpointer.close()


def test_best_step_is_kept_besides_the_latest_ones_and_survives_reopening(tmp_path):
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=2, best_metric="top1/dim_2")
  for step, top1 in zip(range(1, 7), [0.1, 0.9, 0.3, 0.2, 0.4, None], strict=True):
    checkpointer.save(step, _tree(step), metrics=None if top1 is None else {"top1/dim_2": top1})
  checkpointer.close()
  reopened = Checkpointer(str(tmp_path), best_metric="top1/dim_2")
  assert reopened.all_steps() == [2, 5, 6] and reopened.best_step() == 2
  with pytest.raises(ValueError, match="best_metric='top1/dim_2' is not among"):
    reopened.save(7, _tree(7), metrics={"loss": 1.0})
  reopened.close()
  lowest = Checkpointer(str(tmp_path / "min"), best_metric="loss", best_mode="min")
  for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)]:
    lowest.save(step, _tree(step), metrics={"loss": loss})
  assert lowest.best_step() == 2 and lowest.all_steps() == [2, 3, 4]
  lowest.close()


def test_partial_save_is_never_the_latest_and_broken_steps_name_the_problem(tmp_path):
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(5, _tree(5))
  checkpointer.close()
  # A crash mid-save leaves Orbax's temporary folder (here: a copy missing its arrays).
  partial = tmp_path / "9.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(tmp_path / "5", partial)
  shutil.rmtree(partial / "state")
  reopened = Checkpointer(str(tmp_path))
  assert reopened.latest_step() == 5 and reopened.all_steps() == [5]
  np.testing.assert_array_equal(reopened.restore(5, _tree(0))["params"]["w"],
                                _tree(5)["params"]["w"])
  # A committed step whose files went missing afterwards: a clear error, not a silent fallback.
  shutil.rmtree(tmp_path / "5" / "state")
  with pytest.raises(CheckpointError, match=r"checkpoint .*/5 could not be restored"):
    reopened.restore(5, _tree(0))
  os.remove(tmp_path / "5" / "_CHECKPOINT_METADATA")
  with pytest.raises(CheckpointError, match=r"/5/_CHECKPOINT_METADATA is missing or corrupt"):
    reopened.restore(5, _tree(0))
  reopened.close()
  assert not partial.exists()  # cleaned up (in the background) by the next writer


def test_best_metric_must_be_an_eval_metric(digits_dir, tmp_path):
  with pytest.raises(ValueError, match=r"best_metric='top1/dim_3'.*'top1/dim_2'"):
    experiments.create(tiny_config(digits_dir, best_metric="top1/dim_3"), str(tmp_path))


# Interrupted runs, compared with one uninterrupted run of the same config.
KW = dict(schedule="constant", num_train_steps=20, checkpoint_every_steps=5,
          eval_split="test[:64]")


@pytest.fixture(scope="module")
def straight(digits_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = experiments.train_and_evaluate(tiny_config(digits_dir, **KW), workdir, progress=False)
  return result, _final_params(digits_dir, workdir)


def _final_params(digits_dir, workdir):
  return jax.device_get(experiments.create(tiny_config(digits_dir, **KW), workdir).state.params)


def _signal_at(step: int, sig: int):
  def on_step(current, metrics):
    del metrics
    if current == step:
      os.kill(os.getpid(), sig)
  return on_step


def test_sigterm_saves_the_current_step_and_the_resumed_run_is_exact(digits_dir, tmp_path,
                                                                       straight):
  config = tiny_config(digits_dir, **KW)
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(Preempted) as info:
    experiments.create(config, str(tmp_path)).train(
        progress=False, on_step=_signal_at(13, signal.SIGTERM))
  assert info.value.step in (13, 14)  # the handler runs at the next bytecode boundary
  assert signal.getsignal(signal.SIGTERM) == handler  # the training loop's handler is gone
  experiment = experiments.create(config, str(tmp_path))
  assert experiment.step == info.value.step
  assert experiment.checkpointer.read_metadata(experiment.step)["data_position"][
      "batches_consumed"] == experiment.step
  assert experiment.train(progress=False)["eval"] == straight[0]["eval"]
  jax.tree.map(np.testing.assert_array_equal, _final_params(digits_dir, str(tmp_path)),
               straight[1])


KILLED_RUN = """
import os, signal
from testutil import tiny_config
from mrl_jax import experiments
from mrl_jax.train import loop

def kill(step, metrics):
  if step == 13:  # between the saves of steps 10 and 15
    os.kill(os.getpid(), signal.SIGKILL)

experiments.create(tiny_config({data_dir!r}, **{kw!r}), {workdir!r}).train(
    progress=False, on_step=kill)
"""


@pytest.mark.slow
def test_sigkill_between_saves_then_the_restarted_run_ends_exactly_like_a_straight_one(
    digits_dir, tmp_path, straight):
  workdir = str(tmp_path / "run")
  with pytest.raises(AssertionError, match=r"failed \(-9\)"):
    run_python(KILLED_RUN.format(data_dir=digits_dir, kw=KW, workdir=workdir))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps and steps[-1] in (5, 10), steps  # 10 may still have been in flight (async)
  resumed = experiments.train_and_evaluate(tiny_config(digits_dir, **KW), workdir, progress=False)
  assert resumed["eval"] == straight[0]["eval"] and resumed["step"] == straight[0]["step"]
  jax.tree.map(np.testing.assert_array_equal, _final_params(digits_dir, workdir), straight[1])

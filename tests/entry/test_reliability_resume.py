"""Issue 26, resuming and checkpoints: one clear line naming the file, field or step for a
truncated or deleted vocabulary asset, other ``nesting.dims`` (and the checkpoint manager closed
cleanly after it, no Orbax thread traceback), a changed ``max_length`` (naming it and the
position embeddings), a renamed step folder, and a step without its checksums record.

One minimal text run (4 steps, 2 checkpoints) is trained once; each case edits a copy.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from testutil import REPO, tiny_text_config

from mrl_jax import experiments
from mrl_jax.train.checkpoints import CheckpointError


def _config(**overrides):
  settings = dict(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4,
                  log_every_steps=2, async_checkpointing=False)
  return tiny_text_config(**{**settings, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "workdir")
  experiments.train_and_evaluate(_config(num_train_steps=2), workdir, progress=False)
  return workdir


@pytest.fixture
def workdir(run, tmp_path):
  copy = str(tmp_path / "workdir")
  shutil.copytree(run, copy)
  return copy


def _resume(workdir, **overrides):
  experiment = experiments.create(_config(**overrides), workdir)
  experiment.close()


def test_resume_of_an_intact_workdir_works(workdir):
  experiment = experiments.create(_config(), workdir)
  assert experiment.step == 2
  experiment.close()


@pytest.mark.parametrize("keep", [0, 10, 0.5])
def test_a_truncated_vocabulary_asset_is_named(workdir, keep):
  path = os.path.join(workdir, "assets", "tokenizer.json")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)])
  with pytest.raises(ValueError, match=rf"{path}: the run's vocabulary asset is not a readable "
                                       "tokenizer file"):
    _resume(workdir)


def test_a_deleted_vocabulary_asset_is_not_rebuilt(workdir):
  path = os.path.join(workdir, "assets", "tokenizer.json")
  os.remove(path)
  with pytest.raises(ValueError, match=rf"{path} is missing, but .*checkpoints holds steps "
                                       "trained with it"):
    _resume(workdir)
  assert not os.path.exists(path)  # nothing rebuilt behind the user's back


def test_a_vocabulary_of_another_size_is_named(workdir):
  path = os.path.join(workdir, "assets", "tokenizer.json")
  spec = json.load(open(path))
  vocab = spec["model"]["vocab"]
  vocab["zzzextraword"] = max(vocab.values()) + 1
  json.dump(spec, open(path, "w"))
  with pytest.raises(CheckpointError, match=r"vocab_size: checkpoint \d+, now \d+ \(the "
                                            "vocabulary"):
    _resume(workdir)


@pytest.mark.parametrize("max_length", [32, 8])
def test_a_changed_max_length_names_it_and_the_position_embeddings(workdir, max_length):
  with pytest.raises(CheckpointError, match=rf"max_position_embeddings: checkpoint 16, now "
                                            rf"{max_length} \(set by config.max_length: the rows "
                                            "of the position embeddings"):
    _resume(workdir, max_length=max_length)


def test_a_renamed_step_folder_is_named(workdir):
  checkpoints = os.path.join(workdir, "checkpoints")
  os.rename(os.path.join(checkpoints, "2"), os.path.join(checkpoints, "3"))
  with pytest.raises(CheckpointError, match=r"checkpoints/3 disagrees with the step inside it: "
                                            r".* says step 2"):
    _resume(workdir)


def test_a_removed_checksums_record_is_refused_unless_opted_in(workdir):
  meta = os.path.join(workdir, "checkpoints", "2", "_CHECKPOINT_METADATA")
  value = json.load(open(meta))
  del value["custom_metadata"]["checksums"]
  json.dump(value, open(meta, "w"))
  with pytest.raises(CheckpointError, match=r"no checksums record .* "
                                            "--config.checkpoint.allow_unverified=True"):
    _resume(workdir)
  experiment = experiments.create(_config(allow_unverified_checkpoints=True), workdir)
  assert experiment.step == 2
  experiment.close()


def test_other_nesting_dims_give_one_line_and_no_thread_traceback(workdir):
  """train.py in a subprocess: the error line, exit 2, and nothing from Orbax's threads."""
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"),
       f"--config={os.path.join(REPO, 'configs', 'text_pairs.py')}", f"--workdir={workdir}",
       "--config.max_length=16", "--config.loop.num_train_steps=4", "--config.nesting.dims=(8, 32)",
       "--config.encoder.dropout=0.0", "--config.optim.warmup_steps=2"],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2, out.stderr[-2000:]
  assert "written by a different model config" in out.stderr and "nesting" in out.stderr
  assert "Traceback" not in out.stderr, out.stderr[-3000:]

"""The one training loop: every guarantee tested once, over both built-in tasks."""

import json
import os
import re
import shutil
import warnings

import jax
import numpy as np
import pytest
from testutil import tiny

from mrl_jax import experiments
from mrl_jax.train import loop
from mrl_jax.train.checkpoints import CheckpointError

TASKS = ("classification", "pairs")


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _params(config, workdir):
  experiment = experiments.create(config, workdir)
  try:
    return jax.device_get(experiment.state.params)
  finally:
    experiment.close()


@pytest.mark.parametrize("task", TASKS)
def test_tiny_run_learns_checkpoints_logs_and_exports(task, digits_dir, tmp_path):
  config = tiny(task, digits_dir, num_train_steps=40, checkpoint_every_steps=10)
  result = experiments.train_and_evaluate(config, str(tmp_path), progress=False)
  dims = [2, 4, 8, 16] if task == "classification" else [8, 16, 32]
  assert result["step"] == 40 and result["dims"] == dims and result["task"] == task
  if task == "classification":
    top1 = np.asarray(result["eval"]["top1_per_dim"])
    assert top1.shape == (4,) and top1[-1] > 0.5, top1  # chance: 0.1
  else:
    recall = np.asarray(result["eval"]["cosine_recall@10_per_dim"])
    assert recall.shape == (3,) and recall[-1] > 0.5, recall  # chance: 10 / 24
  assert _steps(tmp_path) == [30, 40]  # max_to_keep=2
  with open(tmp_path / "final_metrics.json") as f:
    assert json.load(f)["eval"] == result["eval"]
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["nesting"]["dims"] == dims
  assert os.path.isfile(tmp_path / "encoder" / "mrl_jax.json")


@pytest.mark.parametrize("task", TASKS)
def test_resume_is_exact_and_warns_when_the_data_order_changes(task, digits_dir, tmp_path):
  kw = dict(schedule="constant", checkpoint_every_steps=5, log_every_steps=5)
  straight = experiments.train_and_evaluate(tiny(task, digits_dir, num_train_steps=20, **kw),
                                          str(tmp_path / "straight"), progress=False,
                                          export_dir="")
  experiments.train_and_evaluate(tiny(task, digits_dir, num_train_steps=10, **kw),
                               str(tmp_path / "resumed"), progress=False, export_dir="")
  resumed = experiments.train_and_evaluate(tiny(task, digits_dir, num_train_steps=20, **kw),
                                         str(tmp_path / "resumed"), progress=False,
                                         export_dir="")
  assert resumed["eval"] == straight["eval"]
  jax.tree.map(np.testing.assert_array_equal,
               _params(tiny(task, digits_dir, num_train_steps=20, **kw), tmp_path / "resumed"),
               _params(tiny(task, digits_dir, num_train_steps=20, **kw), tmp_path / "straight"))
  with pytest.warns(UserWarning, match="different data order.*batch_size"):
    experiments.create(tiny(task, digits_dir, num_train_steps=30, batch_size=8, **kw),
                         str(tmp_path / "resumed")).close()


@pytest.mark.parametrize("task", TASKS)
def test_nan_stop_never_saves_a_non_finite_state(task, digits_dir, tmp_path):
  good = tiny(task, digits_dir, num_train_steps=4, checkpoint_every_steps=2,
              optimizer="sgd", learning_rate=0.01, schedule="constant")
  experiments.train_and_evaluate(good, str(tmp_path), progress=False, export_dir="")
  saved = _params(good, tmp_path)
  # Same model, absurd learning rate and a checkpoint every step: an update overflows the
  # parameters to inf while the loss of that step (computed before it) is still finite.
  bad = tiny(task, digits_dir, num_train_steps=30, checkpoint_every_steps=1,
             optimizer="sgd", learning_rate=1e38, schedule="constant", momentum=0.0)
  with pytest.raises(loop.NonFiniteLossError) as info:
    experiments.train_and_evaluate(bad, str(tmp_path), progress=False)
  found = re.search(r"became NaN/inf at step (\d+).*newest checkpoint \(step (\d+), finite "
                    r"parameters\)", str(info.value))
  assert found, info.value
  bad_step, kept = int(found[1]), int(found[2])
  assert 4 <= kept < bad_step and _steps(tmp_path)[-1] == kept
  experiment = experiments.create(bad, str(tmp_path))  # restores the newest checkpoint
  experiment.close()
  assert experiment.step == kept
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(experiment.state)))
  if kept == 4:  # the very first bad update came right after the good run
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(experiment.state.params), saved)


def test_vocabulary_is_kept_across_a_resume(digits_dir, tmp_path):
  workdir = str(tmp_path / "run")
  data = tmp_path / "train.jsonl"
  shutil.copy(tiny("pairs", digits_dir).train_file, data)
  config = tiny("pairs", digits_dir, train_file=str(data), num_train_steps=10)
  experiments.train_and_evaluate(config, workdir, progress=False, export_dir="")
  before = json.load(open(os.path.join(workdir, "assets", "tokenizer.json")))["model"]["vocab"]
  lines = data.read_text().splitlines()
  row = json.loads(lines[0])
  row["anchor"] = "aardvark " + row["anchor"]  # a new word that sorts first
  data.write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
  experiment = experiments.create(tiny("pairs", digits_dir, train_file=str(data),
                                         num_train_steps=20), workdir)
  experiment.close()
  assert experiment.step == 10
  assert experiment.task.tokenizer.tokenizer.get_vocab() == before
  assert "aardvark" not in before


def test_shared_config_errors_name_the_field_and_dims_come_in_any_order(digits_dir, tmp_path):

  for task in TASKS:
    config = experiments.validate_config(tiny(task, digits_dir, nesting={
        "dims": (16, 4, 8), "weights": (3.0, 1.0, 2.0), "start": 1}))
    assert config.nesting.dims == (4, 8, 16) and config.nesting.weights == (1.0, 2.0, 3.0)
  bad = [({"learning_rate": -1.0}, "learning_rate"), ({"warmup_steps": -3}, "warmup_steps"),
         ({"weight_decay": -0.1}, "weight_decay"), ({"num_train_steps": 0}, "num_train_steps"),
         ({"max_to_keep": 0}, "max_to_keep"),
         ({"nesting": {"dims": (4, 4, 8)}}, "nesting"),
         ({"nesting": {"dims": (4, 8, 16), "weights": (1.0, float("nan"), 1.0)}}, "nan"),
         ({"nesting": {"dims": (4, 64)}}, "larger than the embedding")]
  for task in TASKS:
    for overrides, match in bad:
      with pytest.raises(ValueError, match=match):
        experiments.validate_config(tiny(task, digits_dir, **overrides))
  config = tiny("pairs", digits_dir)
  config.task = "nope"
  with pytest.raises(ValueError, match=r"config.task='nope'; choose one of \['adaptor', "):
    experiments.validate_config(config)


def test_checkpoint_of_another_model_or_a_finished_workdir_is_reported(digits_dir, tmp_path):
  config = tiny("classification", digits_dir, num_train_steps=10)
  experiments.train_and_evaluate(config, str(tmp_path), progress=False, export_dir="")
  with pytest.raises(CheckpointError, match=r"different model config.*\"head\""):
    experiments.create(tiny("classification", digits_dir, head="mrl_e"), str(tmp_path))
  with pytest.raises(loop.WorkdirAheadError, match="already holds step 10.*last step 5"):
    experiments.create(tiny("classification", digits_dir, num_train_steps=5), str(tmp_path))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # rerunning the finished command: no warning, no training
    again = experiments.train_and_evaluate(config, str(tmp_path), progress=False, export_dir="")
  assert again["step"] == 10


def test_bf16_cnn_with_batchnorm_and_sgd_keeps_its_statistics(digits_dir, tmp_path):
  config = tiny("classification", digits_dir, half_precision=True, head="mrl_e",
                optimizer="sgd", learning_rate=0.1, num_train_steps=30)
  config.encoder = dict(name="cnn", embed_dim=16, features=(8, 16))
  result = experiments.train_and_evaluate(config, str(tmp_path), progress=False, export_dir="")
  assert np.all(np.isfinite(result["eval"]["loss_per_dim"]))
  # Chance is 0.1; seeds 0-3 reach 0.28-0.47 (grain order) and 0.33-0.49 (tf.data order).
  assert result["eval"]["top1_per_dim"][-1] > 0.2
  experiment = experiments.create(config, str(tmp_path))
  experiment.close()
  assert jax.tree.leaves(experiment.state.model_state["batch_stats"])  # kept and restored

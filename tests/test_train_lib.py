import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config

from mrl_jax import train_lib
from mrl_jax.checkpoints import CheckpointError


def _params(workdir, config):
  return jax.device_get(train_lib.Experiment(config, workdir).state.params)


def test_tiny_run_learns_and_writes_checkpoints_and_metrics(digits_dir, tmp_path):
  config = tiny_config(digits_dir, num_train_steps=100, checkpoint_every_steps=40)
  result = train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  assert result["step"] == 100 and result["dims"] == [2, 4, 8, 16]
  top1 = np.array(result["eval"]["top1_per_dim"])
  assert top1.shape == (4,) and np.all(top1 > 0.3) and top1[-1] > 0.7, top1  # chance: 0.1
  assert result["eval"]["num_examples"] == 359
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps == [80, 100]  # max_to_keep=2
  with open(tmp_path / "final_metrics.json") as f:
    assert json.load(f) == result
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["nesting"]["dims"] == [2, 4, 8, 16]


def test_same_config_and_seed_give_the_same_result(digits_dir, tmp_path):
  config = tiny_config(digits_dir, num_train_steps=20)
  a = train_lib.train_and_evaluate(config, str(tmp_path / "a"), progress=False)
  b = train_lib.train_and_evaluate(config, str(tmp_path / "b"), progress=False)
  assert a == b
  c = train_lib.train_and_evaluate(tiny_config(digits_dir, num_train_steps=20, seed=1),
                                   str(tmp_path / "c"), progress=False)
  assert c["eval"]["loss"] != a["eval"]["loss"]


def test_resume_continues_exactly(digits_dir, tmp_path):
  kw = dict(schedule="constant", checkpoint_every_steps=5)
  straight = train_lib.train_and_evaluate(tiny_config(digits_dir, num_train_steps=20, **kw),
                                          str(tmp_path / "straight"), progress=False)
  train_lib.train_and_evaluate(tiny_config(digits_dir, num_train_steps=10, **kw),
                               str(tmp_path / "resumed"), progress=False)
  resumed = train_lib.train_and_evaluate(tiny_config(digits_dir, num_train_steps=20, **kw),
                                         str(tmp_path / "resumed"), progress=False)
  assert resumed == straight


def test_bf16_and_cnn_with_batchnorm_and_sgd_train(digits_dir, tmp_path):
  config = tiny_config(digits_dir, half_precision=True, head="mrl_e", optimizer="sgd",
                       learning_rate=0.1, label_smoothing=0.1, num_train_steps=40)
  config.encoder = dict(name="cnn", embed_dim=16, features=(8, 16))
  result = train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  assert np.all(np.isfinite(result["eval"]["loss_per_dim"]))
  assert result["eval"]["top1_per_dim"][-1] > 0.3
  state = train_lib.Experiment(config, str(tmp_path)).state
  assert jax.tree.leaves(state.batch_stats)  # BatchNorm statistics are kept and restored


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(digits_dir, tmp_path):
  good = tiny_config(digits_dir, num_train_steps=10, checkpoint_every_steps=10,
                     optimizer="sgd", learning_rate=0.01)
  train_lib.train_and_evaluate(good, str(tmp_path), progress=False)
  saved = _params(str(tmp_path), good)
  # Same model, absurd learning rate: the loss overflows a few steps after resuming.
  bad = tiny_config(digits_dir, num_train_steps=30, checkpoint_every_steps=10,
                    optimizer="sgd", learning_rate=1e30, log_every_steps=30)
  message = r"loss became (nan|inf) at step 1[1-9].*last good checkpoint \(step 10\)"
  with pytest.raises(train_lib.NonFiniteLossError, match=message):
    train_lib.train_and_evaluate(bad, str(tmp_path), progress=False)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps == [10]
  restored = _params(str(tmp_path), good)
  jax.tree.map(np.testing.assert_array_equal, restored, saved)


def test_checkpoint_from_another_model_is_refused(digits_dir, tmp_path):
  train_lib.train_and_evaluate(tiny_config(digits_dir, num_train_steps=10), str(tmp_path),
                               progress=False)
  with pytest.raises(CheckpointError, match=r"different model config.*\"head\""):
    train_lib.Experiment(tiny_config(digits_dir, head="mrl_e"), str(tmp_path))
  with pytest.raises(CheckpointError, match=r"different model config.*\"optimizer\""):
    train_lib.Experiment(tiny_config(digits_dir, optimizer="sgd"), str(tmp_path))


def test_corrupt_checkpoint_names_the_path(digits_dir, tmp_path):
  config = tiny_config(digits_dir, num_train_steps=10)
  train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  state_dir = tmp_path / "checkpoints" / "10" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name not in ("_METADATA", "_CHECKPOINT_METADATA"):
        open(os.path.join(root, name), "wb").close()  # truncate the array data
  with pytest.raises(CheckpointError, match=r"checkpoints/10 could not be restored"):
    train_lib.Experiment(config, str(tmp_path))
  (tmp_path / "checkpoints" / "10" / "metadata" / "metadata").write_text("{not json")
  with pytest.raises(CheckpointError, match="metadata.*missing or corrupt"):
    train_lib.Experiment(config, str(tmp_path))

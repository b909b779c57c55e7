"""Issue 14's property: a run killed with SIGKILL at any moment (a random step, during an
async checkpoint save, during the final export, during the re-export of a finished run)
and then rerun ends with the uninterrupted run's state bit for bit, and every export that
exists is loadable; a kill during a re-export leaves the previous bundle in place."""

import json
import os
import random
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from testutil import REPO, tiny_config

from mrl_jax import experiments
from mrl_jax.bundle.encoder import Encoder

KW = dict(schedule="constant", eval_split="test[:64]")  # 30 steps, checkpoints every 10
SEED = 14
# Runs in a fresh interpreter; kills itself when the drawn moment comes. Hooks: on_step (a
# step), after Checkpointer.save returns (its async write still in flight), and inside the
# export (before mrl_jax.json is written, or before the folder swap).
CHILD = r"""
import json, os, signal, sys, threading, time
from testutil import tiny_config
from mrl_jax.train import checkpoints
from mrl_jax.bundle import artifact
from mrl_jax.core import fileio
from mrl_jax import experiments
from mrl_jax.train import loop

data_dir, workdir, spec, moment_file = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), \
    sys.argv[4]
seen = {"step": None}

def kill(event):
  def now():
    with open(moment_file, "w") as f:
      json.dump({**spec, "event": event, "last_step": seen["step"]}, f)
      f.flush()
      os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
  if spec["delay"] == 0:
    now()
  threading.Thread(target=lambda: (time.sleep(spec["delay"]), now()), daemon=True).start()

def on_step(step, metrics):
  seen["step"] = step
  if spec["where"] == "step" and step == spec["step"]:
    kill(f"step {step}")

save = checkpoints.Checkpointer.save
def save_then_kill(self, step, state, **kwargs):
  saved = save(self, step, state, **kwargs)
  if spec["where"] == "save" and step == spec["step"]:
    kill(f"save {step}")
  return saved
checkpoints.Checkpointer.save = save_then_kill

for module, name in ((artifact, "write_metadata"), (fileio, "atomic_replace_dir")):
  def kill_then_call(*args, _call=getattr(module, name), _name=name, **kwargs):
    if spec["where"] == "export" and spec["hook"] == _name:
      kill(f"export {_name}")
    return _call(*args, **kwargs)
  setattr(module, name, kill_then_call)

experiment = experiments.create(tiny_config(data_dir, **json.loads(sys.argv[5])), workdir)
try:
  experiment.train(progress=False, on_step=on_step)
  experiment.export()
finally:
  experiment.close()
time.sleep(5)  # a kill drawn for the last moments still lands
print("NOT KILLED")
"""


def _trials() -> list[dict]:
  """The kill moments, drawn from a seeded RNG: steps, delays and export hooks."""
  rng = random.Random(SEED)
  return [
      {"where": "step", "step": rng.randint(1, 29), "delay": rng.uniform(0.0, 0.05)},
      {"where": "save", "step": rng.choice([10, 20]), "delay": 0},  # the write is in flight
      {"where": "save", "step": 30, "delay": rng.uniform(0.0, 0.02)},  # the final save
      {"where": "export", "hook": rng.choice(["write_metadata", "atomic_replace_dir"]),
       "delay": rng.uniform(0.0, 0.02)},  # the first export of a fresh run
      {"where": "export", "hook": "write_metadata", "delay": 0, "rerun": True},  # re-export
  ]


def _state(config, workdir):
  experiment = experiments.create(config, workdir)
  experiment.close()
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(experiment.state))]


def _weights(bundle):
  return open(os.path.join(bundle, "model.safetensors"), "rb").read()


def _disk(workdir) -> tuple:
  """What a kill left: complete steps, unfinished saves, the export and export temp folders."""
  ckpt = os.path.join(workdir, "checkpoints")
  names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
  return (tuple(sorted(int(n) for n in names if n.isdigit())),
          any("orbax-checkpoint-tmp" in n for n in names),
          os.path.isdir(os.path.join(workdir, "encoder")),
          any(n.startswith("encoder.tmp-") for n in os.listdir(workdir)))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_is_exact_and_exports_always_load(digits_dir,
                                                                               tmp_path):
  config = tiny_config(digits_dir, **KW)
  straight = str(tmp_path / "straight")
  want_eval = experiments.train_and_evaluate(config, straight, progress=False)["eval"]
  want_state, want_weights = _state(config, straight), _weights(os.path.join(straight, "encoder"))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
  moments, disks = [], []
  for i, spec in enumerate(_trials()):
    workdir = str(tmp_path / f"run{i}")
    if spec.get("rerun"):  # rerunning the finished command re-exports over a good bundle
      shutil.copytree(straight, workdir)
    moment_file = str(tmp_path / f"moment{i}.json")
    proc = subprocess.run([sys.executable, "-c", CHILD, digits_dir, workdir, json.dumps(spec),
                           moment_file, json.dumps(KW)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, (spec, proc.returncode, proc.stderr[-3000:])
    moments.append(json.load(open(moment_file)))
    disks.append(_disk(workdir))
    bundle = os.path.join(workdir, "encoder")
    if spec.get("rerun"):  # the old bundle survived the kill, whole
      assert _weights(bundle) == want_weights
    if os.path.isdir(bundle):
      Encoder.load(bundle)  # every export that exists is complete and loads
    result = experiments.train_and_evaluate(config, workdir, progress=False)  # the rerun
    assert result["eval"] == want_eval and result["step"] == 30, spec
    for got, want in zip(_state(config, workdir), want_state, strict=True):
      np.testing.assert_array_equal(got, want)
    assert _weights(bundle) == want_weights
    Encoder.load(bundle)
  print("kill moments:", moments, "\nstates left on disk:", disks)
  # Not vacuous: every kill landed, at different moments, and left different states on disk,
  # among them an unfinished checkpoint write and an unfinished export.
  assert len({(m["event"], m["last_step"]) for m in moments}) == len(moments), moments
  assert len(set(disks)) >= 4, disks
  assert any(unfinished_save for _, unfinished_save, _, _ in disks), disks
  assert any(unfinished_export for *_, unfinished_export in disks), disks

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from testutil import run_python, tiny_config

from mrl_jax import experiments
from mrl_jax.train import sharding


def test_mesh_shape_defaults_to_all_devices_on_data_and_names_bad_shapes():
  assert sharding.resolve_mesh_shape(None, 8) == (8, 1)
  assert sharding.resolve_mesh_shape((-1, 4), 8) == (2, 4)
  assert sharding.resolve_mesh_shape((2, -1), 8) == (2, 4)
  for bad, message in [((3, 2), "needs 6 devices but there are 8"), ((-1, 3), "does not divide"),
                       ((-1, -1), "at most one"), ((8,), "two positive ints"),
                       ((0, 8), "two positive ints")]:
    with pytest.raises(ValueError, match=rf"config\.mesh_shape.*{message}"):
      sharding.resolve_mesh_shape(bad, 8)
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp") and mesh.shape == {"data": 1, "fsdp": 1}


def test_fsdp_splits_only_large_divisible_arrays_on_their_largest_dim():
  spec = lambda shape, min_size=16: sharding.fsdp_spec(shape, 4, min_size)
  assert spec((64, 32)) == PartitionSpec("fsdp", None)
  assert spec((10, 32)) == PartitionSpec(None, "fsdp")  # 10 does not divide by 4
  assert spec((3, 5, 7)) == PartitionSpec()  # nothing divides
  assert spec((8,), min_size=16) == PartitionSpec()  # too small to be worth it
  assert spec(()) == PartitionSpec()
  assert sharding.fsdp_spec((64, 32), 1, 0) == PartitionSpec()  # no fsdp axis


def _cnn_config(digits_dir, **kw):
  """A tiny CNN (BatchNorm, label smoothing) whose arrays of >= 64 elements FSDP splits."""
  c = tiny_config(digits_dir, num_train_steps=6, log_every_steps=6, eval_every_steps=6,
                  checkpoint_every_steps=6, label_smoothing=0.1, fsdp_min_size=64,
                  eval_split="test[:64]", **kw)
  c.encoder = dict(name="cnn", embed_dim=16, features=(8,))
  return c


# Trains on 8 fake devices, data-parallel and FSDP, recording the per-step loss; then restores
# the 1-device run's checkpoint onto the FSDP mesh.
EIGHT_DEVICES = """
import json, jax, numpy as np
from test_sharding import _cnn_config
from mrl_jax import experiments
from mrl_jax.train import loop
assert jax.device_count() == 8, jax.devices()
save = lambda name, tree: np.savez({tmp!r} + "/" + name + ".npz",
                                   *jax.device_get(jax.tree.leaves(tree)))
out = {{}}
for name, shape in (("dp", (8, 1)), ("fsdp", (2, 4))):
  exp = experiments.create(_cnn_config({data_dir!r}, mesh_shape=shape), {tmp!r} + "/" + name)
  assert exp.mesh.shape == dict(zip(("data", "fsdp"), shape)), exp.mesh
  losses = []
  result = exp.train(progress=False, on_step=lambda step, m: losses.append(float(m["loss"])))
  out[name] = dict(losses=losses, eval=result["eval"]["loss_per_dim"],
                   fsdp_split=sum("fsdp" in str(x.sharding.spec)
                                  for x in jax.tree.leaves(exp.state)))
  save(name, exp.state.params)
restored = experiments.create(_cnn_config({data_dir!r}, mesh_shape=(2, 4)), {one!r})
out["restored_split"] = sum("fsdp" in str(x.sharding.spec)
                            for x in jax.tree.leaves(restored.state.params))
save("restored_from_1", restored.state.params)
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_eight_devices_dp_and_fsdp_match_one_device_and_checkpoints_move_between_meshes(
    digits_dir, tmp_path):
  one = experiments.create(_cnn_config(digits_dir), str(tmp_path / "one"))
  losses = []
  result = one.train(progress=False, on_step=lambda step, m: losses.append(float(m["loss"])))
  params = jax.device_get(jax.tree.leaves(one.state.params))

  stdout = run_python(EIGHT_DEVICES.format(data_dir=digits_dir, tmp=str(tmp_path),
                                           one=str(tmp_path / "one")), devices=8)
  out = json.loads(stdout.split("RESULT", 1)[1])
  for name in ("dp", "fsdp"):
    # Same global batches, same maths; only the order of float reductions differs.
    np.testing.assert_allclose(out[name]["losses"], losses, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(out[name]["eval"], result["eval"]["loss_per_dim"], rtol=2e-4)
    trained = np.load(tmp_path / f"{name}.npz")
    for i, want in enumerate(params):
      np.testing.assert_allclose(trained[f"arr_{i}"], want, rtol=2e-4, atol=2e-5, err_msg=name)
  assert out["dp"]["fsdp_split"] == 0 and out["fsdp"]["fsdp_split"] >= 4, out
  # Saved on 1 device, restored onto a (2, 4) FSDP mesh of 8: bit-identical and split.
  assert out["restored_split"] > 0
  restored = np.load(tmp_path / "restored_from_1.npz")
  for i, want in enumerate(params):
    np.testing.assert_array_equal(restored[f"arr_{i}"], want)
  # Saved on the 8-device FSDP mesh, restored onto 1 device: bit-identical.
  back = experiments.create(_cnn_config(digits_dir), str(tmp_path / "fsdp"))
  assert back.step == 6
  trained = np.load(tmp_path / "fsdp.npz")
  for i, got in enumerate(jax.device_get(jax.tree.leaves(back.state.params))):
    np.testing.assert_array_equal(got, trained[f"arr_{i}"])


def _text_config(**kw):
  from testutil import tiny_text_config

  return tiny_text_config(num_train_steps=4, log_every_steps=4, eval_every_steps=4,
                          checkpoint_every_steps=4, fsdp_min_size=64, **kw)


EIGHT_DEVICES_TEXT = """
import json, jax, numpy as np
from test_sharding import _text_config
from mrl_jax import experiments
from mrl_jax.train import loop
out = {{}}
for name, shape in (("dp", (8, 1)), ("fsdp", (2, 4))):
  exp = experiments.create(_text_config(mesh_shape=shape), {tmp!r} + "/" + name)
  losses = []
  exp.train(progress=False, on_step=lambda step, m: losses.append(float(m["loss"])))
  out[name] = dict(losses=losses, fsdp_split=sum("fsdp" in str(x.sharding.spec)
                                                 for x in jax.tree.leaves(exp.state)))
  exp.close()
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_eight_devices_dp_and_fsdp_match_one_device_for_the_pairs_task(tmp_path):
  one = experiments.create(_text_config(), str(tmp_path / "one"))
  losses = []
  one.train(progress=False, on_step=lambda step, m: losses.append(float(m["loss"])))
  one.close()
  stdout = run_python(EIGHT_DEVICES_TEXT.format(tmp=str(tmp_path)), devices=8)
  out = json.loads(stdout.split("RESULT", 1)[1])
  for name in ("dp", "fsdp"):  # same global batches; only the float reduction order differs
    np.testing.assert_allclose(out[name]["losses"], losses, rtol=2e-5, err_msg=name)
  assert out["dp"]["fsdp_split"] == 0 and out["fsdp"]["fsdp_split"] >= 4, out

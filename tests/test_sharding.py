import numpy as np
from subprocess_util import run_python

TRAIN_AND_DUMP = """
import jax, numpy as np
from conftest import tiny_config
from mrl_jax import train_lib
assert jax.device_count() == {devices}, jax.devices()
config = tiny_config({data_dir!r}, num_train_steps=6, log_every_steps=1, eval_every_steps=6,
                     checkpoint_every_steps=6, label_smoothing=0.1)
config.encoder = dict(name="cnn", embed_dim=16, features=(8,))
exp = train_lib.Experiment(config, {workdir!r})
assert exp.mesh.shape == {{"data": {devices}}}
result = exp.train(progress=False)
leaves = jax.tree.leaves(jax.device_get((exp.state.params, exp.state.batch_stats)))
np.savez({out!r}, loss=np.array(result["eval"]["loss_per_dim"]),
         **{{f"p{{i}}": x for i, x in enumerate(leaves)}})
"""


def test_one_device_and_eight_devices_train_the_same(digits_dir, tmp_path):
  outs = {}
  for devices in (1, 8):
    out = str(tmp_path / f"d{devices}.npz")
    run_python(TRAIN_AND_DUMP.format(devices=devices, data_dir=digits_dir,
                                     workdir=str(tmp_path / f"w{devices}"), out=out),
               devices=devices)
    outs[devices] = dict(np.load(out))
  assert outs[1].keys() == outs[8].keys()
  for key in outs[1]:
    # Same global batch, same maths; only the order of float reductions differs.
    np.testing.assert_allclose(outs[8][key], outs[1][key], rtol=2e-4, atol=2e-5, err_msg=key)

"""Bad inputs of issues 14 and 15 not covered elsewhere: each gets one clear error naming the
field, file (and line) or argument, and no non-finite value is ever served.

Where the other bullets of those issues are tested (so that none is tested twice):

* config/CLI (kind 1): ``tests/entry/test_train_script.py`` (unknown field, NaN weight, negative
  learning rate, ``max_to_keep=0``, missing train file: one line, exit 2),
  ``tests/train/test_loop.py`` (negative ``warmup_steps``/``weight_decay``, ``num_train_steps=0``,
  duplicate or too large dims, workdir ahead of the run, another model's checkpoint);
* files (kind 2): ``tests/fixtures/test_text_data.py`` (non-UTF-8 lines, NaN gold scores, with
  ``path:line``), ``tests/train/test_checkpoint_integrity.py`` (corrupt or missing metrics and
  metadata files, missing ``manifest.ocdbt`` without event-loop tracebacks, flipped bits,
  retention), ``tests/bundle/test_export.py`` (changed bundle bytes, non-UTF-8 ``config.json``,
  raw uint8 pixels);
* functions (kind 3): ``tests/losses/test_classification_losses.py`` (label smoothing),
  ``tests/losses/test_embedding_losses.py``
  (the teacher-score matrix when B == D), ``tests/evaluate/test_evaluate_inputs.py`` (retrieval and
  evaluation arguments, the ``evaluate_nested`` default clamp, NaN rows, 1-D databases);
* crash safety (issue 14): ``tests/entry/test_kill_anywhere.py`` (SIGKILL at random moments).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from testutil import REPO, TINY_ST_MODEL, tiny

from mrl_jax import experiments
from mrl_jax import losses as losses_lib
from mrl_jax.bundle import artifact
from mrl_jax.bundle.artifact import BundleError
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.core import ops
from mrl_jax.evaluate import probe
from mrl_jax.tasks.classification import ClassificationTask
from mrl_jax.train import optim
from mrl_jax.train import sharding as sharding_lib

RNG = np.random.default_rng(0)
A = RNG.standard_normal((8, 8)).astype(np.float32)
LOGITS = RNG.standard_normal((3, 8, 5)).astype(np.float32)
LABELS = np.arange(8) % 5


# --- kind 1: config fields (the values train.py passes through --config.FIELD) ---------------

CONFIG_ERRORS = [
    # (task, overrides, the message: field and value)
    ("classification", {"learning_rate": float("nan")}, r"config.optim.learning_rate .* got nan"),
    ("pairs", {"learning_rate": float("inf")}, r"config.optim.learning_rate .* got inf"),
    ("classification", {"num_train_steps": -5}, r"config.loop.num_train_steps .* got -5"),
    ("classification", {"shuffle_buffer": 0}, r"config.shuffle_buffer must be a positive int, "
                                              r"got 0"),
    ("classification", {"shuffle_buffer": -1}, r"config.shuffle_buffer .* got -1"),
    ("classification", {"label_smoothing": 1.5}, r"config.label_smoothing=1.5"),
    ("classification", {"checkpoint_every_steps": 0}, r"config.checkpoint.every_steps"),
    ("classification", {"max_to_keep": -1}, r"config.checkpoint.max_to_keep .* got -1"),
    ("pairs", {"scale": float("nan")}, r"config.scale=nan"),
    ("pairs", {"warmup_steps": -3}, r"config.optim.warmup_steps=-3"),
]


@pytest.mark.parametrize("task,overrides,match", CONFIG_ERRORS,
                         ids=[f"{t}-{next(iter(o))}={next(iter(o.values()))}"
                              for t, o, _ in CONFIG_ERRORS])
def test_bad_config_field_is_named(task, overrides, match, digits_dir):
  with pytest.raises(ValueError, match=match):
    experiments.validate_config(tiny(task, digits_dir, **overrides))


def _parse_cli(config_file: str, *args: str):
  """``--config=FILE --config.X=Y`` parsed as train.py parses it (ml_collections flags)."""
  argv = ["train.py", f"--config={os.path.join(REPO, 'configs', config_file)}", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("config_file", ["cifar10_resnet18.py", "imagenet_resnet50.py",
                                         "imagenet_vit_b16.py"])
def test_num_train_steps_overrides_the_epochs_of_the_paper_configs(config_file):
  config = experiments.validate_config(_parse_cli(config_file, "--config.loop.num_train_steps=7"))
  assert optim.total_and_warmup_steps(config, steps_per_epoch=1000)[0] == 7


def _train_py(tmp_path, *args, cwd=REPO):
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=180, env=env)


def _one_error_line(proc) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def test_empty_workdir_is_one_line_and_creates_nothing(tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  proc = _train_py(tmp_path, "--workdir=", f"--config={REPO}/configs/digits_mlp.py",
                   "--config.loop.num_train_steps=2", cwd=str(cwd))
  assert "workdir must be a non-empty path" in _one_error_line(proc)
  assert not os.listdir(cwd)  # no ./checkpoints, ./encoder or ./config.json


def test_non_utf8_train_file_is_one_line_naming_the_file_and_line(tmp_path):
  data = tmp_path / "latin1.jsonl"
  data.write_bytes(b'{"anchor": "a", "positive": "b"}\n{"anchor": "caf\xe9", "positive": "c"}\n')
  proc = _train_py(tmp_path, f"--workdir={tmp_path / 'w'}", "--config=configs/text_pairs.py",
                   f"--config.train_file={data}")
  assert f"{data}:2: not UTF-8" in _one_error_line(proc)


def test_refused_checkpoint_is_one_line_naming_the_difference(tmp_path):
  from mrl_jax.train.checkpoints import Checkpointer

  workdir = tmp_path / "w"
  checkpointer = Checkpointer(str(workdir / "checkpoints"), {"config": {"head": "mrl_e"}})
  checkpointer.save(1, {"w": np.zeros((2, 2), np.float32)})
  checkpointer.close()
  # the run's vocabulary asset is there (a workdir with steps but none is refused first)
  os.makedirs(workdir / "assets")
  shutil.copy(os.path.join(TINY_ST_MODEL, "tokenizer.json"),
              workdir / "assets" / "tokenizer.json")
  proc = _train_py(tmp_path, f"--workdir={workdir}", "--config=configs/text_pairs.py",
                   "--config.loop.num_train_steps=2")
  line = _one_error_line(proc)
  assert "CheckpointError" in line and "different model config" in line, line


# --- kind 2: files -----------------------------------------------------------------------------

@pytest.mark.parametrize("field,content,match", [
    ("train_file", b'{"anchor": "a", "positive": "b"}\n\xff\xfe\n', r"bad.jsonl:2: not UTF-8"),
    ("eval_file", b"sentence1\tsentence2\tscore\na\tb\t1.0\nc\td\tnan\n",
     r"bad.tsv:3: score 'nan' is not finite"),
    ("eval_file", b"sentence1\tsentence2\tscore\na\tb\t1.0\nc\td\tinf\n", r"bad.tsv:3: .*inf"),
    ("eval_pairs_file", b'{"anchor": "a", "positive": "b"}\n{"anchor": 3, "positive": "c"}\n',
     r"bad.jsonl:2"),
])
def test_bad_text_files_of_a_run_name_the_file_and_line(field, content, match, digits_dir,
                                                       tmp_path):
  path = tmp_path / ("bad.tsv" if field == "eval_file" else "bad.jsonl")
  path.write_bytes(content)
  with pytest.raises(ValueError, match=match):
    experiments.create(tiny("pairs", digits_dir, **{field: str(path)}), str(tmp_path / "w"))


@pytest.fixture(scope="module")
def bundle(digits_dir, tmp_path_factory):
  """An image bundle of an untrained tiny MLP (no data read, no training)."""
  config = experiments.task_spec(tiny("classification", digits_dir))
  task = ClassificationTask.without_data(config, mesh=sharding_lib.make_mesh(),
                                         num_classes=10, input_shape=(8, 8, 1))
  variables = jax.tree.map(np.asarray, task.init_variables(jax.random.PRNGKey(0)))
  out = str(tmp_path_factory.mktemp("bundle") / "encoder")
  artifact.write_atomically(out, lambda tmp: task.export(variables, tmp, step=0))
  return out


def _copy_with(bundle: str, tmp_path, name: str, content: bytes, *, rehash: bool) -> str:
  """A copy of ``bundle`` with ``name`` replaced; ``rehash`` also updates its SHA-256 in
  mrl_jax.json (a bundle built that way on purpose, so the content check is what refuses it)."""
  import shutil

  out = str(tmp_path / "copy")
  shutil.copytree(bundle, out)
  with open(os.path.join(out, name), "wb") as f:
    f.write(content)
  if rehash:
    meta_file = os.path.join(out, artifact.METADATA_FILE)
    meta = json.load(open(meta_file))
    meta["sha256"][name] = hashlib.sha256(content).hexdigest()
    meta[artifact.METADATA_DIGEST] = artifact.metadata_digest(meta)  # re-signed as a whole
    with open(meta_file, "w") as f:
      json.dump(meta, f)
  return out


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x81binary", b'{"format": "\xe9"}'])
def test_binary_bytes_in_the_bundle_metadata_are_one_bundle_error(bundle, tmp_path, content):
  path = _copy_with(bundle, tmp_path, artifact.METADATA_FILE, content, rehash=False)
  with pytest.raises(BundleError, match=rf"{path}/mrl_jax.json is not UTF-8 text"):
    Encoder.load(path)


@pytest.mark.parametrize("scale,match", [
    ("NaN", r"config.json is not valid JSON: NaN is not JSON"),
    ("Infinity", r"config.json is not valid JSON: Infinity is not JSON"),
    ("1e999", r"preprocessing.scale=inf must be finite numbers"),  # json reads 1e999 as inf
    ("[0.5, NaN, 0.5]", r"NaN is not JSON"),
    ("null", r"preprocessing.scale=None must be finite numbers"),
    ("[]", r"preprocessing.scale=\[\] must be finite numbers"),
])
def test_bundle_with_a_non_finite_preprocessing_scale_is_refused(bundle, tmp_path, scale, match):
  config_file = os.path.join(bundle, artifact.CONFIG_FILE)
  text = json.dumps(json.load(open(config_file)))
  assert '"scale": 0.00392156862745098' in text
  content = text.replace('"scale": 0.00392156862745098', f'"scale": {scale}').encode()
  with pytest.raises(BundleError, match=r"bytes of config.json changed"):  # as shipped
    Encoder.load(_copy_with(bundle, tmp_path / "a", artifact.CONFIG_FILE, content, rehash=False))
  # Built that way with a matching hash: the value itself is refused on load.
  with pytest.raises(BundleError, match=match):
    Encoder.load(_copy_with(bundle, tmp_path / "b", artifact.CONFIG_FILE, content, rehash=True))


# --- kind 4: non-finite and raw inputs at inference ----------------------------------------

def test_nan_input_rows_are_refused_for_every_quantisation(bundle):
  encoder = Encoder.load(bundle)
  x = RNG.random((5, 8, 8, 1)).astype(np.float32)
  assert np.all(encoder.embed(x, quantize="int8_symmetric").any(axis=1))  # not all zero
  x[3, 2, 1, 0] = np.nan
  for quantize in (None, "int8", "int8_symmetric", "binary", "ubinary"):
    with pytest.raises(ValueError, match=r"NaN or inf in rows \[3\]"):
      encoder.embed(x, dim=4, quantize=quantize)
  x[3, 2, 1, 0] = np.inf
  with pytest.raises(ValueError, match=r"NaN or inf in rows \[3\]"):
    encoder.logits(x)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.bool_])
def test_raw_integer_or_bool_pixels_are_refused(bundle, dtype):
  encoder = Encoder.load(bundle)
  raw = RNG.integers(0, 2 if dtype is np.bool_ else 256, (2, 8, 8, 1)).astype(dtype)
  with pytest.raises(ValueError, match="run Encoder.preprocess on raw pixels first"):
    encoder.embed(raw)
  np.testing.assert_allclose(encoder.embed(encoder.preprocess(raw.astype(np.uint8))),
                             encoder.embed(raw.astype(np.float32) / 255.0), atol=1e-6)


def test_quantising_non_finite_embeddings_is_refused_outside_jit():
  z = A / np.linalg.norm(A, axis=1, keepdims=True)
  np.testing.assert_array_equal(ops.quantize(z, "int8_symmetric"),
                                np.round(127 * z).astype(np.int8))
  for kind in ("int8", "int8_symmetric", "binary", "ubinary"):
    for bad in (np.nan, np.inf, -np.inf):
      broken = z.copy()
      broken[6, 1] = bad
      with pytest.raises(ValueError, match=r"non-finite embeddings: rows \[6\]"):
        ops.quantize(broken, kind)
  np.testing.assert_array_equal(ops.quantize(np.full((1, 8), np.nan), None),
                                np.full((1, 8), np.nan))  # no quantisation: floats as given
  # Under jit the values are not inspectable: the check is the caller's (Encoder.embed).
  assert jax.jit(ops.quantize, static_argnums=1)(z, "int8").shape == (8, 8)
  assert jax.jit(ops.quantize, static_argnums=1)(z, "binary").shape == (8, 1)


# --- kind 3: public functions with a domain ----------------------------------------------------

FUNCTION_ERRORS = [
    ("class id >= C", lambda: losses_lib.nested_softmax_cross_entropy(LOGITS, LABELS + 1),
     r"labels must be class ids in \[0, 5\) .* got 5 at index 4"),
    ("negative class id", lambda: losses_lib.nested_loss_per_dim(LOGITS, LABELS - 1),
     r"got -1 at index 0"),
    ("NaN CoSENT score", lambda: losses_lib.cosent(A, A, np.where(LABELS == 2, np.nan, 1.0)),
     r"scores must be finite; 2 are NaN/inf \(first at index 2\)"),
    ("probe steps 0", lambda: probe.fit_linear_probe(A, LABELS, 5, steps=0), "steps must be"),
    ("probe learning_rate < 0", lambda: probe.fit_linear_probe(A, LABELS, 5, learning_rate=-1.0),
     r"learning_rate must be a finite number > 0, got -1.0"),
    ("probe l2 NaN", lambda: probe.fit_linear_probe(A, LABELS, 5, l2=float("nan")),
     r"l2 must be a finite number >= 0, got nan"),
    ("probe NaN features", lambda: probe.fit_linear_probe(np.where(np.eye(8) > 0, np.nan, A),
                                                          LABELS, 5), r"train_x has NaN/inf"),
    ("probe label >= num_classes", lambda: probe.fit_linear_probe(A, LABELS, 3),
     r"train_y must be classes in \[0, num_classes=3\)"),
    ("probe float labels", lambda: probe.fit_linear_probe(A, LABELS * 1.0, 5), "integer classes"),
    ("probe 1-D features", lambda: probe.fit_linear_probe(A[0], LABELS, 5), r"\[N, d\]"),
    ("truncated probe dim past d", lambda: probe.truncated_probe_accuracy(
        A, LABELS, A, LABELS, (4, 16), 5), r"dims must be ints in \[1, 8\]"),
    ("truncated probe NaN test features", lambda: probe.truncated_probe_accuracy(
        A, LABELS, np.where(np.eye(8) > 0, np.inf, A), LABELS, (4,), 5),
     r"test_z has NaN/inf in 8 of 8 rows"),
    ("truncated probe widths", lambda: probe.truncated_probe_accuracy(
        A, LABELS, A[:, :4], LABELS, (4,), 5), "same width"),
]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=d) for d, c, m in FUNCTION_ERRORS])
def test_bad_function_argument_is_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_checks_leave_traced_and_valid_calls_alone():
  """Inside jit the class ids and scores cannot be inspected: valid values give the same
  loss traced or not, and the probe still fits."""
  f = lambda logits, labels: losses_lib.nested_softmax_cross_entropy(logits, labels)
  np.testing.assert_allclose(jax.jit(f)(LOGITS, LABELS), f(LOGITS, LABELS), rtol=1e-6)
  scores = np.linspace(0.0, 1.0, 8)
  np.testing.assert_allclose(jax.jit(losses_lib.cosent)(A, A[::-1], scores),
                             losses_lib.cosent(A, A[::-1], scores), rtol=1e-6)
  acc = probe.truncated_probe_accuracy(A, LABELS, A, LABELS, (8,), 5, steps=200)
  assert acc == [1.0]  # 8 points in 8 dims: separable

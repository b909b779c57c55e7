"""The adaptor task: a tiny run recovers a known low-dimensional structure, its batches and
split follow their rules, its loss is adaptor_loss, its bundle serves the trained adaptor
exactly, and bad inputs fail naming the field."""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import REPO, override

from mrl_jax import experiments
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.losses.adaptor import adaptor_loss
from mrl_jax.tasks.adaptor import AdaptorTask, BelowBaselineWarning, EpochBatches, held_out_rows
from mrl_jax.train import config as config_lib
from mrl_jax.train import sharding as sharding_lib

DIMS = (8, 16, 32, 64)


def _low_rank_data(rng, n, dim=64, rank=6, noise=0.05):
  """A rank-6 Gaussian signal in dims ``8:`` (none in the first 8), plus noise.

  The exact neighbours are the signal's; truncation to 8 dims sees only noise.
  """
  basis = np.linalg.qr(rng.normal(size=(dim - 8, rank)))[0]
  x = np.zeros((n, dim))
  x[:, 8:] = rng.normal(size=(n, rank)) @ basis.T
  return (x + noise * rng.normal(size=(n, dim))).astype(np.float32)


def _config(embeddings_file, **overrides):
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "adaptor.py"))
  config.embeddings_file = embeddings_file
  config.adaptor.hidden = ()
  config.adaptor.init = "identity"  # learn the structure from truncation, not from PCA
  config.optim.learning_rate = 3e-3
  config.nesting.dims = DIMS
  config.batch_size = 64
  config.loop.num_train_steps = 150
  config.eval_fraction = 0.25
  config.loop.log_every_steps = 50
  config.loop.eval_every_steps = 150
  config.checkpoint.every_steps = 150
  override(config, overrides)
  return config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Corpus ``[600, 64]``; queries = noisy copies of rows 0..299, paired with those rows."""
  root = tmp_path_factory.mktemp("adaptor_data")
  rng = np.random.default_rng(0)
  x = _low_rank_data(rng, 600)
  queries = (x[:300] + 0.02 * rng.normal(size=(300, 64))).astype(np.float32)
  pairs = np.stack([np.arange(300), np.arange(300)], axis=1)
  paths = {}
  for name, array in (("x", x), ("queries", queries), ("pairs", pairs)):
    paths[name] = str(root / f"{name}.npy")
    np.save(paths[name], array)
  return paths


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("adaptor_run"))
  config = _config(files["x"])
  result = experiments.train_and_evaluate(config, workdir, progress=False)
  experiment = experiments.create(config, workdir)  # restores the last step
  experiment.close()
  return experiment, result, workdir


def test_tiny_run_moves_the_structure_into_the_8_dim_prefix(trained):
  experiment, result, workdir = trained
  ev = result["eval"]
  assert result["dims"] == list(DIMS)
  assert ev["neighbor_recall_truncate_per_dim"][0] < 0.15
  assert ev["neighbor_recall_per_dim"][0] > ev["neighbor_recall_truncate_per_dim"][0] + 0.5
  assert ev["neighbor_recall_per_dim"][0] > 0.7 * ev["neighbor_recall_pca_uncentred_per_dim"][0]
  assert np.isclose(ev["neighbor_recall_truncate_per_dim"][-1], 1.0)  # full size = the truth
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert final["eval"] == ev
  names = experiment.task.eval_metric_names()
  assert "neighbor_recall/dim_8" in names and "neighbor_recall_pca/dim_64" in names
  assert len(names) == 2 + 4 * len(DIMS)
  assert names[:2] == ["neighbor_recall_mean", "selection_score"]
  assert np.isclose(ev["neighbor_recall_mean"], np.mean(ev["neighbor_recall_per_dim"]))
  assert os.path.getsize(os.path.join(workdir, "plots", "neighbor_recall.png")) > 1000
  table = experiment.task.describe(result)
  assert "neighbor_recall@10" in table and "adaptor" in table and "pca_uncentred" in table


def test_the_bundle_serves_the_trained_adaptor_truncated_then_normalised(trained, files):
  experiment, result, _ = trained
  encoder = Encoder.load(result["export_dir"])
  assert encoder.modality == "embedding" and encoder.dims == DIMS and encoder.embed_dim == 64
  assert encoder.input_shape == (64,)
  x = np.load(files["x"])[:37]
  adapted = experiment.task.adapt(jax.device_get(experiment.state.params), x)
  assert not np.allclose(adapted, x, atol=1e-3)  # trained away from the identity
  for m in DIMS:
    want = adapted[:, :m] / np.linalg.norm(adapted[:, :m], axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.embed(x, dim=m), want, atol=1e-5)
  with pytest.raises(ValueError, match="NaN"):
    encoder.embed(np.full((2, 64), np.nan, np.float32), dim=8)
  with pytest.raises(ValueError, match="shape"):
    encoder.embed(np.zeros((2, 32), np.float32), dim=8)


def test_batches_depend_only_on_seed_and_step_and_never_hold_eval_rows(files, tmp_path):
  config = experiments.task_spec(_config(files["x"]))
  task = AdaptorTask(config, workdir=str(tmp_path), mesh=sharding_lib.make_mesh())
  data = task.data
  assert data.eval_rows.size == 150 and data.train_rows.size == 450
  np.testing.assert_array_equal(data.eval_rows, held_out_rows(600, eval_fraction=0.25,
                                                             eval_max_rows=5000))
  stream = task.train_batches(0)
  first = [next(stream)["embeddings"] for _ in range(9)]
  np.testing.assert_array_equal(next(task.train_batches(7))["embeddings"], first[7])
  epoch = np.concatenate(first[:task.steps_per_epoch])  # 7 batches of 64 of 450 rows
  assert np.unique(epoch, axis=0).shape[0] == epoch.shape[0]  # each row once per epoch
  eval_set = {row.tobytes() for row in data.embeddings[data.eval_rows]}
  assert not any(row.tobytes() in eval_set for row in np.concatenate(first))
  batches = EpochBatches(10, 3, seed=1, tag=1)
  assert batches.batches_per_epoch == 3
  np.testing.assert_array_equal(np.sort(np.concatenate([batches(s) for s in range(3)])),
                                np.sort(np.random.default_rng([1, 1, 0]).permutation(10)[:9]))


def test_supervised_loss_is_adaptor_loss_and_pairs_are_split_by_held_out_document(files,
                                                                                  tmp_path):
  config = experiments.task_spec(_config(
      files["x"], queries_file=files["queries"], pairs_file=files["pairs"], pair_batch_size=32,
      nesting={"dims": (8, 64), "weights": (2.0, 1.0)}, rank_weight=0.5))
  task = AdaptorTask(config, workdir=str(tmp_path), mesh=sharding_lib.make_mesh())
  data = task.data
  is_eval = np.isin(np.arange(600), data.eval_rows)
  assert not is_eval[data.train_pairs[:, 1]].any()
  assert not np.isin(data.train_pairs[:, 0], data.eval_queries).any()
  np.testing.assert_array_equal(data.eval_rows[data.eval_pairs[:, 1]],
                                data.eval_queries[data.eval_pairs[:, 0]])  # pair i = (i, i)
  params = jax.tree.map(lambda p: p + 0.01, task.init_variables(jax.random.PRNGKey(0))["params"])
  batch = jax.tree.map(jnp.asarray, next(task.train_batches(0)))
  assert batch["queries"].shape == (32, 64) and batch["embeddings"].shape == (64, 64)
  loss, (_, metrics) = jax.jit(task.loss_and_metrics)(params, {}, batch, jax.random.PRNGKey(1))
  f = lambda x: task.model.apply({"params": params}, x)
  want, terms = adaptor_loss(batch["embeddings"], f(batch["embeddings"]), (8, 64), (2.0, 1.0),
                             k=10, rank_weight=0.5, gap="squared",
                             adapted_queries=f(batch["queries"]),
                             adapted_documents=f(batch["documents"]))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["rank_per_dim"], [terms["rank/dim_8"], terms["rank/dim_64"]],
                             rtol=1e-4)
  ev = task.evaluate({"params": params})
  for name in task.eval_metric_names():
    metric, _, dim = name.partition("/dim_")
    assert (f"{metric}_per_dim" in ev and int(dim) in (8, 64)) if dim else metric in ev
  assert ev["pair_recall_per_dim"].shape == (2,) and 0 <= ev["pair_ndcg_per_dim"][1] <= 1


@pytest.mark.parametrize("init,center", [("pca", False), ("pca_centred", True)])
def test_pca_init_starts_as_pca_of_the_training_rows(files, tmp_path, init, center):
  from mrl_jax.evaluate.adaptor import fit_pca

  config = experiments.task_spec(_config(files["x"], adaptor={"init": init}))
  task = AdaptorTask(config, workdir=str(tmp_path), mesh=sharding_lib.make_mesh())
  assert AdaptorTask(experiments.task_spec(_config(files["x"])), workdir=str(tmp_path),
                     mesh=sharding_lib.make_mesh()).pretrained_variables() is None
  x = task.data.embeddings
  pca = fit_pca(x[task.data.train_rows], center=center)
  np.testing.assert_allclose(task.adapt(task.pretrained_variables()["params"], x[:50]),
                             pca(x[:50]), atol=1e-5)


def _write(tmp_path, name, array):
  path = str(tmp_path / f"{name}.npy")
  np.save(path, array)
  return path


@pytest.mark.parametrize("change,message", [
    (lambda x, t: {"embeddings_file": None}, "config.embeddings_file is required"),
    (lambda x, t: {"embeddings_file": str(t / "missing.npy")}, "embeddings_file.*not a file"),
    (lambda x, t: {"embeddings_file": _write(t, "flat", x[:, 0])},
     r"config.embeddings_file must be \[N, D\]"),
    (lambda x, t: {"embeddings_file": _write(t, "nan", np.where(
        np.isin(np.arange(200), [3, 7])[:, None], np.nan, x))},
     "config.embeddings_file has 2 rows with NaN or infinite values: rows 3, 7"),
    (lambda x, t: {"embeddings_file": _write(t, "ints", (x * 10).astype(np.int32))},
     "floating point"),
    (lambda x, t: {"nesting": {"dims": (8, 128)}}, "config.nesting"),
    (lambda x, t: {"encoder": {"embed_dim": 32}}, "config.encoder.embed_dim=32 differs"),
    (lambda x, t: {"queries_file": _write(t, "q", x[:5])}, "both config.queries_file"),
    (lambda x, t: {"queries_file": _write(t, "q", x[:5, :32]),
                   "pairs_file": _write(t, "p", np.array([[0, 1]]))},
     "config.queries_file has D=32, expected 64"),
    (lambda x, t: {"queries_file": _write(t, "q", x[:5]),
                   "pairs_file": _write(t, "p", np.array([[0, 1], [5, 2]]))},
     r"config.pairs_file.*query ids \[5\] outside \[0, 5\)"),
    (lambda x, t: {"queries_file": _write(t, "q", x[:5]),
                   "pairs_file": _write(t, "p", np.array([[0, 200]]))},
     r"config.pairs_file.*document ids \[200\] outside \[0, 200\)"),
    (lambda x, t: {"queries_file": _write(t, "q", x[:5]),
                   "pairs_file": _write(t, "p", np.array([0, 1]))}, r"config.pairs_file.*\[P, 2\]"),
    (lambda x, t: {"k": 64}, "config.k=64 must be < config.batch_size=64"),
    (lambda x, t: {"gap": "cube"}, "config.gap"),
    (lambda x, t: {"adaptor": {"hidden": (8, 0)}}, "config.adaptor.hidden"),
    (lambda x, t: {"adaptor": {"activation": "elu"}}, "config.adaptor.activation"),
    (lambda x, t: {"adaptor": {"init": "pca", "hidden": (8,)}},
     r"config.adaptor.init='pca' needs config.adaptor.hidden=\(\)"),
    (lambda x, t: {"adaptor": {"init": "svd"}}, "config.adaptor.init"),
    (lambda x, t: {"eval_fraction": 1.5}, "config.eval_fraction"),
    (lambda x, t: {"eval_fraction": 0.01}, "config.eval_k=10 needs at least 11 held-out rows"),
    (lambda x, t: {"batch_size": 190}, "config.batch_size=190 is larger than the 150 training"),
    (lambda x, t: {"eval_rows_file": _write(t, "rows", np.array([1, 300]))},
     r"config.eval_rows_file has row ids outside \[0, 200\)"),
    (lambda x, t: {"topk_weight": 0.0, "pair_weight": 0.0}, "nothing to train"),
    (lambda x, t: {"select_max_dim": 4}, "config.select_max_dim=4 is below every nested dim"),
    (lambda x, t: {"select_max_dim": 0}, "config.select_max_dim"),
])
def test_bad_inputs_fail_naming_the_field(change, message, tmp_path):
  x = _low_rank_data(np.random.default_rng(1), 200)
  config = _config(_write(tmp_path, "x", x))
  for key, value in change(x, tmp_path).items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  with pytest.raises(ValueError, match=message):
    experiments.validate_config(config)


@pytest.mark.slow
def test_train_py_runs_the_adaptor_end_to_end(files, tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.run(
      [sys.executable, "train.py", "--config=configs/adaptor.py",
       f"--config.embeddings_file={files['x']}", f"--workdir={workdir}",
       "--config.loop.num_train_steps=20", "--config.batch_size=64", "--config.eval_fraction=0.25",
       "--config.adaptor.hidden=(32,)", "--config.adaptor.init=identity",
       "--config.loop.eval_every_steps=20"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "neighbor_recall@10" in proc.stdout and "exported the encoder" in proc.stdout
  encoder = Encoder.load(os.path.join(workdir, "encoder"))
  assert encoder.embed(np.load(files["x"])[:3], dim=8).shape == (3, 8)
  bad = subprocess.run(
      [sys.executable, "train.py", "--config=configs/adaptor.py",
       f"--workdir={tmp_path / 'bad'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "config.embeddings_file is required" in bad.stderr


@pytest.mark.slow
def test_a_text_encoder_and_the_adaptor_compose_into_one_bundle(tmp_path):
  from testutil import tiny_text_config

  from mrl_jax.data.text import read_text_pairs
  from mrl_jax.tasks.pairs import PairsTask

  text_task = PairsTask(experiments.task_spec(tiny_text_config()),
                        workdir=str(tmp_path / "text_run"), mesh=sharding_lib.make_mesh())
  text_dir = str(tmp_path / "text")
  os.makedirs(text_dir)
  text_task.export(text_task.init_variables(jax.random.PRNGKey(0)), text_dir, step=0)
  rows = read_text_pairs(text_task.config.train_file)
  texts = sorted({*rows.anchors, *rows.positives})
  raw = Encoder.load(text_dir).embed(texts)  # [N, 32], full size, unit norm
  config = _config(_write(tmp_path, "texts", raw), text_encoder=text_dir, batch_size=32,
                   eval_k=5, num_train_steps=10, eval_every_steps=10,
                   nesting={"dims": (8, 16, 32)},
                   checkpoint={"best_metric": None})  # the trained step, not the identity
  result = experiments.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  composed = Encoder.load(result["export_dir"])
  assert composed.modality == "embedding" and composed.dims == (8, 16, 32)
  for m in composed.dims:
    from_texts = composed.embed(texts[:9], dim=m)
    np.testing.assert_allclose(from_texts, composed.embed(raw[:9], dim=m), atol=1e-5)
    assert not np.allclose(from_texts, raw[:9, :m] / np.linalg.norm(raw[:9, :m], axis=1,
                                                                      keepdims=True), atol=1e-4)
  small = {"batch_size": 32, "eval_k": 5, "nesting": {"dims": (8, 16, 32)}}
  with pytest.raises(ValueError, match="config.text_encoder=.* modality 'embedding', not 'text'"):
    experiments.validate_config(_config(_write(tmp_path, "texts", raw),
                                       text_encoder=result["export_dir"], **small))
  with pytest.raises(ValueError, match="config.text_encoder=.* embeds 32 dims"):
    experiments.validate_config(_config(_write(tmp_path, "wide", np.tile(raw, (1, 2))),
                                       text_encoder=text_dir, **small))


# -- held-out model selection and the export's baseline record -----------------------------


def _numpy_neighbor_recall(full, reduced, m, k):
  """The slow, obvious reference: exact cosine top-k by argsort, each row its own query."""
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  def top(a):
    sims = unit(a.astype(np.float64)) @ unit(a.astype(np.float64)).T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]
  truth, found = top(full), top(reduced[:, :m])
  return np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found, strict=True)])


def _numpy_pca_axes(train, center):
  """Principal axes (rows, by decreasing variance) by eigh of the second-moment matrix."""
  x = train.astype(np.float64) - (train.mean(axis=0) if center else 0.0)
  values, vectors = np.linalg.eigh(x.T @ x)
  return vectors[:, np.argsort(-values, kind="stable")].T, (train.mean(axis=0) if center else 0.0)


def _selected_run(files, workdir, steps=60, every=20, best_metric="selection_score",
                  **overrides):
  """Train with every evaluation's selection_score recorded; export; returns what happened."""
  config = _config(files["x"], loop={"num_train_steps": steps, "eval_every_steps": every},
                   checkpoint={"every_steps": steps, "max_to_keep": 1,
                               "best_metric": best_metric}, **overrides)
  experiment = experiments.create(config, workdir)
  scores, evaluate = {}, experiment.evaluate

  def recording_evaluate():
    out = evaluate()
    scores[experiment.step] = out["selection_score"]
    return out

  experiment.evaluate = recording_evaluate
  try:
    experiment.train(progress=False)
    kept = {s: experiment.checkpointer.read_metadata(s)["metrics"]["selection_score"]
            for s in experiment.checkpointer.all_steps()}
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      export_dir = experiment.export()
  finally:
    experiment.close()
  below = [str(w.message) for w in caught if issubclass(w.category, BelowBaselineWarning)]
  return experiment, scores, kept, export_dir, below


@pytest.mark.parametrize("init, lr, selected", [("identity", 3e-3, "a trained step"),
                                                ("pca", 3e-2, "the initialisation")])
def test_the_export_is_the_step_with_the_best_held_out_metric(files, tmp_path, init, lr,
                                                               selected):
  experiment, scores, kept, export_dir, _ = _selected_run(
      files, str(tmp_path), adaptor={"init": init}, optim={"learning_rate": lr})
  assert sorted(scores) == [0, 20, 40, 60]  # step 0 too (config.loop.eval_at_start)
  best = max(scores, key=lambda s: (scores[s], s))
  assert (best > 0) == (selected == "a trained step")  # both cases happen on this data
  assert kept[best] == pytest.approx(scores[best])  # the checkpoint holds the loop's number
  meta = Encoder.load(export_dir).metadata
  assert meta["step"] == best and meta["baselines"]["step"] == best
  record = meta["baselines"]["metrics"]["neighbor_recall"]
  assert np.mean(record["adaptor"]) == pytest.approx(scores[best])
  assert max(scores.values()) == pytest.approx(np.mean(record["adaptor"]))


def test_the_export_records_adaptor_and_baselines_per_dim_and_warns_where_below(files,
                                                                                tmp_path):
  # Identity start, 1 tiny step: the adaptor is raw truncation, so PCA beats it at 8-32.
  experiment, _, _, export_dir, below = _selected_run(
      files, str(tmp_path), adaptor={"init": "identity"}, optim={"learning_rate": 1e-9},
      steps=1, every=1, best_metric=None)
  encoder = Encoder.load(export_dir)
  record = encoder.metadata["baselines"]
  assert record["dims"] == list(DIMS) and record["selection_metric"] == "neighbor_recall"
  table = record["metrics"]["neighbor_recall"]
  data = experiment.task.data
  held, train = data.embeddings[data.eval_rows], data.embeddings[data.train_rows]
  reference = {"adaptor": encoder.embed(held, dim=64), "truncate": held}
  for name, center in (("pca", True), ("pca_uncentred", False)):
    axes, mean = _numpy_pca_axes(train, center)
    reference[name] = (held - mean) @ axes.T
  for name, reduced in reference.items():
    want = [_numpy_neighbor_recall(held, reduced, m, 10) for m in DIMS]
    np.testing.assert_allclose(table[name], want, atol=2e-3, err_msg=name)
  worse = [m for i, m in enumerate(DIMS)
           if any(table["adaptor"][i] < table[b][i] for b in ("truncate", "pca", "pca_uncentred"))]
  assert worse[:3] == [8, 16, 32]
  assert table["beats"]["truncate"][:3] == [True] * 3 and table["beats"]["pca"][:3] == [False] * 3
  assert len(below) == 1 and f"at dims {worse} (" in below[0] and "neighbor_recall@10" in below[0]


def test_no_warning_where_the_adaptor_is_at_least_every_baseline(files, tmp_path):
  # PCA start, a learning rate that drifts: the export falls back to step 0 (uncentred PCA).
  _, _, _, export_dir, below = _selected_run(files, str(tmp_path), adaptor={"init": "pca"},
                                             optim={"learning_rate": 3e-2})
  table = Encoder.load(export_dir).metadata["baselines"]["metrics"]["neighbor_recall"]
  assert all(all(flags) for flags in table["beats"].values()) and below == []


def test_a_tampered_or_inconsistent_baseline_record_is_refused(trained):
  from mrl_jax.bundle import artifact

  _, result, _ = trained
  meta = artifact.read_metadata(result["export_dir"])
  dims = meta["matryoshka_dimensions"]
  artifact.validate_baselines(meta["baselines"], dims, "x")
  table = meta["baselines"]["metrics"]["neighbor_recall"]
  flipped = {**table, "beats": {**table["beats"], "pca": [not f for f in table["beats"]["pca"]]}}
  bad = {**meta["baselines"], "metrics": {"neighbor_recall": flipped}}
  with pytest.raises(artifact.BundleError, match="beats.pca"):
    artifact.validate_baselines(bad, dims, "x")
  with pytest.raises(artifact.BundleError, match="dims"):
    artifact.validate_baselines({**meta["baselines"], "dims": dims[:-1]}, dims, "x")
  with pytest.raises(artifact.BundleError, match="changed since export"):
    artifact.validate_metadata({**meta, "baselines": {**meta["baselines"], "num_eval_rows": 1}},
                               "x")  # the digest covers the record


@pytest.mark.parametrize("rank_weight, metric", [(0.0, "neighbor_recall"), (0.05, "pair_ndcg")])
def test_selection_score_is_the_trained_for_metric_averaged_over_the_selection_dims(
    files, tmp_path, rank_weight, metric):
  config = experiments.task_spec(_config(files["x"], queries_file=files["queries"],
                                         pairs_file=files["pairs"], rank_weight=rank_weight,
                                         select_max_dim=20))
  task = AdaptorTask(config, workdir=str(tmp_path), mesh=sharding_lib.make_mesh())
  assert task.selection_metric == metric and task.selection_dims == (8, 16)
  ev = task.evaluate(task.init_variables(jax.random.PRNGKey(0)))
  assert ev["selection_score"] == pytest.approx(np.mean(ev[f"{metric}_per_dim"][:2]))

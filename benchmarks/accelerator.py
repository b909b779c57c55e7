"""One accelerator benchmark: step times, throughput and MFU of mrl_jax's real train steps.

  PYTHONPATH=. python benchmarks/accelerator.py [--output results.json] [--only resnet,pairs]
  PYTHONPATH=. python benchmarks/accelerator.py --smoke      # tiny sizes, CPU, < ~1 min

Every row of a group is measured side by side in the same run (the variants take
turns, round after round, so a load change hits all alike; the median round is
reported). Rows (``--only`` takes group names):

* ``resnet``: ResNet-50 train step, 224 px, bf16, batch 256, synthetic images,
  1000 classes, the recipe of ``configs/imagenet_resnet50.py`` through the loop's
  sharded jitted step (:func:`mrl_jax.train.loop.jit_train_step`, state donated):
  single head (FF-2048) vs MRL (9 nested heads) vs MRL-E (one tied head);
* ``pairs``: MiniLM-L6 and BERT-base shapes (random init), 256 pairs x 128 tokens,
  the pairs task's step with the fused nested in-batch softmax vs the plain one
  (one dim); with torch and sentence-transformers importable, also
  ``MatryoshkaLoss(MultipleNegativesRankingLoss)`` and MNRL alone on the same
  device, shapes and bf16 (torch autocast), a random ``BertConfig`` model;
* ``cached``: the GradCache step (``config.mini_batch_size``) of MiniLM-L6 at 8192
  pairs in mini-batches of 512 against the largest full batch whose compiled
  program fits the device's memory (from XLA's memory analysis); peak device
  memory from ``device.memory_stats()`` where the backend has it;
* ``retrieval``: adaptive retrieval (shortlist 200 at 16 dims, re-rank at 2048)
  over 1,000,000 x 2048 float32 on the device against exact 2048-d search
  (:func:`mrl_jax.adaptive_retrieval`, :func:`mrl_jax.exact_search`).

MFU = XLA's flop count of the compiled step (``compiled.cost_analysis()``) /
step time / the device's dense bf16 peak (:data:`PEAK_TFLOPS`; unknown devices
get no MFU). Needs no network and no data files: the text rows write a small
synthetic pairs file (random words) for the task's validation and vocabulary
and feed random token ids. Prints one table and writes it as JSON (``--output``).
Sized to run in about 8 minutes on one H100 (untested there: see the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Dense bf16 peak per chip, TFLOP/s (vendor figures), by a substring of device_kind.
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("v5 lite", 197.0),
               ("v5e", 197.0), ("v5p", 459.0), ("v4", 275.0))
GROUPS = ("resnet", "pairs", "cached", "retrieval")
TEXT_MODELS = {  # (hidden, layers, heads, intermediate)
    "minilm_l6": (384, 6, 12, 1536),
    "bert_base": (768, 12, 12, 3072),
}
SMOKE_TEXT_MODEL = (32, 2, 2, 64)
VOCAB = 30522


@dataclasses.dataclass
class Sizes:
  image_size: int = 224
  image_batch: int = 256
  resnet: dict = dataclasses.field(default_factory=lambda: dict(depth=50, width=64,
                                                                embed_dim=2048))
  num_classes: int = 1000
  pairs: int = 256
  tokens: int = 128
  text_models: tuple = ("minilm_l6", "bert_base")
  cached_pairs: int = 8192
  cached_mini: int = 512
  db_rows: int = 1_000_000
  db_dim: int = 2048
  shortlist_dim: int = 16
  queries: int = 1000
  warmup: int = 2
  rounds: int = 5
  steps: int = 3


# Smoke: a small CNN stands in for ResNet-50 (same task, loop and step; XLA:CPU compiles a
# ResNet in tens of seconds per head).
SMOKE = Sizes(image_size=16, image_batch=4, resnet=dict(name="cnn", features=(8,), embed_dim=16),
              num_classes=10, pairs=8, tokens=16, text_models=("minilm_l6",),
              cached_pairs=32, cached_mini=8, db_rows=2000, db_dim=64, shortlist_dim=8,
              queries=16, warmup=1, rounds=1, steps=1)


# --- device facts ---------------------------------------------------------------------


def peak_flops() -> float | None:
  """The devices' summed dense bf16 peak in FLOP/s, or None for an unknown device."""
  import jax

  kind = jax.devices()[0].device_kind
  for key, tflops in PEAK_TFLOPS:
    if key.lower() in kind.lower():
      return tflops * 1e12 * jax.device_count()
  return None


def memory_stats() -> dict | None:
  import jax

  try:
    return jax.devices()[0].memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None


def compiled_flops(compiled) -> float | None:
  """XLA's flop count of a compiled program (None if the backend gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def compiled_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries of a compiled program (XLA's memory analysis)."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


# --- timing -----------------------------------------------------------------------------


def interleaved(runs: dict[str, dict], sizes: Sizes) -> None:
  """Time every run's step, taking turns; sets ``run["ms"]`` (median) and ``run["rounds"]``.

  A run is ``{"step": compiled(state, batch) -> (state, metrics), "state", "batch"}``
  (state donated) or ``{"call": f(n) -> [seconds per step]}`` (the torch side).
  """
  import jax

  def go(run, n):
    if "call" in run:
      return float(np.mean(run["call"](n)))
    tick = time.perf_counter()
    for _ in range(n):
      run["state"], metrics = run["step"](run["state"], run["batch"])
    jax.block_until_ready((run["state"], metrics))
    run["loss"] = float(metrics["loss"])
    return (time.perf_counter() - tick) / n

  for run in runs.values():
    go(run, sizes.warmup)
    run["rounds"] = []
  for _ in range(sizes.rounds):
    for run in runs.values():
      run["rounds"].append(1e3 * go(run, sizes.steps))
  for run in runs.values():
    run["ms"] = float(np.median(run["rounds"]))


def compile_step(task, config, mesh, batch):
  """``(compiled_step, state, flops, bytes)``: the loop's jitted step on ``task``."""
  import jax

  from mrl_jax.train import loop, optim

  schedule = optim.learning_rate_schedule(config, task.steps_per_epoch)
  state = loop.create_train_state(task, jax.random.PRNGKey(0),
                                       optim.make_optimizer(config.optim, schedule), mesh)
  step = loop.jit_train_step(task, schedule, mesh, jax.tree.map(lambda x: x.sharding, state))
  compiled = step.lower(state, batch).compile()
  return compiled, state, compiled_flops(compiled), compiled_bytes(compiled)


def row(group: str, name: str, *, ms: float, items: int, unit: str, flops=None, peak=None,
        **extra) -> dict[str, Any]:
  out = {"group": group, "row": name, "step_ms": ms, f"{unit}_per_s": items / (ms / 1e3),
         "tflop_per_step": None if flops is None else flops / 1e12,
         "mfu": None if flops is None or peak is None else flops / (ms / 1e3) / peak}
  out.update(extra)
  return out


# --- ResNet-50 ------------------------------------------------------------------------


def bench_resnet(sizes: Sizes, mesh, peak) -> list[dict]:
  import ml_collections

  from configs import imagenet_resnet50
  from mrl_jax import experiments
  from mrl_jax.tasks.classification import ClassificationTask
  from mrl_jax.train import sharding as sharding_lib

  rng = np.random.default_rng(0)
  s, b = sizes.image_size, sizes.image_batch
  batch = sharding_lib.as_global(
      {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
       "label": rng.integers(0, sizes.num_classes, b).astype(np.int32)},
      sharding_lib.batch_sharding(mesh))
  heads = {"single_head_ff": "ff", "mrl": "mrl", "mrl_e": "mrl_e"}
  runs, facts = {}, {}
  for name, head in heads.items():
    config = imagenet_resnet50.get_config()
    if sizes.resnet.get("name") == "cnn":
      config.encoder = ml_collections.ConfigDict(sizes.resnet)
    else:
      config.encoder.update(sizes.resnet)
    config.nesting.start = 4 if sizes.resnet["embed_dim"] < 64 else 8
    config.head, config.batch_size, config.half_precision = head, b, True
    config.ff_dim = sizes.resnet["embed_dim"] if head == "ff" else None
    config = experiments.task_spec(config, num_devices=mesh.size)
    task = ClassificationTask.without_data(config, mesh=mesh, num_classes=sizes.num_classes,
                                          input_shape=(s, s, 3))
    compiled, state, flops, _ = compile_step(task, config, mesh, batch)
    runs[name] = {"step": compiled, "state": state, "batch": batch}
    facts[name] = flops
  interleaved(runs, sizes)
  base = runs["single_head_ff"]["ms"]
  model = sizes.resnet.get("name") or f"resnet{sizes.resnet['depth']}"
  return [row("resnet", f"{model}_{name}", ms=run["ms"], items=b, unit="images",
              flops=facts[name], peak=peak, batch=b, rounds_ms=run["rounds"],
              ratio_to_single_head=run["ms"] / base, loss=run["loss"])
          for name, run in runs.items()]


# --- text pairs -----------------------------------------------------------------------


def synthetic_pairs_file(directory: str, rows: int, vocab: int) -> str:
  """A JSONL of ``rows`` random-word pairs using every word ``w0 .. w{vocab-6}``.

  Only for the task's validation and its word vocabulary (its size is the
  model's ``vocab_size``): the timed batches are random token ids.
  """
  words = vocab - 5  # + [PAD] [UNK] [CLS] [SEP] [MASK]
  per_text = max(1, math.ceil(words / (2 * rows)))
  ids = np.arange(2 * rows * per_text) % words
  path = os.path.join(directory, f"pairs_{rows}_{vocab}.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for i in range(rows):
      text = [" ".join(f"w{j}" for j in ids[(2 * i + c) * per_text:(2 * i + c + 1) * per_text])
              for c in range(2)]
      f.write(json.dumps({"anchor": text[0], "positive": text[1]}) + "\n")
  return path


def pairs_task(model: tuple, *, batch: int, tokens: int, nested: bool, mesh, workdir: str,
               train_file: str, mini_batch_size: int | None = None):
  """``(task, config)``: the pairs task with a random BERT of shape ``model``, bf16."""
  from configs import text_pairs
  from mrl_jax import experiments
  from mrl_jax.tasks.pairs import PairsTask

  hidden, layers, heads, inner = model
  config = text_pairs.get_config()
  config.train_file, config.eval_file, config.eval_pairs_file = train_file, None, None
  config.encoder.update(dict(embed_dim=hidden, num_layers=layers, num_heads=heads,
                             intermediate_size=inner, dropout=0.1))
  config.batch_size, config.max_length, config.half_precision = batch, tokens, True
  config.optim.learning_rate, config.optim.weight_decay = 1e-4, 0.01
  config.mini_batch_size = mini_batch_size
  if not nested:
    config.loss, config.nesting.dims = "matryoshka", (hidden,)
  config = experiments.task_spec(config, num_devices=mesh.size)
  return PairsTask(config, workdir=workdir, mesh=mesh), config


def token_batch(rng, batch: int, tokens: int, vocab: int) -> dict:
  """Random ids, every text ``tokens`` long: ``{"anchor", "positive"}`` of int32 ``[B, T]``."""
  def column():
    ids = rng.integers(5, vocab, (batch, tokens)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids)}
  return {"anchor": column(), "positive": column()}


def bench_pairs(sizes: Sizes, mesh, peak, tmp: str, smoke: bool, st_python: str | None):
  from mrl_jax.train import sharding as sharding_lib

  rows, rng = [], np.random.default_rng(0)
  vocab = 64 if smoke else VOCAB
  train_file = synthetic_pairs_file(tmp, sizes.pairs, vocab)
  for model_name in sizes.text_models:
    shape = SMOKE_TEXT_MODEL if smoke else TEXT_MODELS[model_name]
    arrays = token_batch(rng, sizes.pairs, sizes.tokens, vocab)
    runs, flops, task = {}, {}, None
    for name, nested in (("plain_mnrl", False), ("nested_fused", True)):
      task, config = pairs_task(shape, batch=sizes.pairs, tokens=sizes.tokens, nested=nested,
                                mesh=mesh, workdir=os.path.join(tmp, model_name + name),
                                train_file=train_file)
      batch = sharding_lib.as_global(arrays, sharding_lib.batch_sharding(mesh))
      compiled, state, flops[name], _ = compile_step(task, config, mesh, batch)
      runs[name] = {"step": compiled, "state": state, "batch": batch}
    worker = None
    if st_python:
      worker = TorchWorker(st_python, shape, vocab, arrays, task.dims, tmp)
      for name in ("st_mnrl", "st_matryoshka"):
        runs[name] = {"call": functools.partial(worker.steps, name)}
    try:
      interleaved(runs, sizes)
    finally:
      if worker is not None:
        worker.close()
    for name, run in runs.items():
      extra = {"batch_pairs": sizes.pairs, "tokens": sizes.tokens, "rounds_ms": run["rounds"],
               "loss": run.get("loss")}
      if name == "nested_fused":
        extra["ratio_to_plain"] = run["ms"] / runs["plain_mnrl"]["ms"]
        if "st_matryoshka" in runs:
          extra["ratio_to_st_matryoshka"] = run["ms"] / runs["st_matryoshka"]["ms"]
      if name == "st_matryoshka":
        extra["ratio_to_st_mnrl"] = run["ms"] / runs["st_mnrl"]["ms"]
        extra["torch"] = worker.info
      # The torch side runs the same model and shapes: XLA's count of the JAX step is its flops.
      f = flops["nested_fused" if name == "st_matryoshka" else "plain_mnrl"] \
          if name.startswith("st_") else flops[name]
      rows.append(row("pairs", f"{model_name}_{name}", ms=run["ms"], items=sizes.pairs,
                      unit="pairs", flops=f, peak=peak, **extra))
  return rows


class TorchWorker:
  """sentence-transformers' side in a subprocess (this script's ``--torch-worker`` mode)."""

  def __init__(self, python: str, shape, vocab: int, arrays: dict, dims, tmp: str):
    npz = os.path.join(tmp, "torch_batch.npz")
    np.savez(npz, **{f"{c}_{k}": v for c, cols in arrays.items() for k, v in cols.items()})
    hidden, layers, heads, inner = shape
    self.proc = subprocess.Popen(
        [python, os.path.abspath(__file__), "--torch-worker", "--batch-file", npz,
         "--model-shape", f"{hidden},{layers},{heads},{inner},{vocab}",
         "--dims", ",".join(str(m) for m in sorted(dims, reverse=True)),
         "--max-position", str(arrays["anchor"]["input_ids"].shape[1])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the torch worker ({python}) exited: see its stderr above")
    self.info = json.loads(line)

  def steps(self, name: str, n: int) -> list[float]:
    self.proc.stdin.write(f"{name} {n}\n")
    self.proc.stdin.flush()
    return json.loads(self.proc.stdout.readline())["seconds"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=120)


def torch_worker(args: argparse.Namespace) -> None:
  """Answer ``VARIANT N`` lines with N train steps of sentence-transformers' losses."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import torch
  import transformers
  from sentence_transformers import SentenceTransformer, losses, models

  hidden, layers, heads, inner, vocab = (int(v) for v in args.model_shape.split(","))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as tmp:
    hf = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=inner,
                                 max_position_embeddings=max(args.max_position, 2))
    transformers.BertModel(hf).save_pretrained(tmp)
    words = [f"[unused{i}]" for i in range(vocab)]
    with open(os.path.join(tmp, "vocab.txt"), "w") as f:
      f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words[5:]]) + "\n")
    transformers.BertTokenizerFast(os.path.join(tmp, "vocab.txt")).save_pretrained(tmp)
    with np.load(args.batch_file, allow_pickle=False) as data:
      columns = [{k: torch.from_numpy(data[f"{c}_{k}"].astype(np.int64)).to(device)
                  for k in ("input_ids", "attention_mask", "token_type_ids")}
                 for c in ("anchor", "positive")]
    runs = {}
    for name in ("st_mnrl", "st_matryoshka"):  # both from the same saved random weights
      model = SentenceTransformer(
          modules=[models.Transformer(tmp, max_seq_length=args.max_position),
                   models.Pooling(hidden, pooling_mode="mean")], device=device)
      model.train()
      mnrl = losses.MultipleNegativesRankingLoss(model)
      dims = [int(d) for d in args.dims.split(",")]
      loss = losses.MatryoshkaLoss(model, mnrl, dims) if name == "st_matryoshka" else mnrl
      runs[name] = (loss, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01))
  print(json.dumps({"torch": torch.__version__, "device": device,
                    "threads": torch.get_num_threads()}), flush=True)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  for line in sys.stdin:
    name, n = line.split()
    loss_fn, optimizer = runs[name]
    times = []
    for _ in range(int(n)):
      start = time.perf_counter()
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=torch.bfloat16):
        loss = loss_fn([dict(c) for c in columns], None)
      loss.backward()
      optimizer.step()
      sync()
      times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": times, "loss": float(loss)}), flush=True)


# --- cached (GradCache) step -------------------------------------------------------------


def bench_cached(sizes: Sizes, mesh, peak, tmp: str, smoke: bool) -> list[dict]:
  from mrl_jax.train import sharding as sharding_lib

  shape = SMOKE_TEXT_MODEL if smoke else TEXT_MODELS["minilm_l6"]
  vocab = 64 if smoke else VOCAB
  train_file = synthetic_pairs_file(tmp, sizes.cached_pairs, vocab)
  rng = np.random.default_rng(1)
  stats = memory_stats() or {}
  limit = stats.get("bytes_limit")

  def build(batch, mini):
    task, config = pairs_task(shape, batch=batch, tokens=sizes.tokens, nested=True, mesh=mesh,
                              workdir=os.path.join(tmp, f"cached_{batch}_{mini}"),
                              train_file=train_file, mini_batch_size=mini)
    arrays = sharding_lib.as_global(token_batch(rng, batch, sizes.tokens, vocab),
                                    sharding_lib.batch_sharding(mesh))
    return (*compile_step(task, config, mesh, arrays), arrays)

  cached = build(sizes.cached_pairs, sizes.cached_mini)
  # Largest full batch (halving from the cached one) whose program fits the device.
  full, full_batch, fits = None, sizes.cached_pairs, "no device memory limit known"
  while full_batch >= sizes.cached_mini:
    candidate = build(full_batch, None)
    if limit is None or (candidate[3] or 0) <= 0.9 * limit:
      full = candidate
      fits = "no device memory limit known" if limit is None else "fits (XLA memory analysis)"
      break
    del candidate
    full_batch //= 2
  if full is None:
    raise RuntimeError(f"no full batch from {sizes.cached_pairs} down to {sizes.cached_mini} "
                       f"fits {limit} bytes")
  out = []
  # Run the smaller program first: the backend's peak counter only grows.
  order = sorted([("gradcache", cached, sizes.cached_pairs), ("full_batch", full, full_batch)],
                 key=lambda t: t[1][3] or 0)
  for name, (compiled, state, flops, nbytes, arrays), batch in order:
    runs = {name: {"step": compiled, "state": state, "batch": arrays}}
    interleaved(runs, sizes)
    peak_bytes = (memory_stats() or {}).get("peak_bytes_in_use")
    out.append(row("cached", f"minilm_l6_{name}_{batch}", ms=runs[name]["ms"], items=batch,
                   unit="pairs", flops=flops, peak=peak, batch_pairs=batch,
                   mini_batch_size=sizes.cached_mini if name == "gradcache" else None,
                   program_bytes=nbytes, peak_bytes_in_use=peak_bytes,
                   rounds_ms=runs[name]["rounds"], loss=runs[name]["loss"],
                   note=fits if name == "full_batch" else None))
    del runs, state
  by = {r["row"].split("_")[2]: r for r in out}  # "gradcache" / "full"
  by["gradcache"]["ratio_time_per_pair_to_full"] = (
      by["full"]["pairs_per_s"] / by["gradcache"]["pairs_per_s"])
  return out


# --- retrieval ---------------------------------------------------------------------------


def bench_retrieval(sizes: Sizes) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from mrl_jax import adaptive_retrieval, exact_search
  from mrl_jax.evaluate.index import PrefixIndex

  key = jax.random.PRNGKey(0)
  # Built on the device in blocks (no 8 GB host copy); decaying variance as an MRL model's.
  scale = jnp.exp(-jnp.arange(sizes.db_dim) / (sizes.db_dim / 4))
  db = jax.random.normal(key, (sizes.db_rows, sizes.db_dim), jnp.float32) * scale
  queries = np.asarray(db[:sizes.queries] + 0.1 * jax.random.normal(
      jax.random.PRNGKey(1), (sizes.queries, sizes.db_dim)) * scale)
  index = PrefixIndex(db)
  del db
  exact = exact_search(queries, index, 10, timed=True)
  adaptive = adaptive_retrieval(queries, index, shortlist_dim=sizes.shortlist_dim,
                                rerank_dim=sizes.db_dim, shortlist_k=200, k=10, timed=True)
  exact_ids, ids = np.asarray(exact.ids), np.asarray(adaptive.ids)
  recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids,
                                                                     strict=True)]))
  rows = []
  for name, res in ((f"exact_{sizes.db_dim}", exact),
                    (f"adaptive_{sizes.shortlist_dim}_to_{sizes.db_dim}", adaptive)):
    rows.append({"group": "retrieval", "row": name, "ms_per_query": 1e3 * res.seconds_per_query,
                 "queries_per_s": 1.0 / res.seconds_per_query, "database": [sizes.db_rows,
                                                                           sizes.db_dim],
                 "queries": sizes.queries, "flops_per_query": res.flops_per_query})
  rows[1]["speedup_vs_exact"] = exact.seconds_per_query / adaptive.seconds_per_query
  rows[1]["recall_at_10_vs_exact"] = recall
  return rows


# --- output -------------------------------------------------------------------------------


def _cell(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
  return str(v)


def table(rows: list[dict]) -> str:
  cols = ("row", "step_ms", "throughput", "tflop_per_step", "mfu", "ratio", "memory_GB")
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    tp = next(((v, k.removesuffix("_per_s")) for k, v in r.items() if k.endswith("_per_s")),
              (None, ""))
    ratio = next(((k, v) for k, v in r.items() if k.startswith(("ratio", "speedup"))), None)
    mem = r.get("peak_bytes_in_use") or r.get("program_bytes")
    cells = [f"{r['group']}/{r['row']}", _cell(r.get("step_ms", r.get("ms_per_query"))),
             f"{_cell(tp[0])} {tp[1]}/s" if tp[0] else "", _cell(r.get("tflop_per_step")),
             "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
             "" if ratio is None else f"{ratio[1]:.3f} ({ratio[0]})",
             "" if not mem else f"{mem / 2**30:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, < ~1 min)")
  parser.add_argument("--only", default=",".join(GROUPS),
                      help=f"comma-separated groups of {GROUPS}")
  parser.add_argument("--output", default=None, help="write the rows as JSON here")
  parser.add_argument("--st-python", default=None,
                      help="a Python with torch + sentence-transformers for the torch rows "
                           "(default: this one if it imports them; 'none' skips them)")
  parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--batch-file", help=argparse.SUPPRESS)
  parser.add_argument("--model-shape", help=argparse.SUPPRESS)
  parser.add_argument("--dims", help=argparse.SUPPRESS)
  parser.add_argument("--max-position", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_worker:
    return torch_worker(args)
  groups = [g.strip() for g in args.only.split(",") if g.strip()]
  bad = sorted(set(groups) - set(GROUPS))
  if bad or not groups:
    parser.error(f"--only={args.only!r}: choose groups from {GROUPS}")
  import importlib.util

  import jax

  from mrl_jax.train import sharding as sharding_lib

  if args.smoke:
    # XLA:CPU compiles threefry's init bits slowly; no timed step depends on the PRNG.
    jax.config.update("jax_default_prng_impl", "rbg")
  st_python = args.st_python
  if st_python is None:
    has_st = all(importlib.util.find_spec(m) for m in ("torch", "sentence_transformers"))
    st_python = sys.executable if has_st else None
  elif st_python == "none":
    st_python = None
  sizes = SMOKE if args.smoke else Sizes()
  mesh, peak = sharding_lib.make_mesh(), peak_flops()
  device = jax.devices()[0]
  header = {"device_kind": device.device_kind, "platform": device.platform,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "peak_bf16_tflops": None if peak is None else peak / 1e12, "smoke": args.smoke,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "torch_rows": "skipped (no torch + sentence-transformers)" if st_python is None
            else st_python}
  print(json.dumps(header))
  rows: list[dict] = []
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    for group in groups:
      tick = time.perf_counter()
      if group == "resnet":
        rows += bench_resnet(sizes, mesh, peak)
      elif group == "pairs":
        rows += bench_pairs(sizes, mesh, peak, tmp, args.smoke, st_python)
      elif group == "cached":
        rows += bench_cached(sizes, mesh, peak, tmp, args.smoke)
      else:
        rows += bench_retrieval(sizes)
      print(f"# {group}: {time.perf_counter() - tick:.0f} s", flush=True)
  header["seconds"] = time.perf_counter() - start
  print(table(rows))
  if args.output:
    from mrl_jax.core import fileio

    fileio.write_json(args.output, {"header": header, "rows": rows}, what="--output")
    print(f"wrote {args.output}")


if __name__ == "__main__":
  main()

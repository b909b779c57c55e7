"""Evaluate an EXPORTED encoder at every nested dim (no optimizer, no train step).

``python -m mrl_jax.evaluate --encoder PATH`` (or ``--workdir DIR``, meaning
``DIR/encoder``) loads the bundle with :class:`~mrl_jax.bundle.encoder.Encoder` and
reads the data it was trained on (named in the bundle):

* image bundles: embeds the train and test splits and hands them, with the
  bundle's nested-head logits, to :func:`~mrl_jax.evaluate.report.evaluate_nested`
  (database = train split, queries = test split: 1-NN, mAP@k, per-dim top-1,
  the cascade, adaptive and funnel retrieval);
* text bundles: :func:`~mrl_jax.evaluate.text.evaluate_text` on the run's eval
  files (Spearman, recall@k, MRR@10 per dim).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from mrl_jax.bundle.encoder import Encoder
from mrl_jax.data import text as text_data
from mrl_jax.evaluate.report import evaluate_nested
from mrl_jax.evaluate.text import evaluate_text, plot_text_metrics


def image_splits(encoder: Encoder) -> dict[str, dict[str, np.ndarray]]:
  """``{split: {"embedding" [N, D] (raw), "logits" [M, N, C], "label" [N]}}`` for the
  train and eval splits named in an image bundle, through the bundle's own encoder."""
  # TensorFlow (the images extra): imported only for image bundles.
  from mrl_jax.data import images, pipeline

  data = encoder.config["data"]
  builder = pipeline.get_builder(data["dataset"], data.get("data_dir"))
  training = encoder.metadata.get("training_config") or {}
  image_input = images.ImageInput.from_fields(training.get("input"))
  out = {}
  for split in (data["train_split"], data["eval_split"]):
    xs, labels = [], []
    for batch in image_input.eval_batches(builder, split, batch_size=256):
      keep = np.asarray(batch["mask"]) > 0
      xs.append(np.asarray(batch["image"])[keep])
      labels.append(np.asarray(batch["label"])[keep])
    x = np.concatenate(xs)
    out[split] = {"embedding": encoder.embed(x, normalize=False), "logits": encoder.logits(x),
                  "label": np.concatenate(labels)}
  return out


def evaluate_encoder(path: str, *, out_dir: str | None = None, **kwargs: Any) -> dict:
  """Every per-dim metric of the exported encoder at ``path``.

  Args:
    path: a bundle folder (``WORKDIR/encoder``).
    out_dir: where ``metrics.json`` and the plots go (default ``PATH/../eval``).
    **kwargs: passed to :func:`~mrl_jax.evaluate.report.evaluate_nested` (images).

  Returns:
    Image bundles: the dict of :func:`~mrl_jax.evaluate.report.evaluate_nested`;
    text bundles: ``{"dims", "<metric>_per_dim": [M] lists, "files"}``.
  """
  encoder = Encoder.load(path)
  out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "eval")
  if encoder.modality == "image":
    data = encoder.config["data"]
    splits = image_splits(encoder)
    train, test = splits[data["train_split"]], splits[data["eval_split"]]
    head = encoder.config["head"]["kind"]
    return evaluate_nested(
        train["embedding"], train["label"], test["embedding"], test["label"], encoder.dims,
        test_logits=test["logits"], out_dir=out_dir,
        model_name={"mrl": "MRL", "mrl_e": "MRL-E"}.get(head, "FF"), **kwargs)
  if encoder.modality == "text":
    training = encoder.metadata["training_config"]
    scored, pairs = text_data.eval_data(training.get("eval_file"),
                                        training.get("eval_pairs_file"))
    embed = lambda texts: encoder.embed(list(texts), normalize=False)
    metrics = evaluate_text(embed, encoder.dims, scored=scored, pairs=pairs)
    result = {"dims": list(encoder.dims), **{k: np.asarray(v).tolist()
                                            for k, v in metrics.items()}}
    os.makedirs(out_dir, exist_ok=True)
    plot = plot_text_metrics(metrics, encoder.dims, os.path.join(out_dir, "metrics_vs_dim.png"),
                             label="MRL" if encoder.is_matryoshka else "baseline")
    result["files"] = [os.path.join(out_dir, "metrics.json"), plot]
    with open(result["files"][0], "w") as f:
      json.dump(result, f, indent=1)
    return result
  raise ValueError(f"evaluate_encoder: {encoder.modality} bundles are evaluated by their task")


def evaluate_workdir(workdir: str, **kwargs: Any) -> dict:
  """:func:`~mrl_jax.evaluate.encoder.evaluate_encoder` of ``workdir/encoder``.

  Raises:
    FileNotFoundError: the workdir has no exported encoder.
  """
  path = os.path.join(workdir, "encoder")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no exported encoder at {path}: train (train.py exports at the "
                            "end) or run mrl_jax.experiments.export_encoder first")
  return evaluate_encoder(path, **kwargs)

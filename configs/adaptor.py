"""Matryoshka-Adaptor: nested dimensions for the stored embeddings of any frozen model.

``python train.py --config=configs/adaptor.py --config.embeddings_file=X.npy --workdir=DIR``
(1,000 steps) prints, per nested dim, neighbour recall@10 of the held-out rows for raw
truncation, PCA and the adaptor: expect the adaptor far above truncation and near PCA
(on all-MiniLM-L6-v2 code embeddings with ``--config.select_max_dim=96``: 0.260 vs
0.125 truncated and 0.259 / 0.267 uncentred / centred PCA at 8 dims;
``benchmarks/adaptor_minilm.py``).

``python train.py --config=configs/adaptor.py --config.embeddings_file=X.npy --workdir=DIR``
trains ``f(e) = e + g(e)`` (Yoon et al. 2024, arXiv:2407.20243) on the float32
``[N, D]`` embeddings in ``X.npy`` so that every prefix ``f(e)[:, :m]`` (truncated,
then L2-normalised) keeps the neighbourhoods of the full ``e``. With
``--config.queries_file=Q.npy --config.pairs_file=P.npy`` (query embeddings
``[Q, D]`` and int ``[P, 2]`` (query row, embeddings row) pairs) it is the supervised
adaptor: an in-batch ranking loss is added at every nested dim.

A fixed share of the rows (``eval_fraction``, at most ``eval_max_rows``; or the
rows in ``eval_rows_file``) is held out: evaluation reports, per nested dim,
neighbour recall@``eval_k`` (and pair recall / nDCG in the supervised mode) of the
adaptor, raw truncation and PCA fit on the training rows. ``DIR/encoder`` is then
an embedding bundle: ``Encoder.load(DIR/encoder).embed(e, dim=m)``, of the step
(step 0, the initialisation, included) with the best held-out ``selection_score``;
its ``mrl_jax.json`` records the adaptor beside the baselines per dim (``"baselines"``)
and the export warns at every dim where the adaptor is below one.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mrl_jax.train.config import add_binary_aware, base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config("adaptor")

  # Data: .npy files only (np.load with allow_pickle=False).
  config.embeddings_file = placeholder(str)  # float32 [N, D]; required
  config.queries_file = placeholder(str)  # float32 [Q, D]; supervised mode (with pairs_file)
  config.pairs_file = placeholder(str)  # int [P, 2]: (queries_file row, embeddings_file row)
  config.pair_batch_size = placeholder(int)  # pairs per step (None: batch_size, capped)
  # Held-out rows: a fixed random eval_fraction of the N rows (at most eval_max_rows), the
  # same whatever config.seed; or the int row ids in eval_rows_file (.npy [E]).
  config.eval_fraction = 0.1
  config.eval_max_rows = 5000
  config.eval_rows_file = placeholder(str)
  config.eval_k = 10  # recall@k / nDCG@k cut-off
  # selection_score (below) averages over the nested dims <= select_max_dim (None: all), e.g.
  # D // 4 to select for the small dims the adaptor is for, whatever happens at full size.
  config.select_max_dim = placeholder(int)

  # Model: f(e) = e + g(e), g an MLP (hidden=() is one affine layer, e.g. (512,) one hidden
  # layer of 512). init "identity": f starts as the identity (truncation); "pca" (hidden=()
  # only): f starts as the uncentred-PCA rotation. encoder.embed_dim is D, read from
  # embeddings_file (leave it None, or set it to D). Defaults: the best measured on MiniLM
  # embeddings (benchmarks/adaptor_minilm.py; a (512,) MLP from the identity overfit there).
  config.adaptor = ml_collections.ConfigDict(dict(hidden=(), activation="relu", init="pca"))
  # An exported mrl_jax text bundle whose embeddings are embeddings_file (full size, unit
  # norm: Encoder.load(PATH).embed(texts)); copied into the export, which then embeds texts.
  config.text_encoder = placeholder(str)

  # Loss (mrl_jax.losses.adaptor.adaptor_loss), summed over the nested dims with their weights.
  config.nesting.start = 8
  config.k = 10  # neighbours per row of the top-k loss, within the global batch
  config.topk_weight = 1.0
  config.pair_weight = 1.0
  config.reconstruction_weight = 0.0
  config.rank_weight = 0.05  # supervised mode only
  config.scale = 20.0  # inverse temperature of the ranking loss
  config.gap = "squared"  # "abs": the paper's |S - S_m|; "squared" measured better on MiniLM
  # Binary-aware terms on f(e), off at 0 (mrl_jax.losses.binary): on the (query, document)
  # pairs when given, else each row's k full-size neighbours in the batch are its positives.
  add_binary_aware(config)

  # Optimisation.
  config.optim.learning_rate = 3e-4  # small: stay near the PCA start (3e-3 overfit 1,754 rows)
  config.optim.weight_decay = 0.0
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_steps = 20
  config.batch_size = 256
  config.loop.num_train_steps = 1000

  # Bookkeeping and model selection: the exported step is the best evaluated one by
  # selection_score, the held-out metric averaged over the nested dims (neighbor_recall_mean
  # unsupervised, pair_ndcg_mean with pairs); step 0 (the initialisation, uncentred PCA with
  # init="pca") is evaluated too, so the export falls back to it when training made the
  # held-out metric worse. --config.checkpoint.best_metric=None exports the last step.
  config.loop.log_every_steps = 100
  config.loop.eval_every_steps = 100
  config.loop.eval_at_start = True
  config.checkpoint.every_steps = 500
  config.checkpoint.best_metric = "selection_score"
  return config

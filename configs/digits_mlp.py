"""Base image config: an MRL MLP on scikit-learn's digits (offline, real, 8x8 images).

``python train.py --config=configs/digits_mlp.py --workdir=DIR`` (2,000 steps, about
15-30 s on 2 CPU cores) prints ``final eval top-1 per dim``: expect about 0.70 at 1 dim,
0.96 at 2 and 0.98-0.99 from 4 to 64 dims on the 359 test images (the MRL row of
``make demo``; ``--config.head=mrl_e`` and ``--config.head=ff --config.ff_dim=k`` give
the other rows).

The demo and the tests start from this file; other image configs import it and
change a few fields. The shared fields (nesting, optimiser, batch, mesh,
checkpoints) come from ``mrl_jax.train.config.base_config``; every field can be
overridden on the command line, e.g.
``python train.py --config=configs/digits_mlp.py --config.head=mrl_e --workdir=DIR``.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mrl_jax.train.config import add_binary_aware, base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config("classification")

  # Data: a local TFDS builder that needs no download (mrl_jax.data.digits).
  config.dataset = "sklearn_digits"
  config.data_dir = placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  config.train_split = "train"
  config.eval_split = "test"
  config.shuffle_buffer = 2048  # tf.data only (grain permutes the whole split each epoch)
  # "grain": random access over ArrayRecord, O(1) exact resume; "tf.data": TFRecord, a
  # resume re-reads every batch before its step.
  config.input_pipeline = "grain"

  # Model: encoder -> embedding z[B, 64] -> nested heads on z[:, :m].
  config.encoder = ml_collections.ConfigDict(dict(name="mlp", embed_dim=64, hidden=(256, 256)))
  config.head = "mrl"  # "mrl", "mrl_e" (weight-tied) or "ff" (fixed feature)
  config.nesting.start = 1  # dims None: 1, 2, 4, ..., 64
  config.ff_dim = placeholder(int)  # head="ff" only: the k of FF-k (None: the full embedding)
  config.label_smoothing = 0.1  # as in the paper's recipe
  # Binary-aware terms on z, off at 0 (mrl_jax.losses.binary): spread_out_weight over rows of
  # different labels, binary_weight a supervised contrastive loss on relaxed sign codes.
  add_binary_aware(config)

  # Optimisation.
  config.optim.learning_rate = 3e-3  # peak
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_steps = 100
  config.batch_size = 128
  config.loop.num_train_steps = 2000

  # Bookkeeping.
  config.loop.log_every_steps = 100
  config.loop.eval_every_steps = 1000
  config.checkpoint.every_steps = 1000
  return config

"""Base config: an MRL MLP on scikit-learn's digits (offline, real, 8x8 images).

The demo and the tests start from this file; other configs import it and change
a few fields. Override any field from the command line, e.g.
``python train.py --config=configs/digits_mlp.py --config.head=mrl_e``.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: a local TFDS builder that needs no download (mrl_jax.data.digits).
  config.dataset = "sklearn_digits"
  config.data_dir = placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  config.train_split = "train"
  config.eval_split = "test"
  config.shuffle_buffer = 2048

  # Model: encoder -> embedding z[B, 64] -> nested heads on z[:, :m].
  config.encoder = ml_collections.ConfigDict(
      dict(name="mlp", embed_dim=64, hidden=(256, 256)))
  config.head = "mrl"  # "mrl", "mrl_e" (weight-tied) or "ff" (fixed feature)
  config.nesting = ml_collections.ConfigDict(
      # dims None: powers of two from `start` up to embed_dim (1, 2, ..., 64).
      dict(dims=placeholder(tuple), start=1, weights=placeholder(tuple)))
  config.ff_dim = placeholder(int)  # for head="ff": the k of FF-k (None: the full embedding)
  config.half_precision = False

  # Optimisation.
  config.optimizer = "adamw"
  config.learning_rate = 3e-3  # peak
  config.learning_rate_batch_size = placeholder(int)  # if set, lr scales by batch_size / this
  config.momentum = 0.9  # sgd only
  config.weight_decay = 1e-4  # never applied to biases or normalisation scales
  config.schedule = "warmup_cosine"
  config.warmup_steps = 100
  config.warmup_epochs = placeholder(float)  # if set, overrides warmup_steps
  config.label_smoothing = 0.1  # as in the paper's recipe
  config.batch_size = 128  # global, over all devices and hosts
  config.num_train_steps = 2000
  config.num_epochs = placeholder(float)  # alternative to num_train_steps

  # Scale-out (mrl_jax.sharding): a ("data", "fsdp") mesh; -1 takes the remaining devices.
  config.mesh_shape = (-1, 1)  # data parallel; e.g. (2, 4) also splits large arrays over 4
  config.fsdp_min_size = 2**16  # with fsdp > 1: arrays of at least this many elements are split

  # Bookkeeping.
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.max_to_keep = 2
  config.async_checkpointing = True  # write checkpoints in the background
  config.best_metric = placeholder(str)  # e.g. "top1/dim_8": also keep the best eval step
  config.best_mode = "max"  # or "min" (for a loss)
  return config

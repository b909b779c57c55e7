"""The paper's ResNet-50 / ImageNet-1K recipe (Kusupati et al. 2022, §4.1 and Appendix C;
the reference's RAIVNLab/MRL training scripts).

``python train.py --config=configs/imagenet_resnet50.py --config.data_dir=TFDS_DIR --workdir=DIR``
prints ``final eval top-1 per dim``; the paper's MRL ResNet-50 reached 66.63 / 73.53 /
76.30 / 76.80 % ImageNet-1K val top-1 at 8 / 16 / 128 / 2048 dims (Table 1), which a run
should approach. Not reproduced here (no accelerator).

One command per row of the paper's table (docs/imagenet.md, "Reproducing the paper"):

  python train.py --config=configs/imagenet_resnet50.py --workdir=DIR \
      --config.data_dir=gs://BUCKET/tensorflow_datasets            # MRL
  ... --config.head=mrl_e                                            # MRL-E (tied head)
  ... --config.head=ff --config.ff_dim=8                             # FF-8 (one run per k)
  ... --config.nesting.start=16                                      # nesting from 16

The recipe: SGD with momentum 0.9, weight decay 1e-4 (none on BatchNorm
parameters or biases), label smoothing 0.1 in every nested head, 40 epochs,
global batch 1024, peak learning rate 0.425 at batch 1024 (scaled linearly
with ``batch_size``), linear warm-up from 1e-4 x peak over 2 epochs then linear
decay to 0 (per step), progressive resizing 160 -> 192 px over epochs 29-34 in
multiples of 32, evaluation at 256 resize / 224 centre crop, bf16 compute.

BatchNorm statistics are those of the whole global batch (across devices) by
default; ``--config.encoder.bn_group_size=512`` gives the reference run's
per-GPU statistics (2 GPUs x 512).

``imagenet2012`` must already be prepared under ``data_dir`` (TFDS needs the
manually downloaded archives); mrl_jax never downloads.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import digits_mlp
from mrl_jax.data.images import IMAGENET_MEAN, IMAGENET_STD


def get_config() -> ml_collections.ConfigDict:
  config = digits_mlp.get_config()

  # Data: TFDS ImageNet-1K, Inception-style train crops, 256/224 evaluation.
  config.dataset = "imagenet2012"
  config.train_split = "train"
  config.eval_split = "validation"
  config.shuffle_buffer = 16 * 1024  # per process, of encoded images
  config.input = ml_collections.ConfigDict(dict(
      style="imagenet", image_size=224, crop_ratio=224 / 256,
      train_sizes=(160, 192), ramp_epochs=(29.0, 34.0), size_multiple=32,
      area_range=(0.08, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD, cache=False))

  # Model: ResNet-50, the 2048-d pooled feature is the representation.
  config.encoder = ml_collections.ConfigDict(dict(
      name="resnet", embed_dim=2048, depth=50, width=64, stem="imagenet",
      zero_init_residual=False, bn_group_size=placeholder(int), bn_momentum=0.9))
  config.head = "mrl"  # "mrl", "mrl_e" or "ff" (with ff_dim)
  config.nesting.start = 8  # 8, 16, ..., 2048
  config.half_precision = True

  # Optimisation.
  config.optim.optimizer = "sgd"
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  config.optim.learning_rate = 0.425
  config.optim.learning_rate_batch_size = 1024
  config.optim.schedule = "warmup_linear"
  config.optim.warmup_epochs = 2.0
  config.label_smoothing = 0.1
  config.batch_size = 1024
  config.loop.num_train_steps = None
  config.loop.num_epochs = 40.0

  # Bookkeeping (1,251 steps per epoch at batch 1024).
  config.loop.log_every_steps = 100
  config.loop.eval_every_steps = 5 * 1251
  config.checkpoint.every_steps = 1251
  config.checkpoint.max_to_keep = 3
  return config

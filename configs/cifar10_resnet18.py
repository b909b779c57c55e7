"""ResNet-18 (CIFAR stem) on CIFAR-10, trained the paper's way with MRL heads.

``python train.py --config=configs/cifar10_resnet18.py --config.data_dir=TFDS_DIR --workdir=DIR``
prints ``final eval top-1 per dim`` at 8, 16, ..., 512 dims. The paper reports no
CIFAR-10 number and none was measured here (no accelerator); expect the usual ResNet-18
CIFAR-10 accuracy at the full 512 dims, a little less at the smallest.

  python train.py --config=configs/cifar10_resnet18.py --workdir=DIR \
      [--config.head=mrl_e | --config.head=ff --config.ff_dim=k]

The paper's recipe (imported from ``imagenet_resnet50``) with CIFAR data and
the usual CIFAR schedule: pad-4 random crops and flips, 200 epochs, learning
rate 0.1 per 128 examples, weight decay 5e-4, cosine decay after a 5-epoch
warm-up. The embedding is the 512-d pooled feature, nested 8, 16, ..., 512.
``cifar10`` must be prepared under ``data_dir`` (``tfds build cifar10``).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import imagenet_resnet50
from mrl_jax.data.images import CIFAR10_MEAN, CIFAR10_STD


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_resnet50.get_config()
  config.dataset = "cifar10"
  config.eval_split = "test"
  config.shuffle_buffer = 50_000
  config.input = ml_collections.ConfigDict(dict(
      style="cifar", pad=4, mean=CIFAR10_MEAN, std=CIFAR10_STD, cache=True,
      image_size=placeholder(int), train_sizes=placeholder(tuple)))  # "imagenet" style only
  config.encoder.embed_dim = 512
  config.encoder.depth = 18
  config.encoder.stem = "cifar"
  config.optim.learning_rate = 0.1
  config.optim.learning_rate_batch_size = 128
  config.batch_size = 512
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_epochs = 5.0
  config.loop.num_epochs = 200.0
  config.loop.eval_every_steps = 10 * 97  # 97 steps per epoch at batch 512
  config.checkpoint.every_steps = 10 * 97
  return config

"""ViT-B/16 on ImageNet-1K with MRL heads on the 768-d class token.

``python train.py --config=configs/imagenet_vit_b16.py --config.data_dir=TFDS_DIR --workdir=DIR``
prints ``final eval top-1 per dim`` at 8, ..., 512, 768 dims; expect less than DeiT-B's
81.8% at 768 (no strong augmentation). Not measured here (no accelerator).

  python train.py --config=configs/imagenet_vit_b16.py --workdir=DIR \
      --config.data_dir=gs://BUCKET/tensorflow_datasets [--config.encoder.pool=mean]

The ImageNet data settings of ``imagenet_resnet50`` at a fixed 224 px (the
position embedding fixes the resolution), and a DeiT-style optimiser: AdamW,
learning rate 5e-4 per 512 examples, weight decay 0.05, 300 epochs, cosine
decay after a 5-epoch warm-up, label smoothing 0.1. No strong augmentation
(RandAugment, mixup) is included, so expect less than DeiT-B's 81.8%. The
paper's ViT-B/16 results were trained on JFT-300M and are not reproducible on
ImageNet-1K alone. Nesting: 8, 16, ..., 512, 768.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import imagenet_resnet50


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_resnet50.get_config()
  config.input.train_sizes = placeholder(tuple)  # None: always image_size (224)
  config.encoder = ml_collections.ConfigDict(dict(
      name="vit", embed_dim=768, patch_size=16, num_layers=12, num_heads=12, mlp_dim=3072,
      dropout_rate=0.0, pool="cls"))
  config.optim.optimizer = "adamw"
  config.optim.learning_rate = 5e-4
  config.optim.learning_rate_batch_size = 512
  config.optim.weight_decay = 0.05
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_epochs = 5.0
  config.loop.num_epochs = 300.0
  config.loop.eval_every_steps = 10 * 1251
  return config

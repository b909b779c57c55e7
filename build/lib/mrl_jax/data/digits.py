"""scikit-learn's handwritten digits as a local TFDS data set (no download).

1,797 real 8x8 grey-scale digits (10 classes) ship inside the scikit-learn
wheel. This builder serves them through TFDS/tf.data like any other image data
set, split deterministically and stratified into train (80%) and test (20%).
Pixel values 0..16 are scaled to 0..255 uint8 images ``[8, 8, 1]``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def stratified_split(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Indices ``(train, test)``: per class, a seeded ``test_fraction`` goes to test."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * len(idx)))
    test.extend(idx[:n_test])
    train.extend(idx[n_test:])
  return np.sort(np.array(train)), np.sort(np.array(test))


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's bundled 8x8 digits, stratified 80/20 train/test."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 80/20 split with seed 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ship with scikit-learn: nothing to download
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split: str):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    train, test = stratified_split(digits.target)
    for i in train if split == "train" else test:
      yield int(i), {"image": images[i], "label": int(digits.target[i])}

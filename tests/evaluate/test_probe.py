import numpy as np

from mrl_jax.evaluate import probe


def _reference_softmax_regression(x, y, num_classes, steps=3000, lr=0.5, l2=1e-4):
  """Plain gradient descent in numpy on the same standardised objective."""
  mean, std = x.mean(0), x.std(0) + 1e-6
  x = (x - mean) / std
  w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
  onehot = np.eye(num_classes)[y]
  for _ in range(steps):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w -= lr * (x.T @ (p - onehot) / len(x) + 2 * l2 * w)
    b -= lr * (p - onehot).mean(0)
  return (mean, std, w, b)


def test_probe_matches_a_numpy_reference_on_predictions():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 5)) * 2
  y = rng.integers(0, 3, size=300)
  x = centers[y] + rng.normal(size=(300, 5))
  ours = probe.fit_linear_probe(x, y, 3, steps=500)
  ref = _reference_softmax_regression(x, y, 3)
  agree = np.mean(np.argmax(probe.probe_logits(ours, x), 1) ==
                  np.argmax(probe.probe_logits(ref, x), 1))
  assert agree > 0.97


def test_truncated_probe_reads_only_the_prefix():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, size=400)
  # Dim 0 is noise; dim 1 carries the label. A 1-dim probe must be near chance.
  x = np.stack([rng.normal(size=400), y * 4.0 + rng.normal(size=400)], 1)
  accs = probe.truncated_probe_accuracy(x[:300], y[:300], x[300:], y[300:], (1, 2), 2)
  assert accs[0] < 0.7 and accs[1] > 0.95

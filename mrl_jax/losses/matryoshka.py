"""The Matryoshka wrapper of any embedding loss, and its 2-D (layers x sizes) version.

:func:`matryoshka` is sentence-transformers' ``MatryoshkaLoss``, :func:`adaptive_layer`
its ``AdaptiveLayerLoss`` and :func:`matryoshka_2d` its ``Matryoshka2dLoss``, as
pure functions of embedding arrays computed once by the caller.

Which arguments of a base loss are embeddings (truncated per size) and which
carry a layer axis is always explicit, never guessed from shapes: the built-in
losses declare theirs (``embedding_args`` attribute), other losses take
``embedding_args=`` / ``layer_args=`` (positions or names, as optax passes
explicit masks). Guessing from shapes is only an opt-in (``"auto"``), and it
refuses the ambiguous case ``B == D``, where a ``[B, B]`` score matrix and a
``[B, D]`` embedding look the same.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.core.checks import check_bool, check_non_negative
from mrl_jax.core.nesting import Nesting
from mrl_jax.losses.embedding import l2_normalize, layer_kl_divergence

EmbeddingLoss = Callable[..., jax.Array]
ArgSpec = tuple[int | str, ...]
AUTO = "auto"
LAYER_WEIGHTINGS = ("uniform", "linear", "log")


# --- which arguments are embeddings ------------------------------------------


def declared_embedding_args(fn: Callable) -> ArgSpec | None:
  """``fn.embedding_args`` (looking through ``functools.partial``), or ``None``."""
  while True:
    spec = getattr(fn, "embedding_args", None)
    if spec is not None:
      return tuple(spec)
    if not isinstance(fn, functools.partial):
      return None
    fn = fn.func


def _signature(fn: Callable) -> inspect.Signature | None:
  try:
    return inspect.signature(fn)
  except (TypeError, ValueError):
    return None


def _positional_names(sig: inspect.Signature | None) -> list[str]:
  if sig is None:
    return []
  kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return [p.name for p in sig.parameters.values() if p.kind in kinds]


def _check_spec(fn: Callable, spec, what: str) -> ArgSpec:
  """A tuple of ints (positions) and strs (names), the names checked against ``fn``."""
  if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
    raise ValueError(f"{what} must be a non-empty sequence of argument positions (ints) "
                     f"and/or names (strs), or {AUTO!r}; got {spec!r}")
  spec = tuple(spec)
  sig = _signature(fn)
  for item in spec:
    if isinstance(item, bool) or not isinstance(item, (int, str)):
      raise ValueError(f"{what} entries must be ints or strs, got {item!r} in {spec}")
    if isinstance(item, int) and item < 0:
      raise ValueError(f"{what} positions must be >= 0, got {item} in {spec}")
    if isinstance(item, str) and sig is not None:
      takes_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD
                         for p in sig.parameters.values())
      if item not in sig.parameters and not takes_kwargs:
        raise ValueError(f"{what} names {item!r}, which is not an argument of "
                         f"{getattr(fn, '__name__', fn)}{sig}")
  return spec


def _resolve(fn: Callable, spec: ArgSpec, args: tuple, kwargs: dict,
             ) -> tuple[list[int], list[str]]:
  """The positions and keyword names of ``spec`` present (and not ``None``) in this call."""
  names_by_pos = _positional_names(_signature(fn))
  pos, names = set(), set()
  for item in spec:
    if isinstance(item, str):
      if item in kwargs:
        names.add(item)
      elif item in names_by_pos and names_by_pos.index(item) < len(args):
        pos.add(names_by_pos.index(item))
    elif item < len(args):
      pos.add(item)
    elif item < len(names_by_pos) and names_by_pos[item] in kwargs:
      names.add(names_by_pos[item])
  pos = sorted(i for i in pos if args[i] is not None)
  names = sorted(k for k in names if kwargs[k] is not None)
  return pos, names


def _is_float_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _auto_embedding_slots(args: tuple, kwargs: dict) -> tuple[list[int], list[str]]:
  """Opt-in shape guess: ``args[0]`` and every float array ``[..., D]`` with >= 2 axes."""
  if not args or not _is_float_array(args[0]) or args[0].ndim < 2:
    raise ValueError(
        f"embedding_args={AUTO!r} needs an embedding [B, D] as first positional argument, "
        f"got {getattr(args[0], 'shape', args[0]) if args else 'nothing'}")
  batch, dim = args[0].shape[-2], args[0].shape[-1]
  is_emb = lambda x: _is_float_array(x) and x.ndim >= 2 and x.shape[-1] == dim
  pos = [i for i, x in enumerate(args) if is_emb(x)]
  names = [k for k, x in kwargs.items() if is_emb(x)]
  if batch == dim and len(pos) + len(names) > 1:
    raise ValueError(
        f"embedding_args={AUTO!r} cannot tell embeddings [B, D] from [B, B] score matrices "
        f"when B == D == {dim}: pass embedding_args= (positions or names) explicitly")
  return pos, names


def _embedding_dim(pos, names, args, kwargs, what: str) -> int:
  chosen = [(i, args[i]) for i in pos] + [(k, kwargs[k]) for k in names]
  if not chosen:
    raise ValueError(f"none of the {what} is in this call")
  sizes = {}
  for key, x in chosen:
    if not hasattr(x, "shape") or len(x.shape) < 1:
      raise ValueError(f"{what} {key!r} must be an array [..., D], got {x!r}")
    sizes[key] = x.shape[-1]
  if len(set(sizes.values())) != 1:
    raise ValueError(f"{what} disagree on their size D: {sizes}")
  return next(iter(sizes.values()))


def _truncated_call(base_loss: EmbeddingLoss, m: int, normalize: bool, pos: list[int],
                    names: list[str], args: tuple, kwargs: dict) -> jax.Array:
  """``base_loss`` on every embedding argument cut to its first ``m`` dims (then normalised)."""
  cut = lambda x: l2_normalize(x[..., :m]) if normalize else x[..., :m]
  args = tuple(cut(x) if i in pos else x for i, x in enumerate(args))
  kwargs = {k: cut(x) if k in names else x for k, x in kwargs.items()}
  out = base_loss(*args, **kwargs)
  if jnp.ndim(out) != 0:
    raise ValueError(f"the base loss must return a scalar, got shape {jnp.shape(out)}")
  return jnp.asarray(out, jnp.float32)


def _steps(name: str, value, limit: int) -> int | None:
  """``None`` or ``-1`` (all: sentence-transformers' convention) -> ``None``; else ``k >= 1``."""
  if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                       and value == -1):
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or (
      limit is not None and value > limit):
    upper = "" if limit is None else f", <= {limit}"
    raise ValueError(f"{name} must be -1 or None (all), or an int >= 1{upper}; got {value!r}")
  return int(value)


def sample_nested_indices(
    rng: jax.Array, num_dims: int, k: int, *, always_include_largest: bool = False,
) -> jax.Array:
  """``k`` distinct indices into a nesting list of ``num_dims`` sizes, drawn inside jit.

  Uniform without replacement; with ``always_include_largest`` the last index
  ``num_dims - 1`` is always one of them (the other ``k - 1`` drawn from the
  rest). Static output shape ``[k]`` int32, so a jitted step never recompiles.

  Raises:
    ValueError: unless ``1 <= k <= num_dims``.
  """
  if isinstance(num_dims, bool) or not isinstance(num_dims, (int, np.integer)) or num_dims < 1:
    raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_dims:
    raise ValueError(f"cannot sample k={k!r} of {num_dims} nested sizes (need 1 <= k <= "
                     f"{num_dims})")
  check_bool("always_include_largest", always_include_largest)
  if always_include_largest:
    rest = jax.random.permutation(rng, num_dims - 1)[: k - 1]
    return jnp.concatenate([rest, jnp.full((1,), num_dims - 1)]).astype(jnp.int32)
  return jax.random.permutation(rng, num_dims)[:k].astype(jnp.int32)


def _with_signature(loss: Callable, base_loss: Callable, *, rng: bool) -> None:
  """Give ``loss`` the base loss's signature (plus ``rng=``), so wrappers resolve names."""
  sig = _signature(base_loss)
  if sig is None:
    return
  params = list(sig.parameters.values())
  if rng and "rng" not in sig.parameters:
    extra = inspect.Parameter("rng", inspect.Parameter.KEYWORD_ONLY, default=None)
    var_kw = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD] + [extra] + var_kw
  loss.__signature__ = sig.replace(parameters=params)


def matryoshka(
    base_loss: EmbeddingLoss,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    *,
    n_dims_per_step: int | None = -1,
    always_include_largest: bool = False,
    normalize: bool = True,
    embedding_args: Sequence[int | str] | str | None = None,
) -> EmbeddingLoss:
  """The Matryoshka version of any embedding loss (sentence-transformers' MatryoshkaLoss).

  ``L(e_1, ..., y) = sum_{m in dims} w_m * base_loss(n(e_1[..., :m]), ..., y)``
  with ``n`` the L2 normalisation (identity when ``normalize=False``): every
  embedding argument, teachers included, is first truncated to its first ``m``
  dims and only then renormalised. The wrapper never runs an encoder: the
  embeddings are computed once by the caller and every size is a slice of them.

  With ``n_dims_per_step=k`` the returned loss takes a keyword ``rng`` and sums
  over ``k`` sizes drawn without replacement at each call (inside jit, with
  static shapes: one ``lax.switch`` over the sizes per drawn slot, so only the
  drawn sizes are computed and nothing recompiles), ``sum_{m in S} w_m L_m``,
  unscaled as in sentence-transformers. It works with every base loss.

  Args:
    base_loss: ``base_loss(*args, **kwargs) -> scalar``; its embedding arguments
      are ``[..., D]`` arrays.
    dims: nested sizes, in any order (sentence-transformers users write
      ``[768, 512, 256, 128, 64]``), distinct, ``<= D``.
    weights: ``w_m`` per size, aligned with ``dims`` as given; all ones by default.
    n_dims_per_step: ``-1`` or ``None`` (sentence-transformers' default) for
      every size at each step, or ``k`` in ``[1, len(dims)]`` sizes drawn per step.
    always_include_largest: with ``n_dims_per_step``, always draw the largest size.
    normalize: L2-renormalise each truncated embedding before the base loss.
    embedding_args: the arguments to truncate: positions (ints) and/or names
      (strs) of ``base_loss``'s arguments, e.g. ``(0, 1, "teacher")``; a name
      also matches the argument when it is passed by position. ``None``: the
      ones ``base_loss`` declares (``base_loss.embedding_args``; every loss of
      :mod:`mrl_jax.losses` does, through ``functools.partial`` too). ``"auto"``
      (opt-in): the first positional argument and every float array with >= 2
      axes and the same last-axis size ``D``, refused when ``B == D``.
      Arguments passed as ``None`` (no hard negatives) are skipped.

  Returns:
    ``loss(*args, **kwargs) -> float32 scalar`` with ``base_loss``'s arguments,
    plus a required keyword ``rng`` when sizes are sampled. It declares the
    resolved ``embedding_args`` and carries ``base_loss``'s signature, so
    :func:`adaptive_layer` can wrap it.

  Raises:
    ValueError: bad dims or weights (see :class:`~mrl_jax.core.nesting.Nesting`),
      ``n_dims_per_step``, ``embedding_args`` (or none declared), and at call time
      a size larger than the embeddings.
  """
  nesting = Nesting(tuple(dims), None if weights is None else tuple(weights))
  dims = nesting.dims
  weight_values = nesting.weights
  k = _steps("n_dims_per_step", n_dims_per_step, len(dims))
  check_bool("always_include_largest", always_include_largest)
  check_bool("normalize", normalize)
  if always_include_largest and k is None:
    raise ValueError("always_include_largest only applies with n_dims_per_step >= 1")
  if embedding_args is None:
    embedding_args = declared_embedding_args(base_loss)
    if embedding_args is None:
      raise ValueError(
          f"matryoshka cannot tell which arguments of {getattr(base_loss, '__name__', base_loss)}"
          " are embeddings: pass embedding_args=(0, 1, ...) (positions and/or names), or "
          f"embedding_args={AUTO!r} to guess from shapes")
  if embedding_args != AUTO:
    embedding_args = _check_spec(base_loss, embedding_args, "embedding_args")

  def prepare(args, kwargs):
    if embedding_args == AUTO:
      pos, names = _auto_embedding_slots(args, kwargs)
    else:
      pos, names = _resolve(base_loss, embedding_args, args, kwargs)
    dim = _embedding_dim(pos, names, args, kwargs, "embedding arguments")
    if dims[-1] > dim:
      raise ValueError(f"nesting dim {dims[-1]} exceeds the embedding size D={dim}")
    return functools.partial(_truncated_call, base_loss, pos=pos, names=names, args=args,
                             kwargs=kwargs, normalize=normalize)

  if k is None:

    def loss(*args, **kwargs):
      call = prepare(args, kwargs)
      w = jnp.asarray(weight_values, jnp.float32)
      return sum(w[i] * call(m=m) for i, m in enumerate(dims))

  else:

    def loss(*args, rng: jax.Array, **kwargs):
      call = prepare(args, kwargs)
      w = jnp.asarray(weight_values, jnp.float32)
      picked = sample_nested_indices(rng, len(dims), k,
                                     always_include_largest=always_include_largest)
      branches = [functools.partial(call, m=m) for m in dims]
      per_slot = jax.lax.map(lambda i: w[i] * jax.lax.switch(i, branches), picked)
      return jnp.sum(per_slot)

  loss.__name__ = f"matryoshka_{getattr(base_loss, '__name__', 'loss')}"
  loss.embedding_args = embedding_args
  loss.samples = k is not None
  _with_signature(loss, base_loss, rng=k is not None)
  return loss


# --- 2-D Matryoshka: the layer axis -------------------------------------------


def _layer_weight(weighting: str, layer: jax.Array, num_drawn: int) -> jax.Array:
  """The weight of prior layer ``layer`` (0-based) among ``num_drawn`` drawn layers."""
  layer = jnp.asarray(layer, jnp.float32)
  if weighting == "uniform":
    return jnp.ones_like(layer) / num_drawn
  if weighting == "linear":
    return 1.0 / ((1.0 + layer) * num_drawn)
  return 1.0 / ((1.0 + jnp.log1p(layer)) * num_drawn)  # "log"


def adaptive_layer(
    base_loss: EmbeddingLoss,
    *,
    n_layers_per_step: int | None = 1,
    last_layer_weight: float = 1.0,
    prior_layers_weight: float = 1.0,
    kl_div_weight: float = 1.0,
    kl_temperature: float = 0.3,
    layer_weighting: str = "uniform",
    layer_args: Sequence[int | str] | str | None = None,
    base_loss_takes_rng: bool | None = None,
) -> EmbeddingLoss:
  """A loss over every layer of an encoder (sentence-transformers' AdaptiveLayerLoss).

  The per-layer arguments carry a leading layer axis ``[L, ...]`` (pooled
  embeddings after each Transformer layer; layer ``L - 1`` is the last). With
  ``S`` a set of ``k`` earlier layers drawn per step from ``{0, ..., L - 2}``
  (all of them when ``n_layers_per_step`` is ``-1``/``None`` or ``>= L - 1``):

  ``L = last_layer_weight * base(e[L-1])
      + sum_{l in S} [ prior_layers_weight * v_l * base(e[l])
                       + kl_div_weight * T * KL(e[L-1] -> e[l]) ]``

  with the layer weighting ``v_l`` (sentence-transformers #3901): ``"uniform"``
  ``1 / |S|`` (its default since then, as in the 2DMSE paper and Starbucks),
  ``"linear"`` ``1 / ((1 + l) |S|)`` (its earlier hard-coded decay and this
  library's earlier behaviour), ``"log"`` ``1 / ((1 + ln(1 + l)) |S|)`` (the
  ESE revision). ``KL`` is :func:`layer_kl_divergence` at temperature ``T =
  kl_temperature`` over the rows of every per-layer argument, with the last
  layer as a stop-gradient teacher (``kl_temperature = 0`` disables it).
  Layers are drawn inside jit with static shapes.

  Args:
    base_loss: an embedding loss on one layer's arguments (e.g. a
      :func:`matryoshka` loss).
    n_layers_per_step: ``k >= 1`` earlier layers per step, or ``-1``/``None`` for all.
    last_layer_weight: weight ``>= 0`` of the last layer's loss.
    prior_layers_weight: weight ``>= 0`` of the earlier layers' losses.
    kl_div_weight: weight ``>= 0`` of the KL terms.
    kl_temperature: ``T >= 0``; ``0`` turns the KL terms off.
    layer_weighting: ``"uniform"``, ``"linear"`` or ``"log"``, see above.
    layer_args: positions / names of the per-layer arguments. ``None``: the
      embedding arguments ``base_loss`` declares (``embedding_args``), all with
      a layer axis; pass e.g. ``(0,)`` when a teacher has none. ``"auto"``
      (opt-in): ``args[0]`` and every float array with >= 3 axes, leading
      size ``L`` and last size ``D``.
    base_loss_takes_rng: pass each call of ``base_loss`` its own ``rng``;
      ``None``: when ``base_loss`` is a :func:`matryoshka` loss that samples sizes.

  Returns:
    ``loss(*args, rng=None, **kwargs) -> float32 scalar``; ``rng`` is required
    when layers are sampled or ``base_loss_takes_rng``.

  Raises:
    ValueError: a bad argument (named in the message), per-layer arguments
      that disagree on ``L``, or a missing ``rng``.
  """
  k_layers = _steps("n_layers_per_step", n_layers_per_step, None)
  for name, value in (("last_layer_weight", last_layer_weight),
                      ("prior_layers_weight", prior_layers_weight),
                      ("kl_div_weight", kl_div_weight), ("kl_temperature", kl_temperature)):
    check_non_negative(name, value)
  if layer_weighting not in LAYER_WEIGHTINGS:
    raise ValueError(f"layer_weighting must be one of {LAYER_WEIGHTINGS}, got "
                     f"{layer_weighting!r}")
  if base_loss_takes_rng is None:
    base_loss_takes_rng = bool(getattr(base_loss, "samples", False))
  check_bool("base_loss_takes_rng", base_loss_takes_rng)
  if layer_args is None:
    layer_args = declared_embedding_args(base_loss)
    if layer_args is None or layer_args == AUTO:
      raise ValueError(
          f"adaptive_layer cannot tell which arguments of "
          f"{getattr(base_loss, '__name__', base_loss)} carry a layer axis [L, ...]: pass "
          f"layer_args=(0, 1, ...) (positions and/or names), or layer_args={AUTO!r}")
  if layer_args != AUTO:
    layer_args = _check_spec(base_loss, layer_args, "layer_args")

  def slots(args, kwargs):
    if layer_args == AUTO:
      if not args or not _is_float_array(args[0]) or args[0].ndim < 3:
        raise ValueError(
            f"layer_args={AUTO!r} needs per-layer embeddings [L, B, D] as first positional "
            f"argument, got {getattr(args[0], 'shape', None) if args else 'nothing'}")
      num, dim = args[0].shape[0], args[0].shape[-1]
      is_layered = lambda x: (_is_float_array(x) and x.ndim >= 3 and x.shape[0] == num
                              and x.shape[-1] == dim)
      pos = [i for i, x in enumerate(args) if is_layered(x)]
      names = [n for n, x in kwargs.items() if is_layered(x)]
    else:
      pos, names = _resolve(base_loss, layer_args, args, kwargs)
    chosen = {**{i: args[i] for i in pos}, **{n: kwargs[n] for n in names}}
    if not chosen:
      raise ValueError("none of the per-layer arguments (layer_args) is in this call")
    sizes = {key: (np.shape(x)[0] if np.ndim(x) >= 2 else None) for key, x in chosen.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
      raise ValueError(f"per-layer arguments must all be [L, ...] with the same L, got "
                       f"{ {key: np.shape(x) for key, x in chosen.items()} }")
    return next(iter(sizes.values())), pos, names

  def loss(*args, rng: jax.Array | None = None, **kwargs):
    num_layers, pos, names = slots(args, kwargs)
    num_prior = num_layers - 1
    k = num_prior if k_layers is None else min(k_layers, num_prior)
    sampled = k < num_prior
    if rng is None and (base_loss_takes_rng or sampled):
      raise ValueError("this 2-D Matryoshka loss samples layers or sizes: pass rng=")
    layer_rng = last_rng = layer_keys = None
    if rng is not None:
      layer_rng, last_rng, keys_rng = jax.random.split(rng, 3)
      layer_keys = jax.random.split(keys_rng, max(k, 1))

    def at(select):
      """The call's arguments with every per-layer argument replaced by ``select(x)``."""
      new_args = tuple(select(jnp.asarray(x)) if i in pos else x for i, x in enumerate(args))
      new_kwargs = {n: select(jnp.asarray(x)) if n in names else x for n, x in kwargs.items()}
      return new_args, new_kwargs

    def base(call_args, call_kwargs, key):
      extra = {"rng": key} if base_loss_takes_rng else {}
      return jnp.asarray(base_loss(*call_args, **call_kwargs, **extra), jnp.float32)

    last_args, last_kwargs = at(lambda x: x[-1])
    total = last_layer_weight * base(last_args, last_kwargs, last_rng)
    if k == 0:
      return total
    if sampled:
      layers = jax.random.permutation(layer_rng, num_prior)[:k].astype(jnp.int32)
    else:
      layers = jnp.arange(num_prior, dtype=jnp.int32)
    teachers = [x[-1] for x in (*[args[i] for i in pos], *[kwargs[n] for n in names])]

    def one_layer(carry):
      layer, key = carry
      layer_args_, layer_kwargs = at(lambda x: x[layer])
      weight = prior_layers_weight * _layer_weight(layer_weighting, layer, k)
      term = weight * base(layer_args_, layer_kwargs, key)
      if kl_temperature > 0:
        students = [layer_args_[i] for i in pos] + [layer_kwargs[n] for n in names]
        kl = layer_kl_divergence(
            jnp.concatenate([s.reshape(-1, s.shape[-1]) for s in students]),
            jnp.concatenate([t.reshape(-1, t.shape[-1]) for t in teachers]),
            temperature=kl_temperature)
        term = term + kl_div_weight * kl_temperature * kl
      return term

    return total + jnp.sum(jax.lax.map(one_layer, (layers, layer_keys)))

  loss.__name__ = f"adaptive_layer_{getattr(base_loss, '__name__', 'loss')}"
  loss.layer_args = layer_args
  return loss


def matryoshka_2d(
    base_loss: EmbeddingLoss,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    *,
    n_layers_per_step: int | None = 1,
    n_dims_per_step: int | None = 1,
    last_layer_weight: float = 1.0,
    prior_layers_weight: float = 1.0,
    kl_div_weight: float = 1.0,
    kl_temperature: float = 0.3,
    layer_weighting: str = "uniform",
    normalize: bool = True,
    layer_args: Sequence[int | str] | str | None = None,
    embedding_args: Sequence[int | str] | str | None = None,
) -> EmbeddingLoss:
  """2-D Matryoshka (sentence-transformers' Matryoshka2dLoss): nested sizes x layers.

  ``adaptive_layer(matryoshka(base_loss, dims, weights, n_dims_per_step=...), ...)``:
  at every used layer the loss is the :func:`matryoshka` sum over (sampled)
  nested sizes; see :func:`adaptive_layer` for the layer terms. The defaults
  (one layer and one size per step, uniform layer weighting) are
  sentence-transformers' (2DMSE's sampling).

  Args:
    base_loss: an embedding loss on one layer's, full-size arguments.
    dims, weights, n_dims_per_step, normalize, embedding_args: as in :func:`matryoshka`
      (``-1`` or ``None``: every size).
    n_layers_per_step, last_layer_weight, prior_layers_weight: as in :func:`adaptive_layer`.
    kl_div_weight, kl_temperature, layer_weighting, layer_args: as in :func:`adaptive_layer`.

  Returns:
    ``loss(*args, rng, **kwargs) -> float32 scalar`` over ``[L, ...]`` embeddings.
  """
  nested = matryoshka(base_loss, dims, weights, n_dims_per_step=n_dims_per_step,
                      normalize=normalize, embedding_args=embedding_args)
  return adaptive_layer(
      nested, n_layers_per_step=n_layers_per_step, last_layer_weight=last_layer_weight,
      prior_layers_weight=prior_layers_weight, kl_div_weight=kl_div_weight,
      kl_temperature=kl_temperature, layer_weighting=layer_weighting, layer_args=layer_args)

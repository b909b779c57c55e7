"""The bottom layer: what every other layer builds on, importing nothing of mrl_jax above it.

:mod:`~mrl_jax.core.nesting` (the nesting list and weights, validated once),
:mod:`~mrl_jax.core.heads` (MRL, MRL-E, FF-k heads), :mod:`~mrl_jax.core.prefix_matmul`
(the fused block-prefix products), :mod:`~mrl_jax.core.ops` (the ONE truncate-then-
normalise and the quantisers), :mod:`~mrl_jax.core.checks` (argument checks),
:mod:`~mrl_jax.core.fileio` (atomic folder swaps, strict JSON).
"""

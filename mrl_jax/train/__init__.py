"""The one training loop and what it owns; it receives a task, never looks one up.

:mod:`~mrl_jax.train.task` (the Task protocol every plugin implements),
:mod:`~mrl_jax.train.config` (the shared config schema and its validation),
:mod:`~mrl_jax.train.loop` (state, the jitted step, :class:`~mrl_jax.train.loop.Experiment`),
:mod:`~mrl_jax.train.checkpoints`, :mod:`~mrl_jax.train.sharding`,
:mod:`~mrl_jax.train.optim`, :mod:`~mrl_jax.train.preemption`,
:mod:`~mrl_jax.train.writers`. Tasks (:mod:`mrl_jax.tasks`) sit above this layer;
:mod:`mrl_jax.experiments` joins the two by ``config.task``.
"""

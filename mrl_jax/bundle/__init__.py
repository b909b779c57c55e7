"""The exported artifact: one bundle format, its integrity, and the one :class:`Encoder`.

Above the models and data (it rebuilds any of them from a folder), below training
(which writes bundles) and evaluation (which reads them):
:mod:`~mrl_jax.bundle.artifact` (folder layout, SHA-256 per file, atomic swap),
:mod:`~mrl_jax.bundle.hf_folder` (the Hugging Face / sentence-transformers folder, read
and written), :mod:`~mrl_jax.bundle.encoder` (``Encoder.load(path).embed(...)``).
"""

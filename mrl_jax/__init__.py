"""mrl_jax: Matryoshka Representation Learning in JAX/Flax.

Train encoders whose embeddings stay useful when truncated to any nested prefix,
then serve the truncated embeddings cheaply.
"""

__version__ = "0.1.0"

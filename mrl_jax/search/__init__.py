"""Matryoshka funnel search in a vector engine: an exported encoder over a corpus.

Sits above the bundle layer (it reads :class:`mrl_jax.bundle.encoder.Encoder` bundles);
nothing in mrl_jax imports it but entry points. The engine is Qdrant: Qdrant Edge
in-process by default (``qdrant-edge-py``), a server or cluster through
``qdrant-client``, the same layout and the same one-request funnel (nested
prefetches, shortlist D_s first, re-rank at D_r). Both are in the ``search`` extra.

* :class:`SearchIndex` (``create``, ``open``, ``index_corpus``, ``query``, ``evaluate``);
* ``python -m mrl_jax.search index|query|evaluate`` (:mod:`mrl_jax.search.__main__`);
* :func:`mrl_jax.search.demo.search_demo`, the demo's last part.
"""

from mrl_jax.search.index import SearchIndex
from mrl_jax.search.layout import SearchError

__all__ = ["SearchError", "SearchIndex"]

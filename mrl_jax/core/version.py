"""The package version, recorded in every bundle and checkpoint (below every layer)."""

__version__ = "0.1.0"

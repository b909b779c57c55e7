"""Test-wide settings: CPU JAX, quiet TensorFlow, one device in this process.

Tests that need several devices start a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see ``tests/subprocess_util.py``).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

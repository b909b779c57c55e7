"""Preemption notices: when to write a final checkpoint and stop.

Cluster schedulers (TPU VMs, Kubernetes, Slurm) send ``SIGTERM`` some seconds
before they evict a job. :class:`PreemptionWatch` turns that notice into a step
at which the training loop saves and raises :class:`Preempted`:

* one process: a ``SIGTERM`` handler (installed only inside the ``with``
  block, on the main thread) records the notice; the next step is the one.
* several processes (after ``jax.distributed.initialize()``): JAX's
  preemption service receives the notice on any host and agrees with all
  the others on one step (``multihost_utils.reached_preemption_sync_point``),
  so every process saves the same step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Training stopped after a preemption notice; a checkpoint of ``step`` was written.

  Run the same command again to resume from it.
  """

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: saved step {step} in {directory} and stopped; "
                     "run the same command again to resume")
    self.step = step
    self.directory = directory


class PreemptionWatch:
  """:meth:`reached` says when to save and stop; install it for the duration of the loop.

  Use it as a context manager, or call :meth:`install` and :meth:`uninstall`.

  Args:
    signals: the notices handled in a single-process run.
  """

  def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self.received: int | None = None
    self._previous: dict[int, object] = {}
    self._multiprocess = False

  def install(self) -> None:
    """Start listening (a signal handler on the main thread of a single-process run)."""
    self._multiprocess = jax.process_count() > 1
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._on_signal)

  def uninstall(self) -> None:
    """Put back the signal handlers that were there before :meth:`install`."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self) -> PreemptionWatch:
    self.install()
    return self

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def _on_signal(self, signum: int, frame: FrameType | None) -> None:
    del frame
    self.received = signum

  def reached(self, step: int) -> bool:
    """True at the step where every process should save and stop (call it every step)."""
    if self._multiprocess:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # the preemption service is disabled in this job
        return False
    return self.received is not None

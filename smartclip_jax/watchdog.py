"""Ending a run that is alive but stuck, so that the launcher can restart it.

A stalled storage read, a deadlocked data worker or a stuck collective blocks every process of
a slice forever, with nothing in the log. The watchdog gets a beat after every step; when
`step_timeout_s` passes without one (compiling and evaluating are timed apart: they pause it),
it prints every thread's stack to stderr and ends the process with `EXIT_STUCK`, so the
scheduler or launcher restarts it and the run resumes from its last checkpoint.
`kill -USR1 <pid>` prints the stacks of a running trainer without stopping it, and a crash in
native code prints them before the process ends.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("smartclip_jax")

EXIT_STUCK = 3


def enable_stack_dumps() -> None:
  """Every thread's stack to stderr on `kill -USR1 <pid>` (the run goes on) and when the process
  crashes (a segfault or abort in native code would otherwise end it without a word)."""
  faulthandler.enable(file=sys.__stderr__, all_threads=True)
  faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


class Watchdog:
  """From `start` to `close`, a daemon thread that ends the process when no `beat` comes for
  `timeout_s` (0: never)."""

  def __init__(self, timeout_s: float):
    self.timeout_s = timeout_s
    self._last = time.monotonic()
    self._paused = 0
    self._stopped = threading.Event()

  def start(self) -> None:
    self.beat()
    if self.timeout_s > 0:
      threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

  def beat(self) -> None:
    self._last = time.monotonic()

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Work that may take long without being stuck: compiling, evaluating."""
    self._paused += 1
    try:
      yield
    finally:
      # The beat first: unpaused with the beat from before the pause, the watch would see all
      # of the pause as time without a step and could end the run.
      self.beat()
      self._paused -= 1

  def close(self) -> None:
    self._stopped.set()

  def _overdue(self) -> float | None:
    """Seconds since the last beat when they pass `timeout_s` outside a pause, else None."""
    idle = time.monotonic() - self._last
    return None if self._paused or idle < self.timeout_s else idle

  def _watch(self) -> None:
    while not self._stopped.wait(min(self.timeout_s / 10, 10.0)):
      idle = self._overdue()
      if idle is None:
        continue
      log.error(
        "no step finished for %.0f s (step_timeout_s=%g): printing every thread's stack and "
        "exiting with status %d so that the run is restarted from its last checkpoint",
        idle,
        self.timeout_s,
        EXIT_STUCK,
      )
      faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)  # fd 2, even if replaced
      os._exit(EXIT_STUCK)

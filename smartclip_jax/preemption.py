"""Stopping cleanly: save at the next step boundary and exit 0 when asked to stop.

Asked means SIGTERM (what schedulers and Cloud TPU preemption send), SIGINT (Ctrl-C), SIGHUP
(the terminal or SSH session of a run started in the foreground went away) or, on a Google
Cloud VM, a maintenance notice in the metadata server. With one process a handler raises a
flag. With several, all must save the same step: SIGTERM then goes to JAX's preemption service
(started by `jax.distributed.initialize`), which tells every process the step to stop at, and
the other notices are turned into a SIGTERM to this process. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import urllib.request

import jax
from jax.experimental import multihost_utils

from smartclip_jax import distributed

log = logging.getLogger("smartclip_jax")

MAINTENANCE_URL = "http://metadata.google.internal/computeMetadata/v1/instance/maintenance-event"


class StopRequest:
  """Watches for stop notices; `reached(step)` says whether to save and stop after `step`."""

  def __init__(self) -> None:
    self.reason: str | None = None
    self._multi = jax.process_count() > 1
    self._previous = {
      sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGHUP)
    }
    if not self._multi:  # with several processes JAX's preemption service owns SIGTERM
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum: int, frame) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts
    self.notice(signal.Signals(signum).name)

  def notice(self, reason: str) -> None:
    """Asks for a stop (any thread, any process)."""
    if self.reason is None:
      self.reason = reason
    if self._multi and reason != "SIGTERM":
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether the run should save after `step` and stop; every process must call it at
    every step (the multi-process agreement counts them)."""
    if not self._multi:
      return self.reason is not None
    try:
      stop = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      return False
    if stop and self.reason is None:
      self.reason = "SIGTERM"
    return stop

  def pending(self) -> bool:
    """Whether a process has a stop notice, asked between evaluation batches (where `reached`,
    which counts steps, cannot be). With several processes a collective, so every process
    answers alike; there a SIGTERM is JAX's preemption service's and waits for the next step,
    while Ctrl-C, SIGHUP and maintenance notices are seen at once."""
    mine = self.reason is not None
    return bool(distributed.gather(int(mine)).any()) if self._multi else mine

  def watch_maintenance(
    self, url: str = MAINTENANCE_URL, timeout: float = 3600.0, retry_s: float = 1.0
  ) -> None:
    """Polls the metadata server's maintenance event in a daemon thread; anything but NONE
    (e.g. TERMINATE_ON_HOST_MAINTENANCE) is a stop notice. A failed read (a 503, a timeout) is
    retried after `retry_s`, doubling up to a minute: the watch never stops for good."""

    def watch() -> None:
      query, wait = "", retry_s  # the first read returns the current event, later ones a change
      while self.reason is None:
        request = urllib.request.Request(url + query, headers={"Metadata-Flavor": "Google"})
        try:
          with urllib.request.urlopen(request, timeout=timeout) as response:
            event = response.read().decode().strip()
        except OSError as e:
          log.warning("maintenance watch: %s; asking again in %.0f s", e, wait)
          time.sleep(wait)
          wait = min(2 * wait, 60.0)
          continue
        wait = retry_s
        if event and event != "NONE":
          log.warning("maintenance notice %s: saving and stopping at the next step", event)
          self.notice(f"maintenance event {event}")
        query = "?wait_for_change=true"

    threading.Thread(target=watch, name="maintenance-watch", daemon=True).start()

  def close(self) -> None:
    """Puts the previous signal handlers back."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

"""The watchdog's clock: a pause (a compile, an evaluation) is not time without a step, nor is
the moment it ends; time without a beat outside a pause is."""

import time

from smartclip_jax import watchdog


class Observed(watchdog.Watchdog):
  """A watchdog that notes, each time its pause count changes, whether its watch would end the
  run at that moment (`_overdue`), as the watch thread may look at any moment."""

  def __init__(self, timeout_s: float):
    self.overdue_then: list[float | None] = []
    super().__init__(timeout_s)

  @property
  def _paused(self) -> int:
    return self._count

  @_paused.setter
  def _paused(self, value: int) -> None:
    self._count = value
    self.overdue_then.append(self._overdue())


def test_a_pause_longer_than_the_timeout_does_not_end_the_run():
  dog = Observed(timeout_s=0.05)
  with dog.paused():
    with dog.paused():
      time.sleep(0.1)
    time.sleep(0.1)
  assert dog.overdue_then == [None] * 5  # set at start, in, in, out, out
  assert dog._overdue() is None


def test_time_without_a_beat_outside_a_pause_ends_the_run():
  dog = watchdog.Watchdog(timeout_s=0.05)
  dog.beat()
  assert dog._overdue() is None
  time.sleep(0.1)
  assert dog._overdue() >= 0.05
  dog.beat()
  assert dog._overdue() is None

"""Progress lines for long loops (evaluation sets, encoding): what is done, the time, an ETA;
and the commands' log format."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("smartclip_jax")


def log_to_stderr(level: int = logging.INFO) -> None:
  """The commands' log lines: time and message, from `level` up; Orbax's absl chatter hidden."""
  logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)


def duration(seconds: float) -> str:
  """1h02m, 3m05s, 42s."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def step_line(step: int, total: int, metrics: dict, seconds_per_step: float) -> str:
  """The train loop's line for a logged step."""
  masks = ""
  if "mask_density" in metrics:
    masks = f"  mask {metrics['mask_density']:.3f} J {metrics['mask_jaccard']:.2f}"
  return (
    f"step {step}/{total}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}{masks}  "
    f"{metrics['images_per_sec']:.0f} img/s  {metrics['tflops_per_device']:.3g} TFLOP/s/device  "
    f"MFU {100 * metrics['model_mfu']:.1f}% model, {100 * metrics['mfu']:.1f}% hardware  "
    f"ETA {duration((total - step) * seconds_per_step)}"
  )


class Progress:
  """`what: done/total unit, elapsed (ETA ...)` at most every `every` seconds, and a last line
  when the loop ends if it logged any: a loop shorter than `every` stays silent. The last line
  is logged once, however often the total is reported (a caller may report it again after its
  loop, to count what the loop skipped)."""

  def __init__(self, what: str, total: int, unit: str, every: float = 30.0):
    self.what, self.total, self.unit, self.every = what, total, unit, every
    self.start = self.last = time.perf_counter()
    self.logged = self.ended = False

  def update(self, done: int) -> None:
    now = time.perf_counter()
    end = done >= self.total
    if self.ended or (now - self.last < self.every and not (end and self.logged)):
      return
    self.last, self.logged, self.ended = now, True, end
    elapsed = now - self.start
    eta = f", ETA {duration(elapsed * (self.total - done) / done)}" if 0 < done < self.total else ""
    log.info("%s: %d/%d %s, %s%s", self.what, done, self.total, self.unit, duration(elapsed), eta)

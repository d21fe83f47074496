"""`python -m smartclip_jax.train` whose process FLAKY_PROCESS finds its first checkpoint read
failing with a storage error (HTTP 503), as a GCS blip would: for the collective-restore test."""

import os
import sys

import jax
import orbax.checkpoint as ocp

from smartclip_jax import train

real = ocp.Checkpointer.restore
failures = [OSError("503 Service Unavailable: the storage endpoint is busy")]


def flaky(self, directory, *args, **kwargs):
  if jax.process_index() == int(os.environ["FLAKY_PROCESS"]) and failures:
    raise failures.pop()
  return real(self, directory, *args, **kwargs)


ocp.Checkpointer.restore = flaky
if __name__ == "__main__":
  train.main(sys.argv[1:])

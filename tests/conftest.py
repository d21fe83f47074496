"""Eight host CPU devices for every test, set before jax is first imported."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after the flags)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# No persistent compilation cache: on XLA:CPU (jax 0.10.2) a train step read back from it
# aborted the process once a program for another mesh had been cached in the same session.
from smartclip_jax import config as config_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DEMO = os.path.join(REPO, "configs", "demo.py")
# The demo config shrunk further so that a test compiles and steps in seconds.
TINY = [
  "batch_size=16",
  "total_steps=50",
  "log_every=10",
  "checkpoint_every=25",
  "model.vision.layers=1",
  "model.text.layers=1",
  "model.text.context_length=32",
  "data.demo.num_train=256",
  "data.demo.num_eval=32",
  "data.eval_batch_size=16",
]


@pytest.fixture
def demo_config():
  return config_lib.load(DEMO, TINY)


def assert_gradients_close(got, ref, what: str = "") -> None:
  """Gradient trees equal up to summation order: 1e-5 of each leaf's own scale, floored at 1e-3
  of the largest leaf, since some leaves are zero up to rounding (the attention pooling's bias
  cannot change a softmax) and hold only that rounding noise."""
  floor = 1e-3 * max(np.abs(r).max() for r in jax.tree.leaves(ref))
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(
      g,
      r,
      rtol=1e-5,
      atol=1e-5 * max(np.abs(r).max(), floor),
      err_msg=f"{what} {jax.tree_util.keystr(path)}",
    )


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """`gs://BUCKET` on a local emulator, one per session (GCS clients cache their endpoint)."""
  from tests.gcs_emulator import emulator

  with emulator(str(tmp_path_factory.mktemp("gcs"))) as bucket:
    yield bucket

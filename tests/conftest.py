"""Eight host CPU devices for every test, set before jax is first imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after the flags)
import pytest  # noqa: E402

# No persistent compilation cache: on XLA:CPU (jax 0.10.2) a train step read back from it
# aborted the process once a program for another mesh had been cached in the same session.

from smartclip_jax import config as config_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DEMO = os.path.join(REPO, "configs", "demo.py")
# The demo config shrunk further so that a test compiles and steps in seconds.
TINY = ["batch_size=16", "total_steps=50", "log_every=10", "checkpoint_every=25",
        "model.vision.layers=1", "model.text.layers=1", "model.text.context_length=32",
        "data.num_train=256", "data.num_eval=32", "data.eval_batch_size=16"]


@pytest.fixture
def demo_config():
  return config_lib.load(DEMO, TINY)


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"

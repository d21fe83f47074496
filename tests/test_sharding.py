"""The same batch and parameters give the same loss and gradients on any mesh."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from smartclip_jax import config as config_lib, losses, optim, sharding, step as step_lib
from smartclip_jax.data import pipeline
from smartclip_jax.models.clip import build_model
from tests.conftest import assert_gradients_close


def loss_and_grads(config, mesh, params, batch):
  model = build_model(config)
  shardings = step_lib.abstract_state(model, optim.make_optimizer(config), config, mesh)[1]
  fn = jax.jit(
    jax.value_and_grad(
      lambda p, b: step_lib.compute_loss(model, losses.make(config), p, b), has_aux=True
    ),
    in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
  )
  with sharding.activate(mesh):
    (loss, metrics), grads = fn(params, batch)
  return jax.device_get((loss, metrics, grads))


@pytest.mark.parametrize(
  "loss",
  [
    "smartclip",
    pytest.param("clip", marks=pytest.mark.slow),
    pytest.param("siglip", marks=pytest.mark.slow),
  ],
)
def test_one_device_equals_eight_devices(demo_config, loss):
  config_lib.set_loss(demo_config, loss)
  model, tx = build_model(demo_config), optim.make_optimizer(demo_config)
  one = sharding.make_mesh(demo_config, jax.devices()[:1])
  state = step_lib.init_state(
    model, tx, demo_config, one, step_lib.abstract_state(model, tx, demo_config, one)[1]
  )
  params = jax.device_get(state.params)
  batch = next(pipeline.train_iterator(demo_config))
  batch = {"image": batch["image"], "tokens": batch["tokens"]}
  ref = loss_and_grads(demo_config, one, params, batch)
  meshes = [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}]
  for shape in meshes:
    demo_config.mesh.update(shape)
    mesh = sharding.make_mesh(demo_config)
    assert mesh.devices.size == 8
    got = loss_and_grads(demo_config, mesh, params, batch)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, err_msg=str(shape))
    for key in ref[1]:
      np.testing.assert_allclose(got[1][key], ref[1][key], rtol=1e-5, err_msg=key)
    assert_gradients_close(got[2], ref[2], str(shape))


def test_fsdp_and_tensor_rules_shard_parameters(demo_config):
  demo_config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(demo_config)
  model, tx = build_model(demo_config), optim.make_optimizer(demo_config)
  sh = step_lib.abstract_state(model, tx, demo_config, mesh)[1]
  block = sh.params["visual"]["transformer"]["resblocks_0"]
  assert block["attn"]["in_proj_kernel"].spec == P("fsdp", None, "tensor", None)
  assert block["mlp"]["c_fc"]["kernel"].spec == P("fsdp", "tensor")
  assert sh.params["text"]["token_embedding"]["embedding"].spec == P("tensor", "fsdp")
  # Adam's moments follow their parameters; counters stay replicated.
  moments = {
    jax.tree_util.keystr(path): s.spec
    for path, s in jax.tree_util.tree_leaves_with_path(sh.opt_state)
  }
  c_fc = [
    spec
    for path, spec in moments.items()
    if "resblocks_0']['mlp']['c_fc']['kernel']" in path and "visual" in path
  ]
  assert len(c_fc) == 2 and all(spec == P("fsdp", "tensor") for spec in c_fc)
  assert P() in moments.values()


def test_the_local_device_is_this_process_first_device_of_the_mesh(monkeypatch):
  """On a slice the mesh's first device may be another process's, whose memory this process
  cannot read (memory_stats fails, and the memory check passed unseen)."""
  assert sharding.local_device(sharding.data_mesh()) == jax.local_devices()[0]
  devices = [types.SimpleNamespace(id=i, process_index=i // 4) for i in range(8)]
  mesh = types.SimpleNamespace(devices=np.array(devices, dtype=object).reshape(2, 4, 1))
  for process in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    assert sharding.local_device(mesh).id == 4 * process


def test_mesh_errors():
  import ml_collections

  c = ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 3, "tensor": 1}})
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.mesh_shape(c, 8)
  c.mesh.fsdp = -1
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape(c, 8)

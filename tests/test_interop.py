"""PyTorch interop, proven by parity: random torch models in each layout, loaded by
`smartclip_jax.load`, give the same embeddings (and masks) on the same inputs."""

import io
import json
import logging
import math
import pickle
import re
import zipfile

import flax.linen as nn
import jax
import numpy as np
import pytest

import smartclip_jax
from smartclip_jax import config as config_lib, convert, init_from
from smartclip_jax.interop import export, layout, torch_files
from smartclip_jax.load import Loaded
from smartclip_jax.models.clip import build_model
from smartclip_jax.models.vit import resample_positions
from tests.conftest import DEMO, TINY

torch = pytest.importorskip("torch", reason="needs requirements-torch.txt")
from tests.torch_reference import ReferenceCLIP, open_clip_model  # noqa: E402

CAPTIONS = [
  "a red square.",
  "two blue circles above a small green triangle. " * 3,
  "nothing",
  "a long caption " * 40,
]


def inputs(model, n=4, seed=0):
  size = model.config.model.vision.image_size
  images = np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)
  return images, model.tokenize(CAPTIONS[:n])


def max_diff(got, want: "torch.Tensor") -> float:
  return float(np.max(np.abs(np.asarray(got) - want.detach().numpy())))


def save(state_dict, path):
  if path.suffix == ".safetensors":
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
  else:
    torch.save(state_dict, path)
  return path


@pytest.mark.parametrize(
  "context,quick_gelu,long_clip,mask_net,suffix,half",
  [
    (77, True, False, False, ".pt", False),  # OpenAI
    pytest.param(
      77,
      False,
      False,
      False,
      ".safetensors",
      True,  # open_clip GELU, fp16
      marks=pytest.mark.slow,
    ),
    (248, True, True, False, ".pth", False),  # Long-CLIP
    (248, True, True, True, ".safetensors", True),  # SmartCLIP reference, fp16
    pytest.param(248, False, True, True, ".bin", False, marks=pytest.mark.slow),
  ],
)
def test_reference_layout_embeddings_match(
  tmp_path, context, quick_gelu, long_clip, mask_net, suffix, half
):
  torch.manual_seed(context + quick_gelu + 2 * mask_net)
  ref = ReferenceCLIP(
    context=context, quick_gelu=quick_gelu, long_clip=long_clip, mask_net=mask_net
  ).eval()
  if half:  # saved in fp16, like the reference; compare with the fp16 weights in fp32
    ref = ref.half().float()
  state = ref.state_dict()
  path = save({k: v.half() if half else v for k, v in state.items()}, tmp_path / f"w{suffix}")
  model = smartclip_jax.load(path, activation="quick_gelu" if quick_gelu else "gelu")
  m = model.config.model
  assert (m.text.context_length, m.vision.width, m.vision.layers, m.embed_dim) == (
    context,
    128,
    2,
    64,
  )
  assert model.config.model.mask_net == mask_net
  images, tokens = inputs(model)
  with torch.no_grad():
    want_img = ref.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    want_txt = ref.encode_text(torch.from_numpy(tokens).long())
  assert max_diff(model.encode_image(images), want_img) <= 1e-4
  assert max_diff(model.encode_text(tokens), want_txt) <= 1e-4
  if mask_net:
    got = model.model.apply({"params": model.params}, images, tokens)["masks"]
    with torch.no_grad():
      want = ref.masks(torch.from_numpy(tokens).long())
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


@pytest.mark.parametrize("context,act", [(77, "quick_gelu"), (248, "gelu")])
def test_hf_clipmodel_embeddings_match(tmp_path, context, act):
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=49408,
      hidden_size=64,
      intermediate_size=256,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=context,
      hidden_act=act,
    ),
    vision_config=dict(
      hidden_size=128,
      intermediate_size=512,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=32,
      patch_size=8,
      hidden_act=act,
    ),
    projection_dim=64,
  )
  ref = transformers.CLIPModel(config).eval()
  ref.save_pretrained(tmp_path / "hf")
  model = smartclip_jax.load(tmp_path / "hf")
  assert (model.config.model.text.heads, model.config.model.text.context_length) == (4, context)
  assert model.config.model.activation == act
  images, tokens = inputs(model)
  with torch.no_grad():
    want_img = ref.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    want_txt = ref.get_text_features(input_ids=torch.from_numpy(tokens).long())
  want_img = getattr(want_img, "pooler_output", want_img)
  want_txt = getattr(want_txt, "pooler_output", want_txt)
  assert max_diff(model.encode_image(images), want_img) <= 1e-4
  assert max_diff(model.encode_text(tokens), want_txt) <= 1e-4


def test_layout_round_trips_are_bit_identical(demo_config):
  model = build_model(demo_config)
  params = jax.tree.map(
    np.asarray,
    jax.device_get(
      model.init(jax.random.key(3), np.zeros((1, 32, 32, 3)), np.zeros((1, 32), np.int32))
    ),
  )
  params = jax.tree.map(
    lambda b: b.unbox() if hasattr(b, "unbox") else b,
    params["params"],
    is_leaf=lambda x: hasattr(x, "unbox"),
  )
  state = layout.to_openai(params)
  assert "mask_net.attn_pool.attention.weight" in state and "ln_final.weight" in state
  assert state["logit_scale"].shape == ()  # a 0-d parameter in every PyTorch layout
  back = layout.from_openai(state, params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  no_mask = {k: v for k, v in state.items() if not k.startswith("mask_net.")}
  again = layout.hf_to_openai(layout.openai_to_hf(no_mask))
  assert sorted(again) == sorted(no_mask)
  for k in no_mask:
    np.testing.assert_array_equal(again[k], no_mask[k])


def test_scanned_layers_export_and_import_like_unrolled_ones(demo_config):
  """A scanned model's stacks leave and enter every layout as one tensor per layer."""
  from smartclip_jax.step import abstract_params, dummy_batch

  demo_config.model.update(scan_layers=True)
  demo_config.model.vision.layers, demo_config.model.text.layers = 2, 3  # order shows
  model = build_model(demo_config)
  batch = dummy_batch(demo_config)
  params = nn.meta.unbox(
    jax.device_get(model.init(jax.random.key(3), batch["image"], batch["tokens"])["params"])
  )
  state = layout.to_openai(params)
  layers = demo_config.model.text.layers
  assert f"transformer.resblocks.{layers - 1}.attn.in_proj_weight" in state
  assert not any(".resblocks.ln_" in k for k in state)
  last = demo_config.model.vision.layers - 1
  np.testing.assert_array_equal(
    state[f"visual.transformer.resblocks.{last}.mlp.c_fc.weight"],
    params["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"][last].T,
  )
  assert layout.unused_keys(state, params) == []
  back = layout.from_openai(state, nn.meta.unbox(abstract_params(model, demo_config)))
  jax.tree.map(np.testing.assert_array_equal, back, params)


class Payload:
  def __reduce__(self):  # unpickling would call json.loads: code the loader must not run
    return (json.loads, ("1",))


def test_pickled_code_is_refused(tmp_path):
  path = tmp_path / "evil.pt"
  torch.save({"visual.conv1.weight": torch.zeros(1), "payload": Payload()}, path)
  with pytest.raises(ValueError, match="without running pickled code"):
    smartclip_jax.load(path)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """A 2-step TINY demo run (SmartCLIP: with a mask network, 32 positions, 4 heads of 16)."""
  from smartclip_jax import train

  workdir = tmp_path_factory.mktemp("demo_run")
  train.train_and_evaluate(config_lib.load(DEMO, TINY + ["total_steps=2", "log_every=1"]), workdir)
  return workdir, smartclip_jax.load(workdir)


def reference_for(model, **kw):
  m = model.config.model
  return ReferenceCLIP(
    embed_dim=m.embed_dim,
    image_size=m.vision.image_size,
    patch=m.vision.patch_size,
    vision_width=m.vision.width,
    vision_layers=m.vision.layers,
    vision_heads=m.vision.heads,
    context=m.text.context_length,
    text_width=m.text.width,
    text_layers=m.text.layers,
    text_heads=m.text.heads,
    **kw,
  ).eval()


def assert_same_embeddings(model, encode_image, encode_text):
  images, tokens = inputs(model)
  with torch.no_grad():
    img = encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    txt = encode_text(torch.from_numpy(tokens).long())
  assert max_diff(model.encode_image(images), getattr(img, "pooler_output", img)) <= 1e-4
  assert max_diff(model.encode_text(tokens), getattr(txt, "pooler_output", txt)) <= 1e-4


def test_orbax_workdir_loads_like_the_run_left_it(demo_run, monkeypatch):
  workdir, model = demo_run
  monkeypatch.chdir(workdir.parent)  # a relative path, as users type it
  relative = smartclip_jax.load(workdir.name)
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(relative.params), jax.device_get(model.params)
  )
  assert model.config.model.text.context_length == 32 and model.config.model.mask_net
  images, tokens = inputs(model)
  assert model.encode_image(images).shape == (4, 64)
  assert np.isfinite(np.asarray(model.encode_text(tokens))).all()


def test_export_openai_layout_loads_in_the_reference_with_masks(demo_run, tmp_path):
  workdir, model = demo_run
  convert.main(["--checkpoint", str(workdir), "--to", "openai", "--out", str(tmp_path / "m.pt")])
  ref = reference_for(model, mask_net=True)
  ref.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
  assert_same_embeddings(model, ref.encode_image, ref.encode_text)
  images, tokens = inputs(model)
  got = model.model.apply({"params": model.params}, images, tokens)["masks"]
  np.testing.assert_array_equal(np.asarray(got), ref.masks(torch.from_numpy(tokens).long()))
  # And back: the exported file as an Orbax checkpoint has the run's parameters, bit for bit.
  convert.main(["--from", str(tmp_path / "m.pt"), "--out", str(tmp_path / "back")])
  back = smartclip_jax.load(tmp_path / "back")
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(back.params), jax.device_get(model.params)
  )


def test_export_open_clip_has_its_model_config_and_no_mask_net(demo_run, tmp_path, capsys):
  workdir, model = demo_run
  convert.main(
    ["--checkpoint", str(workdir), "--to", "open_clip", "--out", str(tmp_path / "oc.safetensors")]
  )
  assert "left out" in capsys.readouterr().out
  spec = json.loads((tmp_path / "oc.json").read_text())
  assert spec["text_cfg"]["context_length"] == 32 and spec["quick_gelu"]
  assert spec["vision_cfg"]["width"] // spec["vision_cfg"]["head_width"] == 4
  ref = reference_for(model)  # open_clip's CLIP has exactly these names (docs/method.md)
  from safetensors.torch import load_file

  ref.load_state_dict(load_file(str(tmp_path / "oc.safetensors")), strict=True)
  assert_same_embeddings(model, ref.encode_image, ref.encode_text)


def test_export_hf_loads_in_transformers_without_missing_or_unexpected_keys(demo_run, tmp_path):
  transformers = pytest.importorskip("transformers")
  workdir, model = demo_run
  convert.main(["--checkpoint", str(workdir), "--to", "hf", "--out", str(tmp_path / "hf")])
  ref, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert_same_embeddings(
    model,
    lambda x: ref.eval().get_image_features(pixel_values=x),
    lambda t: ref.get_text_features(input_ids=t),
  )


def test_init_from_a_torch_checkpoint_fills_the_mask_net_fresh(tmp_path):
  from smartclip_jax import optim, sharding, step as step_lib

  torch.manual_seed(0)
  config = config_lib.load(DEMO, TINY + ["model.text.context_length=68"])
  ref = ReferenceCLIP(
    embed_dim=64,
    vision_width=64,
    vision_layers=1,
    vision_heads=4,
    context=32,
    text_width=64,
    text_layers=1,
    text_heads=4,
  )
  torch.save(ref.state_dict(), tmp_path / "clip.pt")
  mesh = sharding.make_mesh(config)
  model, tx = build_model(config), optim.make_optimizer(config)
  state = step_lib.init_state(
    model, tx, config, mesh, step_lib.abstract_state(model, tx, config, mesh)[1]
  )
  params, fresh, unused = init_from.load_params(tmp_path / "clip.pt", state.params)
  assert fresh and all(n.startswith("mask_net/") for n in fresh) and unused == []
  got = jax.device_get(params)
  np.testing.assert_array_equal(got["visual"]["proj"], ref.visual.proj.detach().numpy())
  assert got["text"]["positional_embedding"].shape == (68, 64)  # 32 -> 68, Long-CLIP's stretch
  np.testing.assert_array_equal(
    got["text"]["positional_embedding"][:20], ref.positional_embedding.detach().numpy()[:20]
  )


def test_a_torch_file_lacking_a_tensor_the_model_needs_is_refused_by_name(tmp_path):
  torch.manual_seed(0)
  state = ReferenceCLIP(image_size=32, context=77).state_dict()
  del state["ln_final.bias"]
  torch.save(state, tmp_path / "partial.pt")
  with pytest.raises(ValueError, match=r"lacks parameters the model needs: text/ln_final/"):
    smartclip_jax.load(tmp_path / "partial.pt")


def test_an_openai_torchscript_archive_loads_without_running_its_code(tmp_path):
  # OpenAI's original .pt files are torch.jit archives of their model; this one is the
  # reference model traced (it does not script) and saved the same way.
  torch.manual_seed(0)
  ref = ReferenceCLIP(image_size=32, context=77).eval()
  images, tokens = torch.zeros(2, 3, 32, 32), torch.zeros(2, 77, dtype=torch.long)
  archive = torch.jit.trace_module(
    ref,
    {"encode_image": images, "encode_text": tokens},
    check_trace=False,
  )
  archive.save(tmp_path / "ViT-tiny.pt")
  model = smartclip_jax.load(tmp_path / "ViT-tiny.pt")
  assert_same_embeddings(model, ref.encode_image, ref.encode_text)


def test_a_torchscript_archive_naming_anything_but_tensors_is_refused(tmp_path):
  ref = ReferenceCLIP(image_size=32, context=77).eval()
  torch.jit.trace_module(ref, {"encode_image": torch.zeros(1, 3, 32, 32)}, check_trace=False).save(
    tmp_path / "good.pt"
  )
  with zipfile.ZipFile(tmp_path / "good.pt") as z, zipfile.ZipFile(tmp_path / "evil.pt", "w") as w:
    for item in z.infolist():
      data = z.read(item)
      if item.filename.endswith("/data.pkl"):  # what a crafted archive would make unpickling call
        data = pickle.dumps(Payload(), protocol=2)
      w.writestr(item, data)
  with pytest.raises(ValueError, match=r"names json\.loads.*refused \(nothing in it was run\)"):
    smartclip_jax.load(tmp_path / "evil.pt")


def hub_snapshot(tmp_path, monkeypatch, repo: str):
  """An empty snapshot of `repo` in a Hugging Face cache laid out as huggingface_hub lays it
  out (models--ORG--NAME/{refs/main, snapshots/<commit>/...}), made the cache, offline."""
  root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
  commit = "0123456789abcdef0123456789abcdef01234567"
  (root / "snapshots" / commit).mkdir(parents=True)
  (root / "refs").mkdir()
  (root / "refs" / "main").write_text(commit)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return root / "snapshots" / commit


def test_hub_names_resolve_in_the_local_cache_offline(tmp_path, monkeypatch):
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  small = dict(num_hidden_layers=1, num_attention_heads=2)
  config = transformers.CLIPConfig(
    text_config=dict(hidden_size=64, intermediate_size=256, **small),
    vision_config=dict(
      hidden_size=128, intermediate_size=512, image_size=32, patch_size=8, **small
    ),
    projection_dim=64,
  )
  snapshot = hub_snapshot(tmp_path, monkeypatch, "openai/clip-tiny")
  transformers.CLIPModel(config).eval().save_pretrained(snapshot)
  assert torch_files.resolve("hf-hub:openai/clip-tiny") == snapshot
  by_name = smartclip_jax.load("hf-hub:openai/clip-tiny")
  by_path = smartclip_jax.load(snapshot)
  jax.tree.map(np.testing.assert_array_equal, by_name.params, by_path.params)
  with pytest.raises(FileNotFoundError, match="hf download openai/clip-missing"):
    smartclip_jax.load("hf-hub:openai/clip-missing")


# An open_clip model config as its json holds it: no "quick_gelu" key, so GELU.
OPEN_CLIP_GELU = dict(
  embed_dim=64,
  vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=8, head_width=16),
  text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=4, layers=1),
)


def fresh_params(config):
  """The initial parameters of `config`'s model, as arrays with shardings (init_from's target)."""
  from smartclip_jax.step import dummy_batch

  batch = dummy_batch(config)
  model = build_model(config)
  return model, nn.meta.unbox(
    jax.jit(model.init)(jax.random.key(0), batch["image"], batch["tokens"])["params"]
  )


def test_an_open_clip_hub_gelu_model_loads_as_gelu_by_its_model_config(
  tmp_path, monkeypatch, caplog
):
  from safetensors.torch import save_file

  torch.manual_seed(0)
  ref = open_clip_model(**OPEN_CLIP_GELU).eval()
  snapshot = hub_snapshot(tmp_path, monkeypatch, "laion/CLIP-tiny-gelu")
  save_file(ref.state_dict(), str(snapshot / "open_clip_model.safetensors"))
  preprocess = dict(
    mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711]
  )
  (snapshot / "open_clip_config.json").write_text(
    json.dumps({"model_cfg": OPEN_CLIP_GELU, "preprocess_cfg": preprocess})
  )
  with caplog.at_level(logging.INFO, "smartclip_jax"):
    model = smartclip_jax.load("hf-hub:laion/CLIP-tiny-gelu")
  assert "does not record its activation" not in caplog.text
  m = model.config.model
  assert (m.activation, m.vision.heads, m.text.heads) == ("gelu", 4, 4)
  assert_same_embeddings(model, ref.encode_image, ref.encode_text)
  # The same file into a run of these sizes (init_from), told the run's activation.
  config = config_lib.load(DEMO, TINY + ["model.activation=gelu"])
  run, target = fresh_params(config)
  params, fresh, _ = init_from.load_params("hf-hub:laion/CLIP-tiny-gelu", target, "gelu")
  assert fresh and all(n.startswith("mask_net/") for n in fresh)
  assert_same_embeddings(Loaded(config, params, run), ref.encode_image, ref.encode_text)
  with pytest.raises(ValueError, match="open_clip_config.json says the activation is 'gelu'"):
    init_from.load_params("hf-hub:laion/CLIP-tiny-gelu", target, "quick_gelu")


def test_a_state_dict_without_a_model_config_says_which_activation_it_assumed(tmp_path, caplog):
  torch.manual_seed(0)
  path = save(open_clip_model(**OPEN_CLIP_GELU).state_dict(), tmp_path / "m.pt")
  with caplog.at_level(logging.INFO, "smartclip_jax"):
    _, config = torch_files.read(path)
  assert config.model.activation == "quick_gelu"
  assert "m.pt does not record its activation" in caplog.text
  assert "assuming QuickGELU" in caplog.text and "activation='gelu'" in caplog.text
  caplog.clear()
  _, config = torch_files.read(path, "gelu")  # said by the caller: nothing assumed
  assert config.model.activation == "gelu" and "activation" not in caplog.text
  # open_clip's model_configs/ form beside it: no "quick_gelu", so GELU; heads from it.
  (tmp_path / "m.json").write_text(json.dumps(OPEN_CLIP_GELU))
  _, config = torch_files.read(path)
  assert (config.model.activation, config.model.vision.heads) == ("gelu", 4)
  wrong = OPEN_CLIP_GELU | {"vision_cfg": OPEN_CLIP_GELU["vision_cfg"] | {"width": 128}}
  (tmp_path / "m.json").write_text(json.dumps(wrong))
  said = "m.json does not describe the weights m.pt: it says vision_cfg.width=128 (the weights: 64)"
  with pytest.raises(ValueError, match=re.escape(said)):
    torch_files.read(path)


@pytest.mark.parametrize(
  "vision_cfg,ours,file_shape,expected",
  [
    (dict(width=128, head_width=32), "visual/class_embedding", (128,), (64,)),
    (dict(patch_size=16), "visual/conv1/kernel", (64, 3, 16, 16), (64, 3, 8, 8)),
  ],
)
def test_a_tensor_of_another_shape_is_named_with_both_shapes(
  demo_config, vision_cfg, ours, file_shape, expected
):
  from smartclip_jax.step import abstract_params

  spec = OPEN_CLIP_GELU | {"vision_cfg": OPEN_CLIP_GELU["vision_cfg"] | vision_cfg}
  state = {k: v.numpy() for k, v in open_clip_model(**spec).state_dict().items()}
  shapes = nn.meta.unbox(abstract_params(build_model(demo_config), demo_config))
  message = (
    f"'{layout.openai_name(ours)}' (our {ours}) has shape {file_shape} in the checkpoint, "
    f"the model expects {expected}"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    layout.from_openai(state, shapes)  # as init_from reads


@pytest.mark.parametrize("grid,new_grid", [(14, 16), (16, 14), (7, 24), (24, 7), (4, 6), (6, 4)])
def test_image_positions_resample_as_open_clip_does(grid, new_grid):
  table = np.random.default_rng(grid).standard_normal((1 + grid * grid, 32)).astype(np.float32)
  got = np.asarray(resample_positions(table, 1 + new_grid * new_grid))
  # open_clip's resize_pos_embed: the grid as NCHW, torch's antialiased bicubic.
  cells = torch.from_numpy(table[1:]).reshape(1, grid, grid, 32).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(
    cells, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True
  )
  np.testing.assert_array_equal(got[0], table[0])
  np.testing.assert_allclose(got[1:], want.permute(0, 2, 3, 1).reshape(-1, 32), atol=1e-5)


def test_init_from_at_another_image_size_resamples_the_image_positions(tmp_path):
  """A 64px / 16 model (a 4x4 grid, 224/16's shape in small) into a 96px run (6x6), from the
  PyTorch file, from its Orbax conversion, and by `load`'s override."""
  torch.manual_seed(0)
  spec = OPEN_CLIP_GELU | {
    "vision_cfg": OPEN_CLIP_GELU["vision_cfg"] | dict(image_size=64, patch_size=16)
  }
  ref = open_clip_model(**spec)
  path = save(ref.state_dict(), tmp_path / "m.pt")
  (tmp_path / "m.json").write_text(json.dumps(spec))
  table = ref.visual.positional_embedding.detach().numpy()
  config = config_lib.load(
    DEMO,
    TINY + ["model.activation=gelu", "model.vision.image_size=96", "model.vision.patch_size=16"],
  )
  _, target = fresh_params(config)
  from_pt, _, _ = init_from.load_params(path, target, "gelu")
  got = np.asarray(from_pt["visual"]["positional_embedding"])
  assert got.shape == (37, 64)
  np.testing.assert_array_equal(got[0], table[0])  # the class token's row, unchanged
  cells = torch.from_numpy(table[1:]).reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(
    cells, size=(6, 6), mode="bicubic", align_corners=False, antialias=True
  )
  np.testing.assert_allclose(got[1:], want.permute(0, 2, 3, 1).reshape(36, 64), atol=1e-5)
  convert.main(["--from", str(path), "--out", str(tmp_path / "orbax")])
  from_orbax, _, _ = init_from.load_params(tmp_path / "orbax", target)
  np.testing.assert_allclose(from_orbax["visual"]["positional_embedding"], got, atol=1e-6)
  loaded = smartclip_jax.load(path, vision__image_size=96)
  np.testing.assert_allclose(loaded.params["visual"]["positional_embedding"], got, atol=1e-6)


def test_a_siglip_export_loads_in_open_clip_strictly_with_its_logit_bias(tmp_path):
  from safetensors.torch import load_file

  config = config_lib.load(f"{DEMO}:siglip", TINY)
  model, params = fresh_params(config)
  params = {**params, "logit_bias": jax.numpy.float32(-7.25)}  # not its init: the value travels
  siglip = Loaded(config, params, model)
  export.export(siglip.params, siglip.config, "open_clip", tmp_path / "sig.safetensors")
  spec = json.loads((tmp_path / "sig.json").read_text())
  assert spec["init_logit_bias"] == -10.0 and spec["init_logit_scale"] == pytest.approx(
    math.log(10.0)
  )
  ref = open_clip_model(**spec).eval()  # as open_clip.create_model builds it from the json
  ref.load_state_dict(load_file(str(tmp_path / "sig.safetensors")), strict=True)
  assert ref.logit_bias.item() == -7.25
  assert_same_embeddings(siglip, ref.encode_image, ref.encode_text)
  back = smartclip_jax.load(tmp_path / "sig.safetensors")
  assert float(back.params["logit_bias"]) == -7.25 and back.config.model.logit_bias_init == -10.0


def test_export_hf_has_a_processor_that_tokenises_and_preprocesses_as_we_do(demo_run, tmp_path):
  transformers = pytest.importorskip("transformers")
  import PIL.Image

  workdir, model = demo_run
  convert.main(["--checkpoint", str(workdir), "--to", "hf", "--out", str(tmp_path / "hf")])
  processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
  context = model.config.model.text.context_length
  captions = [
    "A Red Square.",
    "WHAT?! no... (maybe)",
    "  extra   spaces\tand\nnewlines  ",
    "the dog's ball, don't",
    "7 cats and 12 dogs in 2024",
    "un café, naïve über",
    "hello! <|endoftext|> is text here",
    "a caption long enough to be cut at the context length " * 4,
  ]
  text = processor(
    text=captions, padding="max_length", max_length=context, truncation=True, return_tensors="pt"
  )
  np.testing.assert_array_equal(text["input_ids"].numpy(), model.tokenize(captions))
  rng = np.random.default_rng(0)
  # Both resize with PIL's bicubic; the centre crop's offset is the same here (transformers
  # floors (side - size) / 2, torchvision rounds it half to even: they differ when
  # side - size = 3 mod 4, docs/interop.md), so only float rounding separates the pixels.
  images = [
    PIL.Image.fromarray(rng.integers(0, 256, (37, 45, 3), np.uint8)),  # 38x32 after resizing
    PIL.Image.fromarray(rng.integers(0, 256, (90, 41), np.uint8), "L"),  # 32x70
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)),
  ]
  pixels = processor(images=images, return_tensors="pt")["pixel_values"]
  ours = np.stack([model.preprocess(image) for image in images])
  np.testing.assert_allclose(pixels.numpy().transpose(0, 2, 3, 1), ours, atol=1e-5)
  ref = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
  with torch.no_grad():
    txt = ref.get_text_features(**text)
    img = ref.get_image_features(pixel_values=pixels)
  assert (
    max_diff(model.encode_text(model.tokenize(captions)), getattr(txt, "pooler_output", txt))
    <= 1e-4
  )
  assert max_diff(model.encode_image(ours), getattr(img, "pooler_output", img)) <= 1e-4


class StorageRef:
  """A storage of a crafted archive: data file `key` holding `numel` values of torch's storage
  type `kind`."""

  def __init__(self, key: str, numel: int, kind: str = "FloatStorage"):
    self.key, self.numel, self.kind = key, numel, kind


class CraftedTensor:
  """Pickles as torch's tensor rebuild call, with any shape, strides and offset."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride)

  def __reduce__(self):
    import collections

    return torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


def crafted_archive(path, root, data: dict[str, bytes]):
  """A TorchScript-shaped zip whose pickle is `root` (tensors as CraftedTensor)."""

  class Crafted(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, StorageRef):
        return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
      return None

  buffer = io.BytesIO()
  Crafted(buffer, protocol=2).dump(root)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("archive/data.pkl", buffer.getvalue())
    z.writestr("archive/code/__torch__.py", "")
    for key, raw in data.items():
      z.writestr(f"archive/data/{key}", raw)
  return path


def test_a_crafted_archive_reads_each_storage_once(tmp_path, monkeypatch):
  from smartclip_jax.interop import torchscript

  four = StorageRef("0", 4)
  root = {"a": CraftedTensor(four, 0, (2,), (1,)), "b": CraftedTensor(four, 2, (2,), (1,))}
  path = crafted_archive(tmp_path / "ok.pt", root, {"0": np.arange(4, dtype=np.float32).tobytes()})
  reads = []
  real = zipfile.ZipFile.read
  monkeypatch.setattr(zipfile.ZipFile, "read", lambda z, n, *a: reads.append(n) or real(z, n, *a))
  got = torchscript.read_archive(path)
  np.testing.assert_array_equal(got["b"], [2.0, 3.0])
  assert reads.count("archive/data/0") == 1


@pytest.mark.parametrize(
  "size,stride,offset,refusal",
  [
    ((100,), (1,), 0, r"tensor w: shape \(100,\) .* reaches element 99 of a storage of 4"),
    ((2,), (1,), 3, r"tensor w: shape \(2,\) .* at offset 3 reaches element 4 of a storage of 4"),
    ((10**12,), (0,), 0, r"tensor w: shape \(1000000000000,\) is 4,000,000,000,000 bytes"),
    ((2, -3), (1, 1), 0, r"tensor w: shape \(2, -3\)"),
  ],
)
def test_archives_asking_for_more_than_they_hold_are_refused(
  tmp_path, size, stride, offset, refusal
):
  from smartclip_jax.interop import torchscript

  root = {"w": CraftedTensor(StorageRef("0", 4), offset, size, stride)}
  path = crafted_archive(tmp_path / "bad.pt", root, {"0": np.zeros(4, np.float32).tobytes()})
  with pytest.raises(torchscript.RefusedArchive, match=refusal):
    torchscript.read_archive(path)


def test_a_zip_bomb_and_a_looping_module_tree_are_refused(tmp_path, monkeypatch):
  from smartclip_jax.interop import torchscript

  monkeypatch.setattr(torchscript, "MAX_BYTES", 1 << 20)
  bomb = {"w": CraftedTensor(StorageRef("0", 4), 0, (4,), (1,))}
  path = crafted_archive(tmp_path / "bomb.pt", bomb, {"0": bytes(8 << 20)})  # 8 MiB of zeros
  assert path.stat().st_size < 100_000
  with pytest.raises(
    torchscript.RefusedArchive, match=r"unpack to 8,388,608 bytes, over 1,048,576"
  ):
    torchscript.read_archive(path)
  loop: dict = {}
  loop["self"] = loop
  path = crafted_archive(tmp_path / "loop.pt", loop, {})
  with pytest.raises(torchscript.RefusedArchive, match="loops back to itself at self"):
    torchscript.read_archive(path)


def test_bfloat16_data_is_budgeted_as_read_in_float32(tmp_path, monkeypatch):
  from smartclip_jax.interop import torchscript

  values = np.array([1.0, -2.5, 0.15625, 2.0**100], np.float32)  # all exact in bfloat16
  raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # 8 bytes on disk
  bf16 = StorageRef("0", 4, "BFloat16Storage")
  # Tied: two tensors of one storage take twice its 16 bytes as read (float32), 4x the file.
  root = {"a": CraftedTensor(bf16, 0, (4,), (1,)), "b": CraftedTensor(bf16, 0, (2, 2), (2, 1))}
  got = torchscript.read_archive(crafted_archive(tmp_path / "bf16.pt", root, {"0": raw}))
  np.testing.assert_array_equal(got["a"], values)
  np.testing.assert_array_equal(got["b"], values.reshape(2, 2))
  monkeypatch.setattr(torchscript, "MAX_BYTES", 12)  # over the file's 8 bytes, under its 16
  with pytest.raises(torchscript.RefusedArchive, match=r"read as 16 bytes, over 12"):
    torchscript.read_archive(tmp_path / "bf16.pt")


def test_a_shared_submodule_is_read_under_each_path_and_paths_are_bounded(tmp_path, monkeypatch):
  from smartclip_jax.interop import torchscript

  shared = {"w": CraftedTensor(StorageRef("0", 4), 0, (4,), (1,))}
  root = {"a": shared, "b": {"c": shared}}  # one module object reached twice: not a loop
  path = crafted_archive(tmp_path / "dag.pt", root, {"0": np.arange(4, dtype=np.float32).tobytes()})
  got = torchscript.read_archive(path)
  assert sorted(got) == ["a.w", "b.c.w"]
  np.testing.assert_array_equal(got["b.c.w"], np.arange(4))
  diamonds = shared
  for _ in range(40):  # 2**40 paths through 40 small modules
    diamonds = {"x": diamonds, "y": diamonds}
  path = crafted_archive(tmp_path / "fan.pt", diamonds, {"0": bytes(16)})
  monkeypatch.setattr(torchscript, "MAX_PATHS", 10_000)
  with pytest.raises(torchscript.RefusedArchive, match=r"more than 10,000 paths"):
    torchscript.read_archive(path)

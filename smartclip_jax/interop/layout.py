"""The one place for how our parameters are named and laid out in PyTorch checkpoints.

Two layouts (docs/method.md, the reference's checkpoint layout):
- OpenAI: OpenAI CLIP's state_dict names, which open_clip, Long-CLIP and the SmartCLIP
  reference share (Long-CLIP adds `positional_embedding_res`, SmartCLIP adds `mask_net.*`).
- HF: transformers' `CLIPModel` (q/k/v split, projections as Linear weights).
Everything here is numpy on flat dicts, so reading or writing a layout needs no torch.
Our tree is flax's: `visual/...`, `text/...`, `mask_net/...`, `logit_scale`, `logit_bias`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from smartclip_jax.models.layers import SCANNED
from smartclip_jax.models.text import KEEP_POSITIONS, stretch_positions
from smartclip_jax.models.vit import resample_positions

Flat = dict[str, np.ndarray]


def flatten(tree: Mapping) -> Flat:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


# ---- scanned stacks (`model.scan_layers`) <-> one name per layer --------------------------

_STACKED = re.compile(rf"(.*/){SCANNED}/(.+)$")


def _layer(x: Any, i: int) -> Any:
  """Layer i of a stacked leaf; of a shape-only leaf (no data), its shape without the axis."""
  if isinstance(x, (np.ndarray, jax.Array)):
    return x[i]
  return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)


def unstack_layers(flat: Mapping[str, Any]) -> Flat:
  """'.../resblocks/ln_1/scale' [L, w] -> '.../resblocks_{i}/ln_1/scale' [w] for each layer:
  the names of an unscanned model, which every layout below is written for."""
  out = {}
  for name, x in flat.items():
    if m := _STACKED.match(name):
      out.update({f"{m[1]}{SCANNED}_{i}/{m[2]}": _layer(x, i) for i in range(x.shape[0])})
    else:
      out[name] = x
  return out


def has_stacks(flat: Mapping[str, Any]) -> bool:
  """Whether a flat tree comes from a model with `scan_layers`."""
  return any(_STACKED.match(n) for n in flat)


def restack_layers(flat: Mapping[str, Any], like: Mapping[str, Any]) -> Flat:
  """The names of `like` (a flat tree of anything with `.shape`) from `flat`'s per-layer names,
  the inverse of `unstack_layers`; a leaf, or a stack with a layer, missing from `flat` is left
  out."""
  out = {}
  for name, x in like.items():
    if m := _STACKED.match(name):
      parts = [flat.get(f"{m[1]}{SCANNED}_{i}/{m[2]}") for i in range(x.shape[0])]
      if all(p is not None for p in parts):
        out[name] = np.stack([np.asarray(p) for p in parts])
    elif name in flat:
      out[name] = flat[name]
  return out


# ---- ours <-> OpenAI ----------------------------------------------------------------------


def openai_name(path: str) -> str:
  """Our flat name -> its OpenAI-layout key ('text/ln_final/scale' -> 'ln_final.weight')."""
  if path.startswith("text/"):
    path = path[len("text/") :]  # OpenAI's text tower lives at the top level
  path = re.sub(r"resblocks_(\d+)", r"resblocks.\1", path)
  path = path.replace("attn_pool/", "attn_pool/attention/")
  path = re.sub(r"attn/in_proj_kernel$", "attn/in_proj_weight", path)
  path = re.sub(r"attn/out_proj_kernel$", "attn/out_proj/weight", path)
  path = re.sub(r"attn/out_proj_bias$", "attn/out_proj/bias", path)
  path = re.sub(r"token_embedding/embedding$", "token_embedding/weight", path)
  path = re.sub(r"/(scale|kernel)$", "/weight", path)
  return path.replace("/", ".")


def _kind(path: str) -> str:
  for suffix, kind in (
    ("conv1/kernel", "conv"),
    ("in_proj_kernel", "in_proj"),
    ("in_proj_bias", "flat"),
    ("out_proj_kernel", "out_proj"),
    ("/kernel", "dense"),
  ):
    if path.endswith(suffix):
      return kind
  return "same"


def to_openai(params: Mapping) -> Flat:
  """Our parameter tree -> an OpenAI-layout state_dict of numpy arrays (same dtypes)."""
  out: Flat = {}
  for path, x in unstack_layers(flatten(jax.device_get(params))).items():
    x = np.asarray(x)
    kind = _kind(path)
    if kind == "conv":  # [p, p, 3, w] -> [w, 3, p, p]
      x = x.transpose(3, 2, 0, 1)
    elif kind == "in_proj":  # [w, 3, h, hd] -> [3w, w], rows q | k | v, head-major
      x = x.reshape(x.shape[0], -1).T
    elif kind == "out_proj":  # [h, hd, w] -> [w, h*hd]
      x = x.reshape(-1, x.shape[-1]).T
    elif kind == "flat":
      x = x.reshape(-1)
    elif kind == "dense":
      x = x.T
    out[openai_name(path)] = x.copy(order="C")  # (ascontiguousarray makes scalars 1-d)
  return out


def from_openai(state: Mapping[str, np.ndarray], shapes: Mapping) -> dict:
  """An OpenAI-layout state_dict -> our tree with the leaf shapes of `shapes` (a tree of
  anything with `.shape`). Long-CLIP's two position tables are merged; a position table with
  another number of rows is resized (`RESIZED`: text positions stretched Long-CLIP's way, image
  positions resampled to the target's patch grid). Extra keys are ignored (see `unused_keys`).
  A leaf whose key the state lacks is left out of the result (`init_from` keeps it fresh and
  names it); a tensor of another shape is a ValueError naming it and both shapes."""
  out = {}
  like_flat = flatten(shapes)
  for path, like in unstack_layers(like_flat).items():
    key = openai_name(path)
    if path == "text/positional_embedding" and "positional_embedding_res" in state:
      x = merged_positions(state["positional_embedding"], state["positional_embedding_res"])
    elif key in state:
      x = np.asarray(state[key])
    else:
      continue
    kind, shape = _kind(path), tuple(like.shape)
    expected = _openai_shape(kind, shape)
    if path in RESIZED and x.shape != expected and x.shape[1:] == expected[1:]:
      x = np.asarray(RESIZED[path](x, expected[0]))
    if x.shape != expected:
      raise ValueError(
        f"{key!r} (our {path}) has shape {x.shape} in the checkpoint, the model expects "
        f"{expected}: the checkpoint is a model of other sizes. Let its weights set the sizes "
        "(`smartclip_jax.load` does) or set the config's to the checkpoint's"
      )
    if kind == "conv":
      x = x.transpose(2, 3, 1, 0)
    elif kind in ("in_proj", "out_proj", "dense"):
      x = x.T
    out[path] = x.reshape(shape)
  return unflatten(restack_layers(out, like_flat))


# Position tables that take another number of rows: how each is resized to the target's.
RESIZED = {
  "text/positional_embedding": stretch_positions,
  "visual/positional_embedding": resample_positions,
}


def _openai_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The OpenAI-layout shape of our leaf of `shape` (the inverse of `to_openai`'s reshapes)."""
  if kind == "conv":  # [p, p, 3, w] <- [w, 3, p, p]
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == "in_proj":  # [w, 3, h, hd] <- [3w, w]
    return (math.prod(shape[1:]), shape[0])
  if kind == "out_proj":  # [h, hd, w] <- [w, h*hd]
    return (shape[-1], math.prod(shape[:-1]))
  if kind == "flat":
    return (math.prod(shape),)
  return shape[::-1] if kind == "dense" else shape


def merged_positions(table: np.ndarray, residual: np.ndarray) -> np.ndarray:
  """Long-CLIP's positions: row p of `table` for p < 20, of `residual` from 20 on."""
  rows = np.arange(table.shape[0])[:, None]
  return np.where(rows < KEEP_POSITIONS, np.asarray(table), np.asarray(residual))


def unused_keys(state: Mapping[str, np.ndarray], shapes: Mapping) -> list[str]:
  """Keys of an OpenAI-layout state_dict that `from_openai` does not read."""
  used = {openai_name(p) for p in unstack_layers(flatten(shapes))} | {"positional_embedding_res"}
  return sorted(k for k in state if k not in used and k not in IGNORED)


IGNORED = {"attn_mask", "input_resolution", "context_length", "vocab_size"}  # buffers, not weights


def infer_arch(state: Mapping[str, np.ndarray]) -> dict:
  """Model sizes from an OpenAI-layout state_dict (heads = width / 64, as in OpenAI CLIP)."""

  def layers(prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}(\d+)\.", k))}
    return max(found) + 1 if found else 0

  conv = state["visual.conv1.weight"]
  width, patch = conv.shape[0], conv.shape[-1]
  grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  text_width = state["ln_final.weight"].shape[0]
  return dict(
    embed_dim=state["visual.proj"].shape[1],
    vision=dict(
      image_size=grid * patch,
      patch_size=patch,
      width=width,
      layers=layers(r"visual\.transformer\.resblocks\."),
      heads=width // 64,
    ),
    text=dict(
      context_length=state["positional_embedding"].shape[0],
      vocab_size=state["token_embedding.weight"].shape[0],
      width=text_width,
      layers=layers(r"transformer\.resblocks\."),
      heads=text_width // 64,
    ),
    mask_net=any(k.startswith("mask_net.") for k in state),
    mask_heads=text_width // 64,
    logit_bias="logit_bias" in state,
  )


# ---- OpenAI <-> HF ------------------------------------------------------------------------

_HF_BLOCK = {
  "ln_1": "layer_norm1",
  "ln_2": "layer_norm2",
  "mlp.c_fc": "mlp.fc1",
  "mlp.c_proj": "mlp.fc2",
  "attn.out_proj": "self_attn.out_proj",
}
_HF_TOP = {
  "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
  "visual.class_embedding": "vision_model.embeddings.class_embedding",
  "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
  "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic, transformers' name
  "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
  "visual.ln_post.weight": "vision_model.post_layernorm.weight",
  "visual.ln_post.bias": "vision_model.post_layernorm.bias",
  "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
  "positional_embedding": "text_model.embeddings.position_embedding.weight",
  "ln_final.weight": "text_model.final_layer_norm.weight",
  "ln_final.bias": "text_model.final_layer_norm.bias",
  "logit_scale": "logit_scale",
}
_HF_PROJ = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def openai_to_hf(state: Mapping[str, np.ndarray]) -> Flat:
  """OpenAI layout -> transformers CLIPModel layout (no mask net: CLIPModel has none)."""
  out: Flat = {}
  for key, x in state.items():
    if key in _HF_TOP:
      out[_HF_TOP[key]] = x
    elif key in _HF_PROJ:
      out[_HF_PROJ[key]] = np.ascontiguousarray(x.T)
    elif m := re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$", key):
      tower = "vision_model" if m.group(1) else "text_model"
      prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
      if rest.startswith("attn.in_proj_"):
        for name, part in zip("qkv", np.split(x, 3, axis=0)):
          out[f"{prefix}self_attn.{name}_proj.{rest.rsplit('_', 1)[1]}"] = part
        continue
      module, param = rest.rsplit(".", 1)
      out[f"{prefix}{_HF_BLOCK[module]}.{param}"] = x
  return out


def hf_to_openai(state: Mapping[str, np.ndarray]) -> Flat:
  """transformers CLIPModel layout -> OpenAI layout (the inverse of `openai_to_hf`)."""
  top = {v: k for k, v in _HF_TOP.items()}
  proj = {v: k for k, v in _HF_PROJ.items()}
  block = {v: k for k, v in _HF_BLOCK.items()}
  out: Flat = {}
  qkv: dict[str, dict[str, np.ndarray]] = {}
  for key, x in state.items():
    if key in top:
      out[top[key]] = x
    elif key in proj:
      out[proj[key]] = np.ascontiguousarray(np.asarray(x).T)
    elif m := re.match(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
      prefix = f"{'visual.' if m.group(1) == 'vision' else ''}transformer.resblocks.{m.group(2)}."
      module, param = m.group(3), m.group(4)
      if q := re.match(r"self_attn\.([qkv])_proj$", module):
        qkv.setdefault(f"{prefix}attn.in_proj_{param}", {})[q.group(1)] = np.asarray(x)
      else:
        out[f"{prefix}{block[module]}.{param}"] = x
  for key, parts in qkv.items():
    out[key] = np.concatenate([parts[n] for n in "qkv"], axis=0)
  return out

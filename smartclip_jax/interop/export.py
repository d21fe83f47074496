"""Our parameters in PyTorch's layouts: open_clip's state_dict and model config, a
transformers `CLIPModel` directory with its processor files, and OpenAI's layout with Long-CLIP's
second position table and the mask network (what the SmartCLIP reference code loads). The name
mapping itself is `layout`'s; `.safetensors` outputs need no torch."""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from smartclip_jax.data import decode
from smartclip_jax.interop import layout
from smartclip_jax.tokenizer import EOT, SOT, get_tokenizer

FORMATS = ("open_clip", "hf", "openai")
OPENAI_CONTEXT = 77


def openai_state(params: Any, config: ml_collections.ConfigDict) -> layout.Flat:
  """The OpenAI/Long-CLIP/SmartCLIP layout, float32."""
  state = layout.to_openai(jax.device_get(params))
  if config.model.text.context_length > OPENAI_CONTEXT:  # Long-CLIP keeps two tables
    state["positional_embedding_res"] = state["positional_embedding"]
  return state


def open_clip_config(config: ml_collections.ConfigDict) -> dict:
  """The `open_clip` model config (as in its model_configs/*.json) of our config. Its top-level
  keys are `open_clip.CLIP`'s arguments: a SigLIP model's `init_logit_bias` makes open_clip
  create the `logit_bias` parameter the state_dict holds."""
  m = config.model
  siglip = {"init_logit_scale": m.logit_scale_init, "init_logit_bias": m.logit_bias_init}
  return {
    **(siglip if m.logit_bias_init is not None else {}),
    "embed_dim": m.embed_dim,
    "quick_gelu": m.activation == "quick_gelu",
    "vision_cfg": {
      "image_size": m.vision.image_size,
      "layers": m.vision.layers,
      "width": m.vision.width,
      "patch_size": m.vision.patch_size,
      "head_width": m.vision.width // m.vision.heads,
    },
    "text_cfg": {
      "context_length": m.text.context_length,
      "vocab_size": m.text.vocab_size,
      "width": m.text.width,
      "heads": m.text.heads,
      "layers": m.text.layers,
    },
  }


def hf_config(config: ml_collections.ConfigDict) -> dict:
  """A transformers `CLIPConfig` as config.json holds it."""
  m = config.model
  common = {"hidden_act": m.activation, "layer_norm_eps": 1e-5}
  return {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": m.embed_dim,
    "text_config": {
      **common,
      "vocab_size": m.text.vocab_size,
      "hidden_size": m.text.width,
      "intermediate_size": 4 * m.text.width,
      "num_hidden_layers": m.text.layers,
      "num_attention_heads": m.text.heads,
      "max_position_embeddings": m.text.context_length,
      "projection_dim": m.embed_dim,
      "bos_token_id": 49406,
      "eos_token_id": 49407,
      "pad_token_id": 0,
    },
    "vision_config": {
      **common,
      "hidden_size": m.vision.width,
      "intermediate_size": 4 * m.vision.width,
      "num_hidden_layers": m.vision.layers,
      "num_attention_heads": m.vision.heads,
      "image_size": m.vision.image_size,
      "patch_size": m.vision.patch_size,
      "projection_dim": m.embed_dim,
    },
  }


HF_SPECIAL = {SOT: "<|startoftext|>", EOT: "<|endoftext|>"}  # transformers' names for ours


def hf_processor_files(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The files of a `transformers.CLIPProcessor` that tokenises and preprocesses as we do: our
  BPE's vocabulary and merges; pad id 0 (our padding: transformers pads with the token "!", id
  0, kept from matching "!" in text by split_special_tokens); OpenAI CLIP's image transform."""
  bpe = get_tokenizer()
  vocab = {HF_SPECIAL.get(token, token): i for token, i in bpe.encoder.items()}
  merges = "".join(f"{a} {b}\n" for a, b in sorted(bpe.ranks, key=bpe.ranks.get))
  special = {
    "bos_token": HF_SPECIAL[SOT],
    "eos_token": HF_SPECIAL[EOT],
    "unk_token": HF_SPECIAL[EOT],
    "pad_token": {i: token for token, i in bpe.encoder.items()}[0],  # "!": we pad with id 0
  }
  size = config.model.vision.image_size
  files = {
    "vocab.json": vocab,
    "special_tokens_map.json": special,
    "tokenizer_config.json": {
      "tokenizer_class": "CLIPTokenizer",
      "processor_class": "CLIPProcessor",
      "model_max_length": config.model.text.context_length,
      "split_special_tokens": True,
      **special,
    },
    "preprocessor_config.json": {
      "image_processor_type": "CLIPImageProcessor",
      "processor_class": "CLIPProcessor",
      "do_convert_rgb": True,
      "do_resize": True,
      "size": {"shortest_edge": size},
      "resample": 3,  # PIL's bicubic
      "do_center_crop": True,
      "crop_size": {"height": size, "width": size},
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "image_mean": decode.CLIP_MEAN.tolist(),
      "image_std": decode.CLIP_STD.tolist(),
    },
  }
  return {"merges.txt": "#version: 0.2\n" + merges} | {
    name: json.dumps(spec, indent=2) for name, spec in files.items()
  }


def write_state(state: layout.Flat, out: epath.Path) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.suffix == ".safetensors":
    from safetensors.numpy import save

    out.write_bytes(save({k: np.asarray(v).copy(order="C") for k, v in state.items()}))
  else:
    import torch

    with out.open("wb") as f:
      torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, f)


def export(params: Any, config: ml_collections.ConfigDict, to: str, out: epath.Path) -> list[str]:
  """Writes a model's `params` (of `config`) in format `to` (`FORMATS`) at `out`; returns what
  was left out (names), for the user."""
  state = openai_state(params, config)
  mask = sorted(k for k in state if k.startswith("mask_net."))
  if to == "openai":
    write_state(state, out)
    out.with_suffix(".json").write_text(json.dumps(open_clip_config(config), indent=2))
    return []
  state = {
    k: v
    for k, v in state.items()
    if not k.startswith("mask_net.") and k != "positional_embedding_res"
  }
  if to == "open_clip":
    write_state(state, out)
    out.with_suffix(".json").write_text(json.dumps(open_clip_config(config), indent=2))
    return mask
  if to == "hf":
    state = {k: v for k, v in state.items() if k != "logit_bias"}
    out.mkdir(parents=True, exist_ok=True)
    write_state(layout.openai_to_hf(state), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    for name, text in hf_processor_files(config).items():
      (out / name).write_bytes(text.encode("utf-8"))
    return mask + (["logit_bias"] if "logit_bias" in params else [])
  raise ValueError(f"--to {to!r}: choose open_clip, hf or openai")

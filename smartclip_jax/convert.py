"""Checkpoints to and from PyTorch.

  python -m smartclip_jax.convert --checkpoint <workdir|ckpt|torch file> --to open_clip --out m.pt
  python -m smartclip_jax.convert --checkpoint runs/demo --to hf --out hf_dir/
  python -m smartclip_jax.convert --checkpoint runs/demo --to openai --out smartclip.pt
  python -m smartclip_jax.convert --from longclip-L.pt --out ckpt_dir/    (-> Orbax)

`open_clip`: the state_dict of `open_clip.create_model(...)`, with the model config beside it
(`<out>.json`; pass it to `open_clip.add_model_config` or read it); the mask network, which
open_clip has no place for, is left out and said so. The same `<out>.json` goes beside `openai`
outputs: state_dicts do not record head counts or the activation, and `load` reads it. `hf`: a
`transformers.CLIPModel` directory (config.json + model.safetensors) with the files of its
`CLIPProcessor`, which tokenises and preprocesses as we do (docs/interop.md). `openai`: OpenAI CLIP
names, Long-CLIP's two position tables for contexts over 77, and `mask_net.*`: what the
SmartCLIP reference code loads. `.safetensors`
outputs need no torch; `.pt`/`.pth`/`.bin` outputs are written with torch.save.
Anything `smartclip_jax.load` reads can be the input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from smartclip_jax import config as config_lib, storage
from smartclip_jax.data import decode
from smartclip_jax.interop import layout
from smartclip_jax.interop.loading import Loaded, load
from smartclip_jax.tokenizer import EOT, SOT, get_tokenizer

OPENAI_CONTEXT = 77


def openai_state(loaded: Loaded) -> layout.Flat:
  """The OpenAI/Long-CLIP/SmartCLIP layout, float32."""
  state = layout.to_openai(jax.device_get(loaded.params))
  if loaded.config.model.text.context_length > OPENAI_CONTEXT:  # Long-CLIP keeps two tables
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


def export(loaded: Loaded, to: str, out: epath.Path) -> list[str]:
  """Writes `loaded` in format `to`; returns what was left out (names), for the user."""
  state = openai_state(loaded)
  mask = sorted(k for k in state if k.startswith("mask_net."))
  if to == "openai":
    write_state(state, out)
    out.with_suffix(".json").write_text(json.dumps(open_clip_config(loaded.config), indent=2))
    return []
  state = {
    k: v
    for k, v in state.items()
    if not k.startswith("mask_net.") and k != "positional_embedding_res"
  }
  if to == "open_clip":
    write_state(state, out)
    out.with_suffix(".json").write_text(json.dumps(open_clip_config(loaded.config), indent=2))
    return mask
  if to == "hf":
    state = {k: v for k, v in state.items() if k != "logit_bias"}
    out.mkdir(parents=True, exist_ok=True)
    write_state(layout.openai_to_hf(state), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config(loaded.config), indent=2))
    for name, text in hf_processor_files(loaded.config).items():
      (out / name).write_bytes(text.encode("utf-8"))
    return mask + (["logit_bias"] if "logit_bias" in loaded.params else [])
  raise ValueError(f"--to {to!r}: choose open_clip, hf or openai")


def to_orbax(loaded: Loaded, out: epath.Path) -> None:
  """An Orbax checkpoint (step 0: `state` with the parameters, and `config`) that `load` and
  `init_from` read."""
  manager = ocp.CheckpointManager(
    storage.path(out),
    item_names=("state", "config"),
    options=ocp.CheckpointManagerOptions(create=True),
  )
  manager.save(
    0,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": loaded.params}),
      config=ocp.args.JsonSave(config_lib.to_dict(loaded.config)),
    ),
  )
  manager.wait_until_finished()
  manager.close()


def arg_parser() -> argparse.ArgumentParser:
  """The command line, apart so that tools (and the README's test) can check arguments."""
  parser = argparse.ArgumentParser(
    prog="python -m smartclip_jax.convert",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="what to export: anything smartclip_jax.load reads")
  source.add_argument("--from", dest="from_", help="a PyTorch checkpoint to write as Orbax")
  parser.add_argument("--to", choices=("open_clip", "hf", "openai"))
  parser.add_argument("--out", required=True, type=storage.path, help="a path or gs://BUCKET/PATH")
  parser.add_argument(
    "--activation",
    choices=("quick_gelu", "gelu"),
    help="the towers' activation, for a state_dict with no model config json beside it "
    "(default there: QuickGELU, OpenAI's; docs/interop.md)",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  parser = arg_parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if bool(args.checkpoint) != bool(args.to):
    parser.error("--checkpoint goes with --to; --from writes Orbax and takes no --to")
  overrides = {"activation": args.activation} if args.activation else {}
  loaded = load(args.checkpoint or args.from_, **overrides)
  if args.from_:
    to_orbax(loaded, args.out)
    print(f"wrote an Orbax checkpoint of {args.from_} to {args.out}")
    return
  left_out = export(loaded, args.to, args.out)
  print(f"wrote {args.to} weights of {args.checkpoint} to {args.out}")
  if args.to in ("open_clip", "openai"):
    print(
      f"model config ({args.out.with_suffix('.json')}): "
      f"{json.dumps(open_clip_config(loaded.config))}"
    )
  if left_out:
    print(
      f"left out (the {args.to} model has no place for them): "
      f"{', '.join(left_out[:4])}{' ...' if len(left_out) > 4 else ''} "
      f"({len(left_out)} tensors)"
    )


if __name__ == "__main__":
  main()

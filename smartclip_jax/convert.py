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

from smartclip_jax import checkpoint, storage
from smartclip_jax.interop import export
from smartclip_jax.load import load


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
  parser.add_argument("--to", choices=export.FORMATS)
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
    checkpoint.write_params(loaded.params, loaded.config, args.out)
    print(f"wrote an Orbax checkpoint of {args.from_} to {args.out}")
    return
  left_out = export.export(loaded.params, loaded.config, args.to, args.out)
  print(f"wrote {args.to} weights of {args.checkpoint} to {args.out}")
  if args.to in ("open_clip", "openai"):
    print(
      f"model config ({args.out.with_suffix('.json')}): "
      f"{json.dumps(export.open_clip_config(loaded.config))}"
    )
  if left_out:
    print(
      f"left out (the {args.to} model has no place for them): "
      f"{', '.join(left_out[:4])}{' ...' if len(left_out) > 4 else ''} "
      f"({len(left_out)} tensors)"
    )


if __name__ == "__main__":
  main()

"""docs/config.md, the config field reference, generated from `config.base_config()`.

  python -m smartclip_jax.config_reference > docs/config.md

One line per field; a test fails when a field has no line here or docs/config.md is stale.
"""

from __future__ import annotations

from flax import traverse_util

from smartclip_jax import config as config_lib

FIELDS = {
  "seed": "seeds initialisation, the data order and augmentation (fixed for a run's life)",
  "loss": "smartclip, clip or siglip (`config.set_loss` sets the model fields that go with it)",
  "loss_impl": "global (one logits matrix on every device) or ring (blockwise around the devices)",
  "batch_size": "the global batch, over all devices and processes",
  "accum_steps": "micro-batches per step; the same loss and gradients as the whole batch",
  "total_steps": "optimizer steps of the run; the cosine schedules end here",
  "epochs": "> 0: passes over the training data, setting total_steps from its records and "
  "batch_size; 0: total_steps as given",
  "log_every": "steps between metrics lines (metrics.jsonl, TensorBoard, the log)",
  "checkpoint_every": "steps between checkpoints (one is also saved at the end and on a stop)",
  "eval.every": "steps between evaluations; 0 evaluates only at the end",
  "eval.tasks": "evaluation tasks run with the held-out split, e.g. urban1k:/data/Urban1k,cifar10",
  "eval.best_metric": "keep the best checkpoint by this metric (i2t_r1, or task/metric); '' none",
  "keep_checkpoints": "how many of the newest checkpoints are kept",
  "checkpoint_atomicity": "auto, rename or commit_file: how a checkpoint is committed",
  "init_from": "start from these weights: a run, a PyTorch file, an HF dir, hf-hub:ORG/NAME; "
  "scratch: random",
  "recipe": "the paper recipe this config is (vit_b16, vit_l14): needs init_from and data.name",
  "profile_steps": "trace this many steps after the first into the TensorBoard profile",
  "max_nonfinite_steps": "stop after this many non-finite steps in a row (they are not applied)",
  "skip_nonfinite": "auto, where or cond: how a non-finite step is left out",
  "step_timeout_s": "end a stuck run (stacks printed, exit 3) when no step finishes in this "
  "long; 0 off",
  "smartclip.temperature": "the fixed softmax temperature of SmartCLIP's logits",
  "smartclip.align_weight": "weight of the two cross-entropies (the reference's 10)",
  "smartclip.sparsity_weight": "weight of the mask sparsity term (the reference's 2)",
  "smartclip.modular": "false: the 'no modular loss' ablation (each image masked by its caption)",
  "clip.temperature": "loss=clip: a fixed temperature; 0 learns it",
  "clip.subset_dims": "loss=clip: 0, or compare texts with this many image dimensions only "
  "(fixed at random by the seed; a control for SmartCLIP's masks)",
  "model.embed_dim": "D, the shared embedding width",
  "model.activation": "quick_gelu (OpenAI's) or gelu (open_clip's own models)",
  "model.dtype": "compute dtype (float32, bfloat16); parameters and optimizer state stay float32",
  "model.remat": "none, full or dots: what each tower block keeps for the backward pass",
  "model.scan_layers": "tower blocks under nn.scan: compile time flat in depth",
  "model.attention": "auto, dot_product or einsum: the attention kernel's form",
  "model.vision.image_size": "input image side in pixels",
  "model.vision.patch_size": "ViT patch side in pixels",
  "model.vision.width": "image tower width",
  "model.vision.layers": "image tower blocks",
  "model.vision.heads": "image tower attention heads",
  "model.text.context_length": "text positions (248: Long-CLIP's stretch of CLIP's 77)",
  "model.text.vocab_size": "BPE vocabulary size",
  "model.text.width": "text tower width",
  "model.text.layers": "text tower blocks",
  "model.text.heads": "text tower attention heads",
  "model.text.trim_padding": "CLIP/SigLIP: run the text tower on the batch's longest caption "
  "rounded up to this; 0 off",
  "model.mask.heads": "attention heads of the mask network's block",
  "model.mask.hard": "binary masks with a straight-through gradient (false: sigmoid masks)",
  "model.mask_net": "whether the model has a mask network (SmartCLIP)",
  "model.logit_scale_init": "initial log logit scale (CLIP, SigLIP)",
  "model.logit_bias_init": "initial logit bias; none: no bias parameter (SigLIP has one)",
  "model.patch_dropout": "fraction of image patches dropped in training (FLIP); evaluation "
  "sees all",
  "optim.b1": "AdamW's first-moment decay",
  "optim.b2": "AdamW's second-moment decay",
  "optim.eps": "AdamW's epsilon",
  "optim.decay": "all (every tower parameter, the reference) or matrices (open_clip's)",
  "optim.grad_clip_norm": "clip the global gradient norm to this; 0 off",
  "optim.end_lr_ratio": "the cosine ends at lr times this",
  "optim.frozen_positions": "text positions kept frozen (Long-CLIP's first 20)",
  "optim.frozen": "regex over parameter paths that do not train (no gradient, no state); "
  "LiT: visual/.*",
  "optim.groups": "(regex, towers|mask_net) pairs: each parameter's schedule, first match",
  "optim.lr_mults": "(regex, multiplier) pairs: learning rate times the first match's",
  "optim.wd_mults": "(regex, multiplier) pairs: weight decay times the first match's",
  "optim.towers.lr": "towers' peak learning rate",
  "optim.towers.weight_decay": "towers' AdamW weight decay",
  "optim.towers.warmup_steps": "towers' linear warm-up steps before the cosine",
  "optim.mask_net.lr": "mask network's peak learning rate (cosine, no warm-up)",
  "optim.mask_net.weight_decay": "mask network's AdamW weight decay",
  "wandb.project": "a W&B project: log metrics and the config there too; '' off",
  "wandb.entity": "the W&B entity (team or user); '' your default",
  "wandb.name": "the W&B run's display name; '' W&B's own",
  "wandb.tags": "the W&B run's tags",
  "mesh.data": "devices on the data axis; -1: the rest",
  "mesh.fsdp": "devices parameters and optimizer state are sharded over",
  "mesh.tensor": "devices on the tensor axis",
  "data.name": "demo, sharegpt4v, folder, array_record or tfds; '' not set (recipes)",
  "data.path": "the training data: JSON, folder, CSV/TSV/JSONL, shard dir or glob, TFDS name",
  "data.image_root": "images are read relative to this (default: beside data.path)",
  "data.eval_path": "the held-out split for folder and array_record",
  "data.mixture": "train on a blend instead: NAME:PATH=WEIGHT,...",
  "data.demo.num_train": "generated training records",
  "data.demo.num_eval": "generated held-out records",
  "data.sharegpt4v.holdout": "ShareGPT4V's first records held out (ShareGPT4V-1k)",
  "data.folder.image_key": "CSV/TSV image column",
  "data.folder.caption_key": "CSV/TSV caption column",
  "data.tfds.data_dir": "where the TFDS set is prepared ('' TFDS's default)",
  "data.tfds.train_split": "TFDS training split",
  "data.tfds.eval_split": "TFDS held-out split",
  "data.tfds.image_key": "'/'-separated path to the image in a TFDS example",
  "data.tfds.caption_key": "'/'-separated path to the caption(s) in a TFDS example",
  "data.caption_mode": "prefix (random first k sentences, the paper's), full or first",
  "data.sentence_split": "ours (sentences, abbreviations kept) or reference (cut at every '. ')",
  "data.train_transform": "centre_crop (the reference's) or random_resized_crop",
  "data.crop_scale": "random_resized_crop's area range",
  "data.crop_ratio": "random_resized_crop's aspect-ratio range",
  "data.min_image_side": "smaller images are skipped (counted as too_small)",
  "data.max_image_pixels": "larger images are skipped before decoding (too_large)",
  "data.max_bad_fraction": "stop when more records than this fraction are unusable",
  "data.num_workers": "Grain worker processes; 0 decodes in the main process",
  "data.accept_changed_sources": "resume on training sources that differ from the checkpoint's "
  "(shards added, removed or resized); the stream changes from there",
  "data.eval_batch_size": "evaluation batch, over all devices",
}


def fields() -> dict:
  """Every field of `base_config()` and its default."""
  return traverse_util.flatten_dict(config_lib.base_config().to_dict(), sep=".")


def markdown() -> str:
  """docs/config.md's text."""
  lines = [
    "# Config fields",
    "",
    "Every field of `smartclip_jax.config.base_config()`, which every config in `configs/` starts",
    "from, with its default there (configs change some: `configs/demo.py`, the recipes). Set any",
    "on the command line: `--config.optim.towers.lr=1e-5`. Generated by",
    "`python -m smartclip_jax.config_reference > docs/config.md`; do not edit by hand.",
    "",
    "| field | default | what it sets |",
    "|---|---|---|",
  ]
  for name, default in sorted(fields().items()):
    lines.append(f"| `{name}` | `{default!r}` | {FIELDS[name]} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(markdown(), end="")

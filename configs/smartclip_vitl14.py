"""The paper's recipe (docs/method.md, the recipe): SmartCLIP ViT-L/14 fine-tuned from OpenAI
CLIP, context 248, global batch 1024.

Two AdamW groups (towers 1e-6 with 200 warm-up steps then cosine, wd 1e-2; mask net 1e-3 cosine,
wd 0), 3 epochs of ShareGPT4V's 1,245,901 training records = 3,650 steps, bf16 compute.
A run names its starting weights and its data, or stops before compiling, saying what to set:
  --config.init_from=hf-hub:openai/clip-vit-large-patch14   (after `hf download` of it; or
      OpenAI's ViT-L-14.pt, an open_clip or transformers file or directory)
  --config.data.name=array_record --config.data.path=... --config.data.eval_path=...
      (shards from `smartclip_jax.data.prepare`; or sharegpt4v, folder, tfds: docs/data.md)
--config.init_from=scratch trains the towers from random initialisation instead (raise
optim.towers.lr then); --config.data.name=demo trains on generated shapes.
"""

from smartclip_jax.config import recipe_config


def get_config():
  return recipe_config("vit_l14", loss="smartclip")

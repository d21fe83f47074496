"""The paper's recipe (docs/method.md, the recipe): SmartCLIP ViT-L/14, context 248, global
batch 1024.

Two AdamW groups (towers 1e-6 with 200 warm-up steps then cosine, wd 1e-2; mask net 1e-3 cosine,
wd 0), 3 epochs of ShareGPT4V's 1,245,901 training records = 3,650 steps, bf16 compute.
Data defaults to the embedded demo set (so the config runs anywhere); point it at ShareGPT4V
with --config.data.name=sharegpt4v --config.data.path=<json> --config.data.image_root=<dir>,
or at shards from `smartclip_jax.data.prepare` (see the README).
"""

from smartclip_jax.config import recipe_config


def get_config():
  return recipe_config("vit_l14", loss="smartclip")

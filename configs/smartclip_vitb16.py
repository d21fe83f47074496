"""The paper's recipe (docs/method.md, the recipe) with ViT-B/16 towers: D = 512, mask net
with 8 heads."""

from smartclip_jax.config import recipe_config


def get_config():
  return recipe_config("vit_b16", loss="smartclip")

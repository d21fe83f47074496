"""The paper's recipe (docs/method.md, the recipe) with ViT-B/16 towers: D = 512, mask net
with 8 heads, fine-tuned from OpenAI CLIP ViT-B/16. Like smartclip_vitl14.py, a run names its
starting weights (--config.init_from=hf-hub:openai/clip-vit-base-patch16, OpenAI's
ViT-B-16.pt, ...; or init_from=scratch) and its data, or stops saying what to set."""

from smartclip_jax.config import recipe_config


def get_config():
  return recipe_config("vit_b16", loss="smartclip")

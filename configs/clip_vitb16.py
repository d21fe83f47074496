"""The CLIP baseline on the ViT-B/16 recipe: the same towers, starting weights, data and
schedule as smartclip_vitb16.py (init_from and data named the same way), with a learned
temperature (init 0.07) and no mask network."""

from smartclip_jax.config import recipe_config


def get_config():
  return recipe_config("vit_b16", loss="clip")

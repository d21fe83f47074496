"""SmartCLIP in JAX/Flax: CLIP whose captions align with a learned subset of image dimensions."""

from smartclip_jax.load import Loaded, load  # imports no jax until called

__version__ = "0.1.0"
__all__ = ["Loaded", "load"]

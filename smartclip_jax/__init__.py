"""SmartCLIP in JAX/Flax: CLIP whose captions align with a learned subset of image dimensions."""

__version__ = "0.1.0"

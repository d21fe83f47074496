"""SmartCLIP in JAX/Flax: CLIP whose captions align with a learned subset of image dimensions."""

__version__ = "0.1.0"


def load(path, **overrides):
  """Any checkpoint (ours, OpenAI/open_clip/Long-CLIP/SmartCLIP PyTorch, transformers) as a
  model with `.encode_image`, `.encode_text`, `.tokenize`, `.preprocess`; see
  `smartclip_jax.interop.loading`."""
  from smartclip_jax.interop.loading import load as _load  # jax is imported only when used

  return _load(path, **overrides)

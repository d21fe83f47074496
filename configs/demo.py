"""Tiny towers on the embedded demo data: the README's main job, a few minutes on 2 CPU cores.

What it takes from the reference's recipe (docs/method.md, the recipe) and what it changes:
- As the reference: the SmartCLIP loss and mask network, AdamW's constants (0.999, 1e-8), the
  warm-up shape (lr (step + 1) / warmup, then cosine), the mask net's own group (1e-3, no decay,
  no warm-up), the evaluation transform for training images (the demo's images are square and
  drawn at the model's size, so it is the identity), random first-k-sentence captions.
- Changed, because these towers start from scratch rather than from OpenAI CLIP: the towers
  train at 1e-3 (the recipe's 1e-6 only nudges a trained CLIP), with weight decay 0.1 on
  matrices only (open_clip's from-scratch practice: decaying LayerNorm gains and biases of a
  random network toward 0 at that rate hurts), gradient clipping at norm 1 (early from-scratch
  steps), a 30-step warm-up, and nothing frozen in the text position table (it is random).
"""

from smartclip_jax.config import base_config, set_loss


def get_config(loss: str = "smartclip"):
  """`configs/demo.py:clip` (or `:siglip`): the same run with that loss and its model."""
  c = set_loss(base_config(), loss)
  c.batch_size = 64
  c.total_steps = 600
  c.log_every = 25
  c.checkpoint_every = 100

  c.model.embed_dim = 64
  c.model.vision.update(image_size=32, patch_size=8, width=64, layers=3, heads=4)
  c.model.text.update(context_length=48, width=64, layers=3, heads=4)
  c.model.mask.heads = 4

  c.optim.towers.update(lr=1e-3, weight_decay=0.1, warmup_steps=30)
  c.optim.mask_net.lr = 1e-3
  c.optim.decay = "matrices"
  c.optim.frozen_positions = 0
  c.optim.grad_clip_norm = 1.0

  c.data.demo.update(num_train=8192, num_eval=512)
  c.data.eval_batch_size = 128
  return c

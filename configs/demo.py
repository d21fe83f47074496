"""Tiny towers on the embedded demo data: the README's main job, a few minutes on 2 CPU cores."""

from smartclip_jax.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 64
  c.total_steps = 600
  c.log_every = 25
  c.checkpoint_every = 100

  c.model.embed_dim = 64
  c.model.vision.update(image_size=32, patch_size=8, width=64, layers=3, heads=4)
  c.model.text.update(context_length=48, width=64, layers=3, heads=4)
  c.model.mask.heads = 4

  # From scratch, so far larger learning rates than the fine-tuning recipe's 1e-6.
  c.optim.towers.update(lr=1e-3, weight_decay=0.1, warmup_steps=30)
  c.optim.mask_net.lr = 1e-3
  c.optim.frozen_positions = 0
  c.optim.grad_clip_norm = 1.0

  c.data.crop_scale = (1.0, 1.0)  # captions name positions: no cropping
  c.data.crop_ratio = (1.0, 1.0)
  c.data.num_train = 8192
  c.data.num_eval = 512
  c.data.eval_batch_size = 128
  return c

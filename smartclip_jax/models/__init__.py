"""Flax modules: ViT and text towers, the mask network, and the two-tower model."""

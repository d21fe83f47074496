"""PyTorch references written from the method's description (docs/method.md): a small model in
the OpenAI / Long-CLIP / SmartCLIP layout for the interop tests (same state_dict names, same
forward), and the reference's training pieces that shape its dynamics: the loss as it builds it,
the mask network's initialisation, the learning-rate schedule and the image transform.
"""

import math

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

KEEP = 20  # Long-CLIP: positions below this come from `positional_embedding`
OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # open_clip's CLIP: init_logit_scale's default


class QuickGELU(nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
  def __init__(self, width, heads, quick_gelu):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.ln_2 = nn.LayerNorm(width)
    self.mlp = nn.Sequential()
    self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
    self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
    self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

  def forward(self, x, mask=None):
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
  def __init__(self, width, layers, heads, quick_gelu):
    super().__init__()
    self.resblocks = nn.ModuleList([Block(width, heads, quick_gelu) for _ in range(layers)])

  def forward(self, x, mask=None):
    for block in self.resblocks:
      x = block(x, mask)
    return x


class Visual(nn.Module):
  def __init__(self, image_size, patch, width, layers, heads, embed_dim, quick_gelu):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
    self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
    self.positional_embedding = nn.Parameter(
      torch.randn((image_size // patch) ** 2 + 1, width) * width**-0.5
    )
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = Transformer(width, layers, heads, quick_gelu)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

  def forward(self, images):  # NCHW
    x = self.conv1(images).flatten(2).transpose(1, 2)
    cls = self.class_embedding.expand(x.shape[0], 1, -1)
    x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
    return self.ln_post(self.transformer(x)[:, 0]) @ self.proj


class MaskNet(nn.Module):
  """One unmasked block, attention pooling (Linear width -> 1, softmax over tokens), sigmoid,
  hard threshold at 0.5; initialised as the reference does."""

  def __init__(self, width, heads, quick_gelu):
    super().__init__()
    self.resblocks = nn.ModuleList([Block(width, heads, quick_gelu)])
    self.attn_pool = nn.Module()
    self.attn_pool.attention = nn.Linear(width, 1)
    self.initialize_parameters(width)

  def initialize_parameters(self, width, layers=1):
    """OpenAI CLIP's block initialisation with one layer; the pooling Linear normal(width^-0.5)
    with a zero bias. Biases not named keep PyTorch's defaults (MultiheadAttention zeroes its
    own, nn.Linear draws uniform +-1/sqrt(fan_in))."""
    attn_std, proj_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5
    for block in self.resblocks:
      nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
      nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
      nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
      nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(self.attn_pool.attention.weight, std=attn_std)
    nn.init.zeros_(self.attn_pool.attention.bias)

  def logits(self, tokens):
    """The pooled pre-sigmoid outputs [B, width]."""
    x = self.resblocks[0](tokens)
    weights = torch.softmax(self.attn_pool.attention(x), dim=1)
    return (weights * x).sum(dim=1)

  def forward(self, tokens):
    return (torch.sigmoid(self.logits(tokens)) >= 0.5).float()


def smartclip_loss(
  img, txt, mask_logits, hard=True, temperature=0.01, align_weight=10.0, sparsity_weight=2.0
):
  """The SmartCLIP loss as the reference builds it on one device holding the global batch:
  the straight-through mask `(s >= 0.5) - s.detach() + s`, the explicit [images, captions, D]
  masked image embeddings, both cross-entropies of one similarity matrix, and the sparsity term
  `mean(abs(mask))` (whose backward is sign(mask), zero for an off entry)."""
  soft = torch.sigmoid(mask_logits)
  mask = (soft >= 0.5).float() - soft.detach() + soft if hard else soft
  t = txt / txt.norm(dim=-1, keepdim=True)
  masked = img[:, None, :] * mask[None, :, :]  # image i under caption j's mask
  sim = (masked * t[None]).sum(-1) / masked.norm(dim=-1)
  logits = sim / temperature
  labels = torch.arange(img.shape[0])
  align = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
  return align_weight * align + sparsity_weight * mask.abs().mean()


def cosine_lr(base_lr, warmup, steps):
  """step -> learning rate: base_lr (step + 1) / warmup while step < warmup, then a cosine to 0
  at `steps` (the schedule the reference assigns to an optimizer group before each step)."""

  def lr(step):
    if step < warmup:
      return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) * base_lr

  return lr


def clip_transform(image: PIL.Image.Image, size: int) -> torch.Tensor:
  """torchvision's Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize(OpenAI's mean
  and std) on a PIL image, step by step (torchvision itself does not load beside this torch):
  the shorter side to `size`, the longer to int(size * long / short); the crop's offset
  int(round((side - size) / 2))."""
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), PIL.Image.BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  image = image.crop((left, top, left + size, top + size))
  x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
  return (x - mean) / std


class ReferenceCLIP(nn.Module):
  def __init__(
    self,
    embed_dim=64,
    image_size=32,
    patch=8,
    vision_width=128,
    vision_layers=2,
    context=77,
    vocab=49408,
    text_width=64,
    text_layers=2,
    quick_gelu=True,
    long_clip=False,
    mask_net=False,
    vision_heads=None,
    text_heads=None,
    init_logit_scale=4.6052,
    init_logit_bias=None,
  ):
    super().__init__()
    vision_heads = vision_heads or vision_width // 64  # OpenAI's head width, unless given
    text_heads = text_heads or text_width // 64
    self.visual = Visual(
      image_size, patch, vision_width, vision_layers, vision_heads, embed_dim, quick_gelu
    )
    self.token_embedding = nn.Embedding(vocab, text_width)
    self.positional_embedding = nn.Parameter(torch.randn(context, text_width) * 0.01)
    if long_clip:
      self.positional_embedding_res = nn.Parameter(torch.randn(context, text_width) * 0.01)
    self.transformer = Transformer(text_width, text_layers, text_heads, quick_gelu)
    self.ln_final = nn.LayerNorm(text_width)
    self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width**-0.5)
    self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
    if init_logit_bias is not None:  # open_clip's CLIP: a logit_bias parameter only then
      self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
    if mask_net:
      self.mask_net = MaskNet(text_width, text_heads, quick_gelu)
    self.register_buffer(
      "attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=False
    )

  def positions(self):
    if not hasattr(self, "positional_embedding_res"):
      return self.positional_embedding
    keep = (torch.arange(self.positional_embedding.shape[0]) < KEEP)[:, None]
    return torch.where(keep, self.positional_embedding, self.positional_embedding_res)

  def text_tokens(self, tokens):
    x = self.token_embedding(tokens) + self.positions()
    return self.ln_final(self.transformer(x, self.attn_mask))

  def encode_text(self, tokens):
    x = self.text_tokens(tokens)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection

  def encode_image(self, images):
    return self.visual(images)

  def masks(self, tokens):
    return self.mask_net(self.text_tokens(tokens))


def open_clip_model(
  embed_dim,
  vision_cfg,
  text_cfg,
  quick_gelu=False,
  init_logit_scale=OPEN_CLIP_LOGIT_SCALE,
  init_logit_bias=None,
):
  """The ReferenceCLIP that `open_clip.CLIP(**model_cfg)` builds from a model config json: its
  top-level keys as arguments (another is a TypeError, as there), open_clip's defaults for the
  fields a config leaves out (CLIPVisionCfg, CLIPTextCfg)."""
  vision = dict(layers=12, width=768, head_width=64, patch_size=16, image_size=224) | vision_cfg
  text = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12) | text_cfg
  return ReferenceCLIP(
    embed_dim=embed_dim,
    image_size=vision["image_size"],
    patch=vision["patch_size"],
    vision_width=vision["width"],
    vision_layers=vision["layers"],
    vision_heads=vision["width"] // vision["head_width"],
    context=text["context_length"],
    vocab=text["vocab_size"],
    text_width=text["width"],
    text_layers=text["layers"],
    text_heads=text["heads"],
    quick_gelu=quick_gelu,
    init_logit_scale=init_logit_scale,
    init_logit_bias=init_logit_bias,
  )

"""A small PyTorch model in the OpenAI / Long-CLIP / SmartCLIP reference layout (SMARTCLIP.md
§7), written from that description for the interop tests: same state_dict names, same forward.
"""

import torch
from torch import nn

KEEP = 20  # Long-CLIP: positions below this come from `positional_embedding`


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
    self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
    self.positional_embedding = nn.Parameter(
        torch.randn((image_size // patch) ** 2 + 1, width) * width ** -0.5)
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = Transformer(width, layers, heads, quick_gelu)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

  def forward(self, images):  # NCHW
    x = self.conv1(images).flatten(2).transpose(1, 2)
    cls = self.class_embedding.expand(x.shape[0], 1, -1)
    x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
    return self.ln_post(self.transformer(x)[:, 0]) @ self.proj


class MaskNet(nn.Module):
  """One unmasked block, attention pooling (Linear width -> 1, softmax over tokens), sigmoid,
  hard threshold at 0.5."""

  def __init__(self, width, heads, quick_gelu):
    super().__init__()
    self.resblocks = nn.ModuleList([Block(width, heads, quick_gelu)])
    self.attn_pool = nn.Module()
    self.attn_pool.attention = nn.Linear(width, 1)

  def forward(self, tokens):
    x = self.resblocks[0](tokens)
    weights = torch.softmax(self.attn_pool.attention(x), dim=1)
    soft = torch.sigmoid((weights * x).sum(dim=1))
    return (soft >= 0.5).float()


class ReferenceCLIP(nn.Module):
  def __init__(self, embed_dim=64, image_size=32, patch=8, vision_width=128, vision_layers=2,
               context=77, vocab=49408, text_width=64, text_layers=2, quick_gelu=True,
               long_clip=False, mask_net=False, vision_heads=None, text_heads=None):
    super().__init__()
    vision_heads = vision_heads or vision_width // 64  # OpenAI's head width, unless given
    text_heads = text_heads or text_width // 64
    self.visual = Visual(image_size, patch, vision_width, vision_layers, vision_heads, embed_dim,
                         quick_gelu)
    self.token_embedding = nn.Embedding(vocab, text_width)
    self.positional_embedding = nn.Parameter(torch.randn(context, text_width) * 0.01)
    if long_clip:
      self.positional_embedding_res = nn.Parameter(torch.randn(context, text_width) * 0.01)
    self.transformer = Transformer(text_width, text_layers, text_heads, quick_gelu)
    self.ln_final = nn.LayerNorm(text_width)
    self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width ** -0.5)
    self.logit_scale = nn.Parameter(torch.tensor(4.6052))
    if mask_net:
      self.mask_net = MaskNet(text_width, text_heads, quick_gelu)
    self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1),
                         persistent=False)

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

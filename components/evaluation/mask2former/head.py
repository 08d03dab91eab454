"""Mask2Former (Cheng et al. 2022, "Masked-attention Mask Transformer for Universal Image Segmentation").

On the adapter's pyramid (1/4, 1/8, 1/16, 1/32, D channels each):

- Pixel decoder: the 1/8, 1/16, 1/32 maps projected to `hidden` channels (1x1 conv + GroupNorm 32) are refined
  together by a Deformable DETR encoder (6 layers: multi-scale deformable self-attention over all three levels with
  sine position and level embeddings, then an FFN; post-norm); the 1/4 map (1x1 conv + GroupNorm) plus the refined
  1/8 map upsampled, through a 3x3 conv + GroupNorm + ReLU, gives the per-pixel embeddings ("mask features", 1/4)
  after a 1x1 conv.
- Transformer decoder: N learned queries (features and positions) and 9 layers, round-robin over the refined 1/32,
  1/16 and 1/8 maps (sine positions + level embedding): masked cross-attention (a query attends only where its
  mask predicted by the previous layer, resized to that level, has probability >= 0.5; a query whose mask is empty
  everywhere attends everywhere), self-attention among queries, FFN; post-norm.
- Predictions before the first layer and after every layer (10 in all): class logits over C classes + "no object"
  (a linear layer on the layer-normed queries) and mask logits at 1/4 (a 3-layer MLP of the query dotted with the
  mask features). Every prediction is supervised (criterion.py); the last one is the output.
- Semantic inference: per pixel, sum_q softmax(class_q)[c] * sigmoid(mask_q) over the queries (no-object dropped).

Widths as the paper (hidden 256, FFN 2048 in the decoder and 1024 in the encoder, 8 heads, 4 sampling points,
100 queries); `Mask2FormerConfig` scales them for CPU runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.evaluation.mask2former.deform_attn import MSDeformAttn, reference_points


@dataclass(frozen=True)
class Mask2FormerConfig:
    """Pixel- and transformer-decoder widths and depths; the defaults are the paper's."""

    num_classes: int
    hidden_dim: int = 256
    """Width of the pixel decoder, the queries and the mask embeddings (a multiple of 32: GroupNorm(32))."""
    num_queries: int = 100
    decoder_layers: int = 9
    """Masked-attention decoder layers (3 rounds over the 3 scales)."""
    encoder_layers: int = 6
    """Deformable encoder layers of the pixel decoder."""
    num_heads: int = 8
    ffn_dim: int = 2048
    """FFN width of the decoder layers; the encoder's is half of it (1024, as the paper)."""
    num_points: int = 4
    """Sampling points of the encoder's deformable attention."""

    def __post_init__(self) -> None:
        if self.hidden_dim % 32 or self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim = {self.hidden_dim} must be a multiple of 32 and of {self.num_heads} heads")


def sine_position(shape: tuple[int, int], dim: int, device: torch.device | str | None = None) -> Tensor:
    """DETR's normalised sine position embedding of an (h, w) map: (h w, dim), y features then x features."""
    h, w = shape
    half = dim // 2
    y = (torch.arange(h, device=device, dtype=torch.float32) + 1) / (h + 1e-6) * 2 * math.pi  # cumsum of ones, /h
    x = (torch.arange(w, device=device, dtype=torch.float32) + 1) / (w + 1e-6) * 2 * math.pi
    freq = 10000.0 ** (2 * (torch.arange(half, device=device) // 2) / half)  # (half,)
    py, px = y[:, None] / freq, x[:, None] / freq  # (h, half), (w, half)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)  # interleaved sin, cos
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat([py[:, None].expand(h, w, half), px[None].expand(h, w, half)], dim=-1)  # (h, w, dim)
    return pos.reshape(h * w, dim)


def _proj_gn(cin: int, cout: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.GroupNorm(32, cout))


class EncoderLayer(nn.Module):
    """Deformable DETR encoder layer (post-norm): x = LN(x + MSDA(x + pos, x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, points: int, ffn_dim: int) -> None:
        super().__init__()
        self.attn = MSDeformAttn(dim, num_levels=3, num_heads=heads, num_points=points)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))

    def forward(self, x: Tensor, pos: Tensor, ref: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        x = self.norm1(x + self.attn(x + pos, ref, x, shapes))
        return self.norm2(x + self.ffn(x))


class PixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder: pyramid -> (mask features at 1/4, [1/32, 1/16, 1/8] maps)."""

    def __init__(self, in_dim: int, cfg: Mask2FormerConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.input_proj = nn.ModuleList(_proj_gn(in_dim, d) for _ in range(3))  # 1/8, 1/16, 1/32
        self.level_embed = nn.Parameter(torch.randn(3, d) * 0.02)
        self.layers = nn.ModuleList(
            EncoderLayer(d, cfg.num_heads, cfg.num_points, cfg.ffn_dim // 2) for _ in range(cfg.encoder_layers)
        )
        self.lateral = _proj_gn(in_dim, d)  # 1/4
        self.output = nn.Sequential(_proj_gn(d, d, 3), nn.ReLU(inplace=True))
        self.mask_features = nn.Conv2d(d, d, 1)

    def forward(self, pyramid: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        f1, *coarse = pyramid
        maps = [proj(f) for proj, f in zip(self.input_proj, coarse, strict=True)]  # (B, d, h_l, w_l)
        B, d = maps[0].shape[:2]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        x = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (B, S, d)
        pos = torch.cat([sine_position(s, d, x.device) + e for s, e in zip(shapes, self.level_embed, strict=True)])
        pos, ref = pos[None].to(x.dtype), reference_points(shapes, x.device)[None, :, None]  # (1, S, d), (1, S, 1, 2)
        for layer in self.layers:
            x = layer(x, pos, ref, shapes)
        parts = x.split([h * w for h, w in shapes], dim=1)
        refined = [p.transpose(1, 2).reshape(B, d, h, w) for p, (h, w) in zip(parts, shapes, strict=True)]
        y = self.lateral(f1)
        y = y + F.interpolate(refined[0], size=y.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_features(self.output(y)), refined[::-1]  # (B, d, H/4, W/4); coarsest first


class DecoderLayer(nn.Module):
    """Masked cross-attention, self-attention, FFN; each residual then LayerNorm (Mask2Former's post-norm layers)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, q: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor, attn_mask: Tensor) -> Tensor:
        q = self.norms[0](q + self.cross(q + query_pos, memory + pos, memory, attn_mask=attn_mask)[0])
        qk = q + query_pos
        q = self.norms[1](q + self.self_attn(qk, qk, q)[0])
        return self.norms[2](q + self.ffn(q))


class TransformerDecoder(nn.Module):
    """Mask2Former's multi-scale masked-attention decoder with its class and mask prediction heads."""

    def __init__(self, cfg: Mask2FormerConfig) -> None:
        super().__init__()
        d, self.num_heads = cfg.hidden_dim, cfg.num_heads
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_pos = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(3, d)
        self.layers = nn.ModuleList(DecoderLayer(d, cfg.num_heads, cfg.ffn_dim) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(d)
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d),
                                        nn.ReLU(inplace=True), nn.Linear(d, d))  # fmt: skip

    def predict(self, q: Tensor, mask_features: Tensor, next_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Class logits (B, N, C + 1), mask logits (B, N, H/4, W/4), and the next layer's attention mask
        (B heads, N, h w): True where the mask, resized to the next level, has probability below 0.5."""
        q = self.norm(q)
        logits = self.class_embed(q)
        masks = torch.einsum("bnc,bchw->bnhw", self.mask_embed(q), mask_features)
        small = F.interpolate(masks, size=next_size, mode="bilinear", align_corners=False)
        blocked = (small.sigmoid() < 0.5).flatten(2).detach()  # (B, N, h w)
        blocked[blocked.all(dim=-1)] = False  # an empty mask would block the whole row: attend everywhere instead
        return logits, masks, blocked.repeat_interleave(self.num_heads, dim=0)

    def forward(self, mask_features: Tensor, levels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Mask features (B, d, H/4, W/4) and the [1/32, 1/16, 1/8] maps -> (class logits, mask logits) of the
        initial queries and of every layer, last = the output."""
        B = mask_features.shape[0]
        memories, positions = [], []
        for i, m in enumerate(levels):
            positions.append(sine_position(tuple(m.shape[-2:]), m.shape[1], m.device)[None].to(m.dtype))  # (1, hw, d)
            memories.append(m.flatten(2).transpose(1, 2) + self.level_embed.weight[i])  # (B, h w, d)
        sizes = [tuple(m.shape[-2:]) for m in levels]
        q = self.query_feat.weight[None].expand(B, -1, -1)  # (B, N, d)
        query_pos = self.query_pos.weight[None].expand(B, -1, -1)
        logits, masks, blocked = self.predict(q, mask_features, sizes[0])
        outputs = [(logits, masks)]
        for i, layer in enumerate(self.layers):
            level = i % len(levels)
            q = layer(q, query_pos, memories[level], positions[level], blocked)
            logits, masks, blocked = self.predict(q, mask_features, sizes[(i + 1) % len(levels)])
            outputs.append((logits, masks))
        return outputs


class Mask2Former(nn.Module):
    """ViT-Adapter pyramid -> pixel decoder -> masked-attention decoder: a list of (class logits, mask logits), one
    per decoder stage, the last being the prediction."""

    def __init__(self, adapter: nn.Module, cfg: Mask2FormerConfig) -> None:
        super().__init__()
        self.adapter = adapter
        self.pixel_decoder = PixelDecoder(int(adapter.embed_dim), cfg)
        self.decoder = TransformerDecoder(cfg)

    def forward(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        mask_features, levels = self.pixel_decoder(self.adapter(images))
        return self.decoder(mask_features, levels)


def semantic_probs(logits: Tensor, masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask2Former's semantic inference: (B, N, C + 1) class logits and (B, N, h, w) mask logits -> (B, C, H, W)
    scores sum_q p_q(c) sigmoid(m_q), masks upsampled bilinearly to `size` first."""
    masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    return torch.einsum("bnc,bnhw->bchw", logits.softmax(dim=-1)[..., :-1], masks.sigmoid())

"""From-scratch conditional UNet that predicts ε for 4-channel SD-VAE latents.

Layout (``L = layers_per_block``, ``h = h_dim``):

* down:   conv-in (in→h); L × (res + attn) at h; stride-2 conv; L × res at 2h
* middle: res – attn – res at 2h
* up:     (L + 1) × res at 2h, nearest ×2 + conv; (L + 1) × (res + attn) at h,
          each up block concatenating one skip saved on the way down
* out:    GroupNorm, SiLU, conv3×3 (h→out)

Attention blocks are spatial transformers (self-attention, cross-attention to
the text context, GEGLU feed-forward) running on ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

__all__ = [
    "UNetConfig",
    "EmojiUNet",
    "timestep_embedding",
    "ResBlock",
    "AttentionBlock",
    "count_parameters",
]


class UNetConfig(BaseModel):
    """Shape of an :class:`EmojiUNet`; stored in checkpoints via :meth:`to_dict`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channels: int = Field(4, ge=1)
    out_channels: int = Field(4, ge=1)
    h_dim: int = Field(256, ge=1)
    n_heads: int = Field(8, ge=1)
    context_dim: int = Field(512, ge=1)
    time_embed_dim: int = Field(320, ge=2)
    time_mlp_dim: int = Field(1280, ge=1)
    groups: int = Field(32, ge=1)
    layers_per_block: int = Field(2, ge=1)
    ff_mult: int = Field(4, ge=1)
    norm_eps: float = Field(1e-5, gt=0)
    zero_init_out: bool = True

    @model_validator(mode="after")
    def _check_divisibility(self) -> "UNetConfig":
        if self.h_dim % self.n_heads:
            raise ValueError(f"h_dim ({self.h_dim}) must be divisible by n_heads ({self.n_heads})")
        if self.h_dim % self.groups:
            raise ValueError(f"h_dim ({self.h_dim}) must be divisible by groups ({self.groups})")
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim ({self.time_embed_dim}) must be even")
        return self

    @classmethod
    def seed(cls, **overrides: Any) -> "UNetConfig":
        """The seed project's size: h_dim 256, 8 heads, CLIP ViT-B/32 context (512)."""
        return cls(**{"h_dim": 256, "n_heads": 8, "groups": 32, "context_dim": 512, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> "UNetConfig":
        """A CPU-sized model: h_dim 64, 4 heads, 16 groups."""
        return cls(**{"h_dim": 64, "n_heads": 4, "groups": 16, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        return cls.model_validate(data)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of (B,) timesteps (int or float) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv, add projected time embedding, GroupNorm–SiLU–conv, skip."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip: nn.Module = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head attention; keys/values come from ``context`` when given (cross-attention)."""

    def __init__(self, dim: int, n_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        kv_dim = dim if context_dim is None else context_dim
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, n, c = x.shape
        kv = x if context is None else context
        q = self.to_q(x).view(b, n, self.n_heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(kv).view(b, kv.shape[1], self.n_heads, -1).transpose(1, 2)  # (B, heads, T, d)
        v = self.to_v(kv).view(b, kv.shape[1], self.n_heads, -1).transpose(1, 2)  # (B, heads, T, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Feed-forward ``Linear(C→2·m·C)``, split, ``x * gelu(gate)``, ``Linear(m·C→C)``."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, m·C) each
        return self.out(h * F.gelu(gate))


class AttentionBlock(nn.Module):
    """Spatial transformer: norm + 1×1 in, self-attn, cross-attn, GEGLU, 1×1 out, residual."""

    def __init__(
        self, dim: int, n_heads: int, context_dim: int, groups: int, ff_mult: int, eps: float
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=eps)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, n_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, ff_mult)
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, H·W, C)
        h = h + self.self_attn(self.norm1(h))
        h = h + self.cross_attn(self.norm2(h), context, attn_mask)
        h = h + self.ff(self.norm3(h))
        h = h.transpose(1, 2).reshape(b, c, hgt, wid)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 conv3×3."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then conv3×3."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """One residual block, optionally followed by an attention block."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.res(x, temb)
        if self.attn is not None:
            x = self.attn(x, context, attn_mask)
        return x


def _context_attn_mask(context_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """(B, T) 1/0 tokenizer mask → bool SDPA mask (B, 1, 1, T), True = attend.

    A row with no kept token falls back to attending every token, so SDPA never
    sees an all-masked row (which would give NaN).
    """
    if context_mask is None:
        return None
    if context_mask.shape != (batch, length):
        raise ValueError(
            f"context_mask must have shape (B, T) = {(batch, length)}, got {tuple(context_mask.shape)}"
        )
    keep = context_mask.bool()
    empty = ~keep.any(dim=1, keepdim=True)  # (B, 1)
    keep = keep | empty
    return keep[:, None, None, :]  # (B, 1, 1, T)


class EmojiUNet(nn.Module):
    """Conditional UNet ε(x_t, t, context) for latents whose H and W are even."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        h, h2 = c.h_dim, 2 * c.h_dim
        t_dim, g, eps = c.time_mlp_dim, c.groups, c.norm_eps

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, t_dim, g, eps)

        def attn(dim: int) -> AttentionBlock:
            return AttentionBlock(dim, c.n_heads, c.context_dim, g, c.ff_mult, eps)

        self.time_mlp = nn.Sequential(
            nn.Linear(c.time_embed_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim)
        )
        self.conv_in = nn.Conv2d(c.in_channels, h, 3, padding=1)

        skip_ch = [h]
        self.down0 = nn.ModuleList()
        for _ in range(c.layers_per_block):
            self.down0.append(_Stage(res(h, h), attn(h)))
            skip_ch.append(h)
        self.downsample = Downsample(h)
        skip_ch.append(h)
        self.down1 = nn.ModuleList()
        ch = h
        for _ in range(c.layers_per_block):
            self.down1.append(_Stage(res(ch, h2), None))
            ch = h2
            skip_ch.append(h2)

        self.mid_res1 = res(h2, h2)
        self.mid_attn = attn(h2)
        self.mid_res2 = res(h2, h2)

        self.up1 = nn.ModuleList()
        for _ in range(c.layers_per_block + 1):
            self.up1.append(_Stage(res(ch + skip_ch.pop(), h2), None))
            ch = h2
        self.upsample = Upsample(h2)
        self.up0 = nn.ModuleList()
        for _ in range(c.layers_per_block + 1):
            self.up0.append(_Stage(res(ch + skip_ch.pop(), h), attn(h)))
            ch = h

        self.norm_out = nn.GroupNorm(g, h, eps=eps)
        self.conv_out = nn.Conv2d(h, c.out_channels, 3, padding=1)
        if c.zero_init_out:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ε.

        x: (B, C_in, H, W) with H, W even; t: (B,) or scalar timesteps (int or float);
        context: (B, T, context_dim); context_mask: optional (B, T) with 1 = real token.
        """
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, hgt, wid = x.shape
        if hgt % 2 or wid % 2:
            raise ValueError(f"spatial size must be divisible by 2 (one downsample), got {hgt}×{wid}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.context_dim:
            raise ValueError(
                f"context must be (B={b}, T, {c.context_dim}), got {tuple(context.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape ({b},), got {tuple(t.shape)}")

        attn_mask = _context_attn_mask(context_mask, b, context.shape[1])
        context = context.to(x.dtype)
        temb = self.time_mlp(timestep_embedding(t, c.time_embed_dim).to(x.dtype))  # (B, 1280)

        hs = self.conv_in(x)  # (B, h, H, W)
        skips = [hs]
        for stage in self.down0:
            hs = stage(hs, temb, context, attn_mask)
            skips.append(hs)
        hs = self.downsample(hs)  # (B, h, H/2, W/2)
        skips.append(hs)
        for stage in self.down1:
            hs = stage(hs, temb, context, attn_mask)  # (B, 2h, H/2, W/2)
            skips.append(hs)

        hs = self.mid_res1(hs, temb)
        hs = self.mid_attn(hs, context, attn_mask)
        hs = self.mid_res2(hs, temb)

        for stage in self.up1:
            hs = stage(torch.cat([hs, skips.pop()], dim=1), temb, context, attn_mask)
        hs = self.upsample(hs)  # (B, 2h, H, W)
        for stage in self.up0:
            hs = stage(torch.cat([hs, skips.pop()], dim=1), temb, context, attn_mask)  # (B, h, H, W)

        return self.conv_out(F.silu(self.norm_out(hs)))  # (B, C_out, H, W)

    def to_dict(self) -> dict[str, Any]:
        """The model's config as a plain dict (store it next to the weights)."""
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmojiUNet":
        """Build an (untrained) model from a :meth:`to_dict` result."""
        return cls(UNetConfig.from_dict(data))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

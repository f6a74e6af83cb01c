"""The ADM UNet of openai/guided-diffusion ("Diffusion Models Beat GANs"), the pixel-space denoiser GrIDPure
and DiffPure purify with.

The module tree follows the published checkpoints key for key (a state dict
such as ``256x256_diffusion_uncond.pt`` loads unchanged), and
:func:`infer_config` reads the architecture from the weights' shapes. What the
shapes cannot tell is a parameter: the attention head width (64 in every
public unconditional release). Only what those releases use is built:
legacy qkv attention order (heads split before q/k/v), scale-shift norm or
additive time embedding, residual or convolutional up/down-sampling, no
class conditioning.

Example:
    >>> unet = ADMUNet(ADM_256_UNCOND)                 # 552,814,086 parameters
    >>> out = unet(x, t)                               # x (B, 3, H, W) in [-1, 1], t (B,) -> (B, 6, H, W)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

NORM_GROUPS = 32


@dataclass(frozen=True)
class ADMConfig:
    """Architecture of an ADM UNet, in guided-diffusion's terms.

    Attributes:
        model_channels: base width (guided-diffusion's ``num_channels``).
        channel_mult: width multiplier per resolution level (level ``l`` works at ``1 / 2**l`` of the image).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_ds: down-sampling rates with self-attention (256 px with attention at 32, 16, 8 px: 8, 16, 32).
        num_head_channels: channels per attention head; ``-1`` to use ``num_heads`` heads instead.
        num_heads: heads per attention block when ``num_head_channels == -1``.
        use_scale_shift_norm: time embedding as a FiLM scale and shift after the norm (else added).
        resblock_updown: residual blocks for up/down-sampling (else a strided / nearest+conv layer).
        in_channels: image channels.
        out_channels: ``in_channels`` (ε only) or ``2 * in_channels`` (ε and the learned variance).
        norm_groups: group-norm groups (guided-diffusion: 32); fewer lets a small model use fewer channels.
    """

    model_channels: int = 256
    channel_mult: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (8, 16, 32)
    num_head_channels: int = 64
    num_heads: int = 1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    in_channels: int = 3
    out_channels: int = 6
    norm_groups: int = NORM_GROUPS

    @property
    def learn_sigma(self) -> bool:
        """The model predicts the variance interpolation alongside ε."""
        return self.out_channels == 2 * self.in_channels

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.channel_mult) - 1)

    def level_channels(self) -> list[int]:
        return [int(m * self.model_channels) for m in self.channel_mult]


#: ``256x256_diffusion_uncond.pt`` (also the LSUN bedroom/cat/horse releases)
ADM_256_UNCOND = ADMConfig()


# --- blocks -----------------------------------------------------------------------------------------------------

class GroupNorm32(nn.GroupNorm):
    """Group norm (32 groups unless told), computed in float32 whatever the weights' dtype."""

    def __init__(self, channels: int, groups: int = NORM_GROUPS):
        super().__init__(groups, channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``(B, dim)`` of (possibly fractional) timesteps ``t (B,)``: cosines, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """Norm-SiLU-conv twice with the time embedding in between; optionally halves or doubles the resolution."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 scale_shift: bool = True, resample: str | None = None, groups: int = NORM_GROUPS):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift, self.resample = scale_shift, resample
        self.in_layers = nn.Sequential(GroupNorm32(channels, groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels, groups), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
        # resampling sits between the activation and the conv, on both paths
        h = conv(self._resample(norm_act(x)))
        x = self._resample(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions, with guided-diffusion's legacy qkv layout.

    The 1x1 ``qkv`` projection's ``3C`` output channels are laid out head by
    head, each head holding its own ``[q; k; v]`` (the "legacy" order the
    released checkpoints were trained with).
    """

    def __init__(self, channels: int, heads: int, groups: int = NORM_GROUPS):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))                                  # (B, heads * 3 * ch, T)
        q, k, v = qkv.reshape(b * self.heads, 3 * (c // self.heads), -1).transpose(1, 2).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)                   # (B * heads, T, ch)
        h = h.transpose(1, 2).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (ADM without ``resblock_updown``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling then a 3x3 conv (ADM without ``resblock_updown``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A stage of layers; residual blocks also get the time embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# --- the UNet ---------------------------------------------------------------------------------------------------

class ADMUNet(nn.Module):
    """The ADM UNet: ``(x (B, C, H, W), t (B,)) -> (B, out_channels, H, W)``; H, W multiples of
    ``config.size_multiple``.

    ``gradient_checkpointing = True`` recomputes each stage in the backward pass
    instead of keeping its activations (for attacks through the model).
    """

    def __init__(self, config: ADMConfig = ADM_256_UNCOND):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False
        emb_ch = 4 * cfg.model_channels
        chans = cfg.level_channels()

        def res(c_in, c_out=None, resample=None):
            return ResBlock(c_in, emb_ch, c_out, cfg.use_scale_shift_norm, resample, cfg.norm_groups)

        def attn(c):
            if cfg.num_head_channels == -1:
                heads = cfg.num_heads
            elif c % cfg.num_head_channels:
                raise ValueError(f"num_head_channels: {cfg.num_head_channels} does not divide the {c} channels of "
                                 "an attention block; give the head width the checkpoint was trained with")
            else:
                heads = c // cfg.num_head_channels
            return AttentionBlock(c, heads, cfg.norm_groups)

        self.time_embed = nn.Sequential(nn.Linear(cfg.model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        ch = chans[0]
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skips = [ch]
        for level, level_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, level_ch)]
                ch = level_ch
                if 2 ** level in cfg.attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skips.append(ch)
            if level < len(chans) - 1:
                down = res(ch, resample="down") if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepSequential(down))
                skips.append(ch)
        self.middle_block = TimestepSequential(res(ch), attn(ch), res(ch))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(chans))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), chans[level])]
                ch = chans[level]
                if 2 ** level in cfg.attention_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, resample="up") if cfg.resblock_updown else Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch, cfg.norm_groups), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def _run(self, block: TimestepSequential, h: Tensor, emb: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        m = self.config.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"x: height and width must be multiples of {m} for this ADM, got {tuple(x.shape[-2:])}")
        dtype = self.input_blocks[0][0].weight.dtype
        emb = self.time_embed(timestep_embedding(t.to(x.device), self.config.model_channels).to(dtype))
        h, skips = x.to(dtype), []
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], 1), emb)
        return self.out(h).to(x.dtype)


# --- the architecture from a state dict -------------------------------------------------------------------------

_SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
_ADM_KEYS = ("time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.1.qkv.weight", "out.2.weight")


def check_adm_state_dict(sd: Mapping[str, Tensor], name: str = "checkpoint") -> None:
    """Raise a ``ValueError`` naming ``name`` and what the file looks like when ``sd`` is not an ADM UNet."""
    keys = list(sd)
    if any(k.startswith(_SD_PREFIXES) for k in keys):
        raise ValueError(f"{name}: this is a Stable Diffusion (latent) checkpoint, not a pixel-space ADM; load it "
                         "with Load Checkpoint, and give this loader a guided-diffusion model such as "
                         "256x256_diffusion_uncond.pt")
    if any(".transformer_blocks." in k for k in keys) or (
            "input_blocks.0.0.weight" in sd and sd["input_blocks.0.0.weight"].shape[1] != 3):
        raise ValueError(f"{name}: this is a latent diffusion UNet (text cross-attention or non-RGB input), not a "
                         "pixel-space ADM; load it with Load Diffusion Model, and give this loader a "
                         "guided-diffusion model such as 256x256_diffusion_uncond.pt")
    missing = [k for k in _ADM_KEYS if k not in sd]
    if missing:
        raise ValueError(f"{name}: not a guided-diffusion ADM state dict (no {', '.join(missing)}); expected the "
                         "weights of e.g. 256x256_diffusion_uncond.pt, saved as a plain state dict")
    if "label_emb.weight" in sd:
        raise ValueError(f"{name}: a class-conditional ADM (label_emb) is not supported; use an unconditional "
                         "model such as 256x256_diffusion_uncond.pt")


def _block_count(sd: Mapping[str, Tensor], prefix: str) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(prefix))


def _has_resample_layer(sd: Mapping[str, Tensor], j: int) -> bool:
    """Output block ``j`` ends in an up-sampling layer (a conv, or a residual block after the first layer)."""
    return any(k.startswith(f"output_blocks.{j}.") and k.split(".")[2] != "0"
               and (k.endswith("conv.weight") or ".in_layers." in k) for k in sd)


def infer_config(sd: Mapping[str, Tensor], num_head_channels: int = 64, num_heads: int = 1,
                 name: str = "checkpoint") -> ADMConfig:
    """The :class:`ADMConfig` of an ADM state dict, read from its keys and shapes.

    Args:
        sd: the state dict, unprefixed (as guided-diffusion saves it).
        num_head_channels: attention head width, which the weights do not record (64 for every public
            unconditional guided-diffusion release); ``-1`` to use ``num_heads``.
        num_heads: heads per attention block when ``num_head_channels == -1``.
        name: the input named in errors.

    Raises:
        ValueError: naming ``name``, when ``sd`` is not an ADM UNet of a supported layout.
    """
    check_adm_state_dict(sd, name)
    mc = sd["time_embed.0.weight"].shape[1]
    n_in, n_out = _block_count(sd, "input_blocks."), _block_count(sd, "output_blocks.")
    ups = [j for j in range(n_out) if _has_resample_layer(sd, j)]
    levels = len(ups) + 1
    per_level = n_out // levels  # num_res_blocks + 1 output blocks per level
    if n_out % levels or per_level < 2 or n_in != n_out or ups != [(k + 1) * per_level - 1 for k in range(levels - 1)]:
        raise ValueError(f"{name}: the ADM block layout is not one this loader knows ({n_in} input blocks, "
                         f"{n_out} output blocks, up-sampling in blocks {ups})")
    first = [1 + level * per_level for level in range(levels)]  # the first residual block of each level
    chans = [sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first]
    emb_out = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    return ADMConfig(
        model_channels=mc,
        channel_mult=tuple(c // mc if c % mc == 0 else c / mc for c in chans),
        num_res_blocks=per_level - 1,
        attention_ds=tuple(2 ** level for level, i in enumerate(first) if f"input_blocks.{i}.1.qkv.weight" in sd),
        num_head_channels=num_head_channels,
        num_heads=num_heads,
        use_scale_shift_norm=emb_out == 2 * chans[0],
        resblock_updown=levels > 1 and f"input_blocks.{per_level}.0.in_layers.0.weight" in sd,
        in_channels=sd["input_blocks.0.0.weight"].shape[1],
        out_channels=sd["out.2.weight"].shape[0],
    )


def adm_from_state_dict(sd: Mapping[str, Tensor], num_head_channels: int = 64, num_heads: int = 1,
                        name: str = "checkpoint") -> ADMUNet:
    """Build the ADM that ``sd`` describes (:func:`infer_config`) and load ``sd`` into it, strictly.

    The weights are taken over without a copy (``assign``), in their stored
    dtype; the model is in eval mode with gradients off.
    """
    cfg = infer_config(sd, num_head_channels, num_heads, name)
    with torch.device("meta"):
        unet = ADMUNet(cfg)
    result = unet.load_state_dict(dict(sd), strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{name}: the weights do not match the ADM read from their shapes "
                         f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    return unet.eval().requires_grad_(False)

"""The testbed's purifier: a small ADM (the core's guided-diffusion architecture) trained here as a pixel DDPM.

It plays the part of OpenAI's 256-px unconditional ADM at 1/8 scale: the
subjects are 64 px (GrIDPure's 512), the model is trained on 32-px crops
(256), so GrIDPure runs it on 32-px windows at stride 16 with the packed
corners, exactly as at full scale, and GrIDPure's DiffPure baseline resizes
64 → 32 → 64.

Training is guided-diffusion's: 1000-step linear schedule, ε-prediction with
the learned variance (L_simple + 0.001 · L_vlb, the variance trained through
the KL term only, as in improved DDPM), uniform timesteps, EMA weights.
Timesteps are drawn from ``[0, t_max)`` only: every use of the purifier
(GrIDPure t* = 10, DiffPure t* = 100, AntiPure's t ≤ t^p and t_err ≤ 2 t^p)
lies below ``t_max = 200``, and a CPU budget is better spent there. The
crops are augmented (90° rotations, colour-channel permutations) so that
the few training photos cover more of what the subjects look like.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from antipure_core.adm import ADMConfig, ADMUNet
from antipure_core.diffusion import gather, predict_x0, q_sample, randn_like
from antipure_core.pixel_diffusion import PixelDiffusion

from .data import training_crops
from .weights import load_cached, save_cached, weights_path

#: 8 channels at 32 px, 16 at 16 px, 32 at 8 px (attention there), learned variance: 0.18 M parameters
ADM_CONFIG = ADMConfig(model_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, attention_ds=(4,),
                       num_head_channels=32, resblock_updown=False, norm_groups=4)


@dataclass(frozen=True)
class PurifierConfig:
    size: int = 32
    steps: int = 3000
    batch: int = 32
    lr: float = 2e-3
    ema: float = 0.995
    t_max: int = 200
    vlb_weight: float = 1e-3
    #: crops drawn once and cycled (with flips); more than the steps touch, so little repeats
    crops: int = 8192
    model_channels: int = ADM_CONFIG.model_channels
    seed: int = 0
    # Fixed in v2: class attributes, not fields, so v2's config key (and its committed weights) stay as they
    # were; :class:`CalibratedPurifierConfig` makes them fields.
    channel_mult = ADM_CONFIG.channel_mult
    num_res_blocks = ADM_CONFIG.num_res_blocks
    #: permute the colour channels of training crops
    colour_permute = True
    #: this share of the timesteps is drawn from ``[0, low_t)`` (the rest from ``[0, t_max)``)
    low_t_share = 0.0
    low_t = 0
    #: weight of the low-frequency ε error (see :func:`diffusion_loss`)
    lowfreq_weight = 0.0
    data_scale = 1.0

    def adm(self) -> ADMConfig:
        return replace(ADM_CONFIG, model_channels=self.model_channels, channel_mult=tuple(self.channel_mult),
                       num_res_blocks=self.num_res_blocks)

    def timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``(n,)`` training timesteps: uniform on ``[0, t_max)``, a ``low_t_share`` of them on ``[0, low_t)``."""
        t = torch.randint(self.t_max, (n,), generator=g)
        if not self.low_t_share:
            return t
        low = torch.rand(n, generator=g) < self.low_t_share
        return torch.where(low, torch.randint(self.low_t, (n,), generator=g), t)


@dataclass(frozen=True)
class CalibratedPurifierConfig(PurifierConfig):
    """Testbed v3's purifier: calibrated so that GrIDPure 2 × 20 leaves clean photos nearly unchanged.

    GrIDPure runs the model only at t ≤ t* − 1 = 9 and AntiPure attacks it at
    t ≤ 2 t^p = 20, so half the training timesteps are drawn below ``low_t``;
    no colour permutations; and the ε error of local means (4 and 8 px, and
    the whole crop) weighted up: plain ε-MSE weighs a crop's mean error by
    1/1024, so v2 learned a per-channel ε bias of ~0.05 at t < 10 that
    GrIDPure's 400 denoising steps add up to a colour drift of 15/255.
    """

    steps: int = 3000
    model_channels: int = 8
    channel_mult: tuple = ADM_CONFIG.channel_mult
    num_res_blocks: int = 1
    colour_permute: bool = False
    low_t_share: float = 0.5
    low_t: int = 20
    lowfreq_weight: float = 1.0
    #: training photos' scale (:func:`~.data.training_crops`): v3's subjects are rendered at this scale
    data_scale: float = 2.0


@dataclass(frozen=True)
class UnknownPurifierConfig(CalibratedPurifierConfig):
    """The purifier no method attacks: the calibrated recipe with another training seed (other weights)."""

    seed: int = 1


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2).square() * (-logvar2).exp())


def lowfreq_error(err):
    """``(B,)``: mean squared error of ``err``'s 4-px, 8-px and whole-image means, each scaled to a pixel's weight.

    Plain MSE weighs the mean of a k×k block by 1/k² of its pixels; this
    term gives each scale the weight of one pixel's error, so a bias that
    iterated purification accumulates (a local colour shift) costs as much as
    per-pixel noise. Its minimiser is still E[ε | x_t].
    """
    terms = [F.avg_pool2d(err, k).square().flatten(1).mean(1) * k * k for k in (4, 8)]
    terms.append(err.mean((2, 3)).square().mean(1) * err.shape[-1] * err.shape[-2])
    return sum(terms) / len(terms)


def diffusion_loss(model: PixelDiffusion, x0, t, noise, vlb_weight: float, lowfreq_weight: float = 0.0):
    """guided-diffusion's hybrid loss per sample: MSE(ε̂, ε) + ``vlb_weight`` · KL(q(x_{t−1}|x_t,x_0) ‖ p) (t ≥ 1).

    The KL sees ε̂ detached, so only the variance channels learn from it (improved DDPM's L_hybrid).
    ``lowfreq_weight`` adds :func:`lowfreq_error` of ε̂ − ε (testbed v3). Returns (loss, ε-MSE).
    """
    x_t = q_sample(model, x0, t, noise)
    out = model.unet_output(x_t, t)
    eps, var_values = out[:, :3], out[:, 3:]
    mse = (eps - noise).square().flatten(1).mean(1)
    log_var = model.log_variance(var_values, t, x_t)
    pred_mean = model.posterior_mean(predict_x0(model, x_t, t, eps.detach()).clamp(-1, 1), x_t, t)
    true_mean = model.posterior_mean(x0, x_t, t)
    true_logvar = gather(model.posterior_log_variance_clipped, t, x_t)
    kl = _normal_kl(true_mean, true_logvar, pred_mean, log_var).flatten(1).mean(1) / 0.6931471805599453
    kl = torch.where(t > 0, kl, torch.zeros_like(kl))  # t = 0 is the decoder term; ε-MSE covers it here
    loss = mse + vlb_weight * kl
    if lowfreq_weight:
        loss = loss + lowfreq_weight * lowfreq_error(eps - noise)
    return loss, mse


def augment(x, g: torch.Generator, colour_permute: bool = True):
    """Random flips, 90° rotations and (with ``colour_permute``) colour-channel permutations, one draw per image."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        k, flip, perm = int(torch.randint(4, (1,), generator=g)), bool(torch.rand(1, generator=g) < 0.5), \
            torch.randperm(3, generator=g)
        y = torch.rot90(x[i], k, (1, 2))
        out[i] = (y.flip(-1) if flip else y)[perm if colour_permute else slice(None)]
    return out


def train_purifier(cfg: PurifierConfig, verbose: bool = True) -> tuple[PixelDiffusion, dict]:
    torch.manual_seed(cfg.seed)
    model = PixelDiffusion(ADMUNet(cfg.adm()))
    g = torch.Generator().manual_seed(cfg.seed)
    data, _ = training_crops(cfg.crops, cfg.size, generator=torch.Generator().manual_seed(cfg.seed + 7),
                             scale=cfg.data_scale)
    data = data * 2 - 1
    opt = torch.optim.AdamW(model.unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    ema = copy.deepcopy(model.unet).requires_grad_(False)
    model.unet.train()
    running, t0 = None, time.perf_counter()
    for i in range(cfg.steps):
        idx = torch.randint(data.shape[0], (cfg.batch,), generator=g)
        x0 = augment(data[idx], g, cfg.colour_permute)
        t = cfg.timesteps(cfg.batch, g)
        loss, mse = diffusion_loss(model, x0, t, randn_like(x0, g), cfg.vlb_weight, cfg.lowfreq_weight)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.unet.parameters()):
                e.lerp_(p, 1 - cfg.ema)
        running = mse.mean().item() if running is None else 0.98 * running + 0.02 * mse.mean().item()
        if verbose and (i % 250 == 0 or i == cfg.steps - 1):
            print(f"  purifier step {i:5d}  eps-mse(ema) {running:.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    model.unet = ema.eval()
    return model.eval().requires_grad_(False), {"eps_mse": round(running, 5),
                                                "seconds": round(time.perf_counter() - t0, 1)}


def denoise_psnr(model: PixelDiffusion, t: int = 9, n: int = 64, seed: int = 1, scale: float = 1.0) -> dict[str, float]:
    """PSNR (dB) of the one-step x̂₀ and of the noisy input at timestep index ``t`` on fresh training-pool crops."""
    x, _ = training_crops(n, 32, generator=torch.Generator().manual_seed(10_000 + seed), scale=scale)
    g = torch.Generator().manual_seed(seed)
    z = x * 2 - 1
    tt = torch.full((n,), t)
    with torch.no_grad():
        z_t = q_sample(model, z, tt, randn_like(z, g))
        x0 = predict_x0(model, z_t, tt, model.predict_noise(z_t, tt)).clamp(-1, 1)
    psnr = lambda z: round(float(-10 * torch.log10(F.mse_loss((z + 1) / 2, x))), 2)  # noqa: E731
    return {"denoised_db": psnr(x0), "noisy_db": psnr(z_t / gather(model.alphas_cumprod, tt, z_t).sqrt())}


def build_purifier(cfg: PurifierConfig, cache_dir: Path | str | None, verbose: bool = True,
                   force: bool = False) -> tuple[PixelDiffusion, dict]:
    """The trained purifier (frozen, eval mode) and its training info; trains and caches on first use."""
    path = weights_path(cache_dir, f"purifier-adm-{cfg.size}px", cfg)
    model = PixelDiffusion(ADMUNet(cfg.adm()))
    info = None if force else load_cached(model.unet, path)
    if info is not None:
        if verbose:
            print(f"loaded cached purifier {path.name}", flush=True)
        return model.eval().requires_grad_(False), info
    if verbose:
        n = sum(p.numel() for p in model.unet.parameters())
        print(f"training the pixel purifier (ADM, {n / 1e6:.2f} M parameters) at {cfg.size} px", flush=True)
    model, info = train_purifier(cfg, verbose)
    info["psnr_at_t10"] = denoise_psnr(model, scale=cfg.data_scale)
    info["config"] = asdict(cfg)
    save_cached(model.unet, info, path)
    info["cached"] = False
    return model, info

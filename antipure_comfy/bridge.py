"""The core's :class:`DiffusionModel` on the host's MODEL, VAE and CONDITIONING, differentiable inside a node.

The host runs every node under ``torch.inference_mode()`` and its loaders make
inference tensors, which autograd refuses to save for backward. :func:`session`
leaves inference mode, loads the models through the host's memory management,
swaps every inference parameter/buffer of the UNet model and the VAE for a
plain tensor aliasing the same memory (no copy, ``requires_grad=False``), and
puts the originals back afterwards, so other nodes see exactly the objects
they saw before. Gradients then flow from the latents/images through the VAE encoder,
the UNet and the VAE decoder, and never into the weights.

Noise prediction goes through the host's own sampling code: the core's VP
latent ``z_t = sqrt(abar) z0 + sqrt(1 - abar) eps`` is the host's k-diffusion
input ``x = z_t / sqrt(abar)`` at ``sigma = model_sampling.sigma(t)``;
``comfy.samplers.calc_cond_batch`` (conditioning preparation, SDXL's ``y``,
strengths, areas, masks, timestep ranges, model patches and wrappers) returns
the denoised ``x0`` and ``eps = (x - x0) / sigma``. The prediction type
(ε or v) is the host's business, so both share one path.

Example (inside a node's ``execute``)::

    with session(model, vae, positive) as dm:
        z0 = dm.encode(x)                                  # (B, 3, H, W) in [0, 1] -> (B, 4, H/8, W/8)
        eps_hat = dm.predict_noise(z_t, t, dm.cond)        # t: (B,) integer timesteps
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor

from .comfy_host import latent_formats, model_base, model_management, model_patcher, model_sampling
from .comfy_host import openaimodel, sampler_helpers, samplers

SUPPORTED = "SD1.x, SD2.x and SDXL"
_LATENT_FORMATS = (latent_formats.SD15, latent_formats.SDXL)
# judged on the model sampling in use (a ModelSampling* node may have patched it), not on model.model_type
_DENOISERS = (model_sampling.EPS.calculate_denoised, model_sampling.V_PREDICTION.calculate_denoised)
# conditioning features that need models or state this bridge does not load
_UNSUPPORTED_COND_KEYS = ("control", "gligen", "hooks")


def check_supported(model: Any) -> None:
    """Raise when ``model`` (the host's MODEL) is not an SD1.x / SD2.x / SDXL ε- or v-model.

    Raises:
        TypeError: ``model`` is not a host MODEL (ModelPatcher).
        ValueError: the family, prediction type, schedule or input channels cannot work;
            the message names the supported families.
    """
    if not isinstance(model, model_patcher.ModelPatcher) or not isinstance(model.model, model_base.BaseModel):
        raise TypeError(f"model: expected the host's MODEL (from a checkpoint loader), got {type(model).__name__}")
    base = model.model
    family = type(base.model_config).__name__
    sampling = model.get_model_object("model_sampling")
    latent = model.get_model_object("latent_format")
    why = None
    if type(latent) not in _LATENT_FORMATS:
        why = f"its latent format is {type(latent).__name__}"
    elif not isinstance(sampling, model_sampling.ModelSamplingDiscrete) \
            or type(sampling).calculate_denoised not in _DENOISERS:
        kinds = " + ".join(k.__name__ for k in type(sampling).__bases__)
        why = (f"it samples with {kinds} (model type {base.model_type.name}); "
               "only ε or v prediction on a discrete schedule works")
    elif base.model_config.unet_config.get("in_channels", 4) != 4:
        why = "its UNet takes extra input channels (inpainting / instruct-pix2pix)"
    if why is not None:
        raise ValueError(f"model: AntiPure supports {SUPPORTED} models (ε or v prediction); "
                         f"this {family} model cannot work: {why}. Load an SD1.x, SD2.x or SDXL checkpoint.")


def last_up_block_resblocks(unet) -> list[torch.nn.Module]:
    """The ``out_layers`` of the ResBlocks in the last up-block of the host's UNet (``openaimodel.UNetModel``):
    the final ``num_res_blocks[0] + 1`` output blocks, which work at the input resolution."""
    blocks = unet.output_blocks[-(unet.num_res_blocks[0] + 1):]
    found = [m.out_layers for b in blocks for m in b if isinstance(m, openaimodel.ResBlock)]
    if not found:
        raise ValueError(f"model: no ResBlock in the last up-block of this {type(unet).__name__}")
    return found


def check_vae(vae: Any) -> None:
    """Raise ``ValueError`` unless ``vae`` is the host's SD/SDXL VAE (4 latent channels, factor 8)."""
    ok = (hasattr(vae, "first_stage_model") and hasattr(vae, "patcher") and getattr(vae, "latent_dim", None) == 2
          and getattr(vae, "latent_channels", None) == 4 and getattr(vae, "downscale_ratio", None) == 8)
    if not ok:
        raise ValueError(f"vae: expected the {SUPPORTED} VAE (4 latent channels, 8x down-sampling) from the "
                         f"same checkpoint, got {type(vae).__name__} with {getattr(vae, 'latent_channels', '?')} "
                         f"latent channels")


def check_conditioning(cond: Any, name: str = "positive") -> None:
    """Raise ``ValueError`` unless ``cond`` is a host CONDITIONING this bridge can evaluate."""
    if not isinstance(cond, (list, tuple)) or len(cond) == 0 or not all(
            isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[0], Tensor) and isinstance(c[1], dict)
            for c in cond):
        raise ValueError(f"{name}: expected a CONDITIONING (a non-empty list of [tensor, dict], e.g. from "
                         f"CLIP Text Encode), got {type(cond).__name__}")
    for c in cond:
        bad = [k for k in _UNSUPPORTED_COND_KEYS if c[1].get(k) is not None]
        if bad:
            raise ValueError(f"{name}: conditioning with {', '.join(bad)} is not supported here; "
                             "pass the plain text conditioning")


def _plain(t: Any) -> Any:
    """A non-inference copy of an inference tensor (autograd cannot save those), else ``t``."""
    return t.clone() if isinstance(t, Tensor) and t.is_inference() else t


def alias(t: Tensor) -> Tensor:
    """A normal tensor on the same memory as inference tensor ``t``: autograd may save it, nothing is copied."""
    try:
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    except (RuntimeError, TypeError, NotImplementedError):  # exotic tensor types: fall back to a copy
        return t.clone()


def swap_in_plain_tensors(module: torch.nn.Module) -> list[tuple]:
    """Replace inference params/buffers by plain aliases and freeze all params; returns what to restore."""
    undo, aliases = [], {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if p.is_inference():  # its own flags stay as they are; only the alias is seen
                undo.append((mod._parameters, name, p, None))
                if id(p) not in aliases:  # keep tied weights tied
                    aliases[id(p)] = torch.nn.Parameter(alias(p), requires_grad=False)
                mod._parameters[name] = aliases[id(p)]
            else:
                undo.append((mod._parameters, name, p, p.requires_grad))
                p.requires_grad_(False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_inference():
                undo.append((mod._buffers, name, b, None))
                mod._buffers[name] = aliases.setdefault(id(b), alias(b))
    return undo


def restore(undo: list[tuple]) -> None:
    for table, name, original, requires_grad in reversed(undo):
        table[name] = original
        if requires_grad is not None:
            original.requires_grad_(requires_grad)


class HostDiffusionModel:
    """:class:`antipure_core.model.DiffusionModel` on a host MODEL + VAE; use it inside :func:`session`.

    Args:
        model: the host's MODEL (ModelPatcher) of an SD1.x / SD2.x / SDXL checkpoint.
        vae: the host's VAE.
        cond: the default CONDITIONING (``[[cross_attn, {"pooled_output": ..., ...}], ...]``),
            available as ``dm.cond``.
        model_options: the host's model options to sample with (default: the patcher's).

    All inputs and outputs are float32 on :attr:`device`, whatever the weights' dtype.
    """

    def __init__(self, model, vae, cond=None, model_options: dict | None = None):
        # built after the caller's boundary check (check_inputs): no second check here
        self.model, self.vae, self.cond = model, vae, cond
        self.model_options = model.model_options if model_options is None else model_options
        self.model_sampling = model.get_model_object("model_sampling")
        self.latent_format = model.get_model_object("latent_format")
        self.downsample = int(vae.downscale_ratio)
        sigmas = self.model_sampling.sigmas.detach().float()
        #: ``(T,)`` float32, ``1 / (1 + sigma_t^2)``: the schedule the host samples with
        self.alphas_cumprod = _plain(1.0 / (1.0 + sigmas ** 2)).to(self.device)
        self._prepared: dict = {}

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.model.load_device

    def encode(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` image in [0, 1] (H, W multiples of 8) -> scaled latent ``(B, 4, H/8, W/8)``.

        Runs the VAE encoder directly (not ``VAE.encode``, which crops, tiles and
        copies into a buffer) and takes the posterior mode.
        """
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(f"x: expected (B, 3, H, W) with H, W multiples of {self.downsample}, "
                             f"got {tuple(x.shape)}; pad first (antipure_core.image.pad_to_multiple)")
        vae = self.vae
        pixels = vae.process_input(_plain(x).to(vae.device, torch.float32)).to(vae.vae_dtype)
        z = vae.first_stage_model.encode(pixels).float()
        return self.latent_format.process_in(z).to(self.device)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent ``(B, 4, h, w)`` -> image ``(B, 3, 8h, 8w)``, roughly in [0, 1], not clamped.

        The host's ``process_output`` clamps (zero gradient outside [0, 1]), so
        the SD VAE's output map ``(y + 1) / 2`` is applied without the clamp.
        """
        if z.ndim != 4 or z.shape[1] != 4:
            raise ValueError(f"z: expected a (B, 4, h, w) latent, got {tuple(z.shape)}")
        vae = self.vae
        raw = self.latent_format.process_out(_plain(z).float()).to(vae.device, vae.vae_dtype)
        return ((vae.first_stage_model.decode(raw).float() + 1.0) / 2.0).to(self.device)

    def sigma(self, t: Tensor) -> Tensor:
        """The host's ``sigma`` for integer timesteps ``t`` ``(B,)``, float32 on :attr:`device`."""
        return self.model_sampling.sigma(t.to(self.model_sampling.sigmas.device)).float().to(self.device)

    def denoise(self, x: Tensor, sigma: Tensor, cond=None) -> Tensor:
        """The host's denoised ``x0`` for k-diffusion input ``x = z0 + sigma * eps`` ``(B, 4, h, w)``, ``sigma`` ``(B,)``."""
        conds = self._conds(self.cond if cond is None else cond, x.shape)
        return samplers.calc_cond_batch(self.model.model, [conds], x, sigma, self.model_options)[0]

    def predict_noise(self, z_t: Tensor, t: Tensor, cond=None) -> Tensor:
        """ε̂ for VP latents ``z_t`` ``(B, 4, h, w)`` at integer timesteps ``t`` ``(B,)`` (or one for all).

        ``cond`` is a host CONDITIONING (default: ``self.cond``), broadcast over the batch.
        """
        if z_t.ndim != 4 or z_t.shape[1] != 4:
            raise ValueError(f"z_t: expected a (B, 4, h, w) latent, got {tuple(z_t.shape)}")
        t = torch.as_tensor(t).reshape(-1)
        if t.numel() == 1:
            t = t.expand(z_t.shape[0])
        if t.shape[0] != z_t.shape[0] or t.is_floating_point():
            raise ValueError(f"t: expected {z_t.shape[0]} integer timesteps, got {tuple(t.shape)} {t.dtype}")
        sigma = self.sigma(t)
        s = sigma.view(-1, 1, 1, 1)
        x = _plain(z_t).to(self.device, torch.float32) * (1.0 + s ** 2).sqrt()  # z_t / sqrt(abar)
        return (x - self.denoise(x, sigma, cond)) / s

    def predict_noise_features(self, z_t: Tensor, t: Tensor, cond=None) -> tuple[Tensor, list[Tensor]]:
        """:meth:`predict_noise` and the residual-branch outputs ``out_layers`` (norm, SiLU, dropout, conv2)
        of the ResBlocks in the UNet's last up-block, the highest-resolution output level, with gradient.

        Read by forward hooks that exist only during this call. When the host splits the batch into
        several model calls, each ResBlock's pieces are joined back along the batch.
        """
        modules = last_up_block_resblocks(self.model.model.diffusion_model)
        seen: list[Tensor] = []
        hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out)) for m in modules]
        try:
            eps = self.predict_noise(z_t, t, cond)
        finally:
            for h in hooks:
                h.remove()
        n = len(modules)
        return eps, [torch.cat(seen[k::n]).float() for k in range(n)]

    def _conds(self, cond, shape) -> list[dict]:
        """CONDITIONING prepared by the host for latents of ``shape`` (cached per object and size)."""
        key = (id(cond), tuple(shape[2:]))
        hit = self._prepared.get(key)
        if hit is not None and hit[0] is cond:
            return hit[1]
        check_conditioning(cond, "cond")
        plain = [[_plain(c[0]), {k: _plain(v) for k, v in c[1].items()}] for c in cond]
        noise = torch.zeros((1, *shape[1:]), device=self.device)  # only its shape is read
        conds = samplers.process_conds(self.model.model, noise, {"positive": sampler_helpers.convert_cond(plain)},
                                       self.device)["positive"]
        if not any(c[0].requires_grad for c in cond):  # a trained text encoder's cond is new every step
            self._prepared[key] = (cond, conds)
        return conds


@contextlib.contextmanager
def session(model, vae, positive=None) -> Iterator[HostDiffusionModel]:
    """Differentiable access to ``model``/``vae`` while the block runs, even under the host's inference mode.

    Loads both fully through ``comfy.model_management.load_models_gpu``,
    swaps inference weights for frozen plain tensors on the same memory (no
    copy, so no extra weight memory), prepares the model options as the
    host's samplers do, and afterwards puts every original weight object and
    ``requires_grad`` flag back, also when the block raises.

    Args:
        model: host MODEL of an SD1.x / SD2.x / SDXL checkpoint (else ``ValueError``).
        vae: host VAE.
        positive: CONDITIONING, exposed as ``dm.cond`` and the default of ``predict_noise``.

    Yields:
        HostDiffusionModel: the core's model interface.
    """
    check_inputs(model, vae, positive)
    with open_session(model, vae, positive) as dm:
        yield dm


def check_inputs(model, vae, positive=None) -> None:
    """The bridge's boundary check, in one place: MODEL family, VAE and (if given) CONDITIONING."""
    check_supported(model)
    check_vae(vae)
    if positive is not None:
        check_conditioning(positive)


@contextlib.contextmanager
def open_session(model, vae, positive=None) -> Iterator[HostDiffusionModel]:
    """:func:`session` without its checks, for callers that ran :func:`check_inputs` at their own boundary."""
    with torch.inference_mode(False), torch.enable_grad():
        model_management.load_models_gpu([model, vae.patcher], force_full_load=True)
        undo = []
        try:
            undo += swap_in_plain_tensors(model.model)
            undo += swap_in_plain_tensors(vae.first_stage_model)
            options = model_patcher.create_model_options_clone(model.model_options)
            sampler_helpers.prepare_model_patcher(model, {}, options)
            samplers.cast_to_load_options(options, device=model.load_device, dtype=model.model_dtype())
            model.pre_run()
            try:
                yield HostDiffusionModel(model, vae, positive, model_options=options)
            finally:
                model.cleanup()
        finally:
            restore(undo)
            model_management.soft_empty_cache()

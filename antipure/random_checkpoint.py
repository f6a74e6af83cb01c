"""Random-weight SD1.x / SD2.x (v) / SDXL checkpoints that the host's normal loader accepts.

Used by the tests (tiny families), the plumbing demo (``demo``: a checkpoint the
plain host detects as SD1.5 with no registration) and the benchmarks.

The host detects a checkpoint's family from its UNet weight shapes and then
matches them against the configs in ``comfy.supported_models.models``. Real
families need ``model_channels`` 320 and full-depth text encoders; here each
family gets a test-only subclass of the host's own config with a small UNet,
registered at the front of that list (so the plain ``CheckpointLoaderSimple``
picks it), whose ``clip_target`` builds the family's text encoders with three
layers. Everything else is the host's: model classes, prediction type, latent
format, text encoder widths (768 / 1024 / 768+1280), tokenizers, pooled
outputs, key conversions (``process_*_state_dict_for_saving``) and the full SD
VAE (the loader cannot shrink it).

* SD1.x: ``model_channels`` 32, one level, one res block, one transformer
  block, ``context_dim`` 768, conv ``proj_in``; CLIP-L.
* SD2.x: 768-v style: ``context_dim`` 1024, linear ``proj_in``, OpenCLIP-H
  (penultimate layer, projected pooled output). The host decides v-prediction
  for SD2 from ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` (std >
  0.09, as in trained v models), so the tiny UNet (``model_channels`` 64, as
  SD2's 64-channel heads need) keeps twelve output blocks (two levels of five
  res blocks, attention at the first level) and that bias is drawn with std
  0.2.
* SDXL: ``model_channels`` 64, two levels (attention at the second, two heads
  of 64), ``adm_in_channels`` 2816 = pooled CLIP-G 1280 + six size
  embeddings, ``context_dim`` 2048 = CLIP-L 768 + CLIP-G 1280.

Weights: norms 1/0, embeddings N(0, 0.02), other weights N(0, 1/fan_in),
biases 0, tiled from one random pool; one VAE state is shared by all files.
Files are fp16 safetensors (the loader computes in fp32 on the CPU). Build
them once per test run into a temporary folder; never commit them. Image
sides must be multiples of :data:`SIZE_MULTIPLE` (16).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

import comfy.ldm.models.autoencoder
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.ops
import comfy.supported_models as sm

TE_LAYERS = 3  # the host asserts |layer_idx| < layers; SD2/SDXL read layer -2

# the host's default SD1.x/SD2.x/SDXL VAE (comfy/sd.py), built the same way
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _shrunk_text_encoder(clip_cls, names):
    """A ``ClipTarget.clip`` factory that builds ``clip_cls`` with ``TE_LAYERS`` layers per encoder."""
    def make(**params):
        opts = dict(params.get("model_options") or {})
        for name in names:
            opts.setdefault(f"{name}_model_config", {"num_hidden_layers": TE_LAYERS})
        params["model_options"] = opts
        return clip_cls(**params)
    return make


def _tiny(base, unet, te_names, unet_extra=None):
    """Test-only subclass of host config ``base`` with UNet keys ``unet`` and shrunk text encoders."""
    def clip_target(self, state_dict={}):
        target = base.clip_target(self, state_dict)
        target.clip = _shrunk_text_encoder(target.clip, te_names)
        return target
    attrs = {"unet_config": {**base.unet_config, **unet}, "clip_target": clip_target}
    if unet_extra is not None:
        attrs["unet_extra_config"] = {**base.unet_extra_config, **unet_extra}
    return type(f"Tiny{base.__name__}", (base,), attrs)


TinySD15 = _tiny(sm.SD15, {"model_channels": 32}, ["clip_l"])
TinySD20 = _tiny(sm.SD20, {"model_channels": 64}, ["clip_h"])
TinySDXL = _tiny(sm.SDXL, {"model_channels": 64, "transformer_depth": [0, 1]}, ["clip_l", "clip_g"])

# the full UNet config each family's detector must read back from the weights
_COMMON = {"image_size": 32, "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
           "in_channels": 4, "out_channels": 4, "use_temporal_resblock": False, "use_temporal_attention": False}
FAMILIES = {
    "sd15": (TinySD15, {**_COMMON, "model_channels": 32, "num_res_blocks": [1], "channel_mult": [1],
                        "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": -2,
                        "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None}),
    "sd20v": (TinySD20, {**_COMMON, "model_channels": 64, "num_res_blocks": [5, 5], "channel_mult": [1, 1],
                         "transformer_depth": [1] * 5 + [0] * 5, "transformer_depth_output": [1] * 6 + [0] * 6,
                         "transformer_depth_middle": -2, "context_dim": 1024, "use_linear_in_transformer": True,
                         "adm_in_channels": None}),
    # detected as SD1.5 by the unmodified host: 320 channels, one level, full CLIP-L and VAE (225 M params)
    "demo": (sm.SD15, {**_COMMON, "model_channels": 320, "num_res_blocks": [1], "channel_mult": [1],
                       "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": -2,
                       "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None}),
    "sdxl": (TinySDXL, {**_COMMON, "model_channels": 64, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
                        "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
                        "transformer_depth_middle": -2, "context_dim": 2048, "use_linear_in_transformer": True,
                        "adm_in_channels": 2816, "num_classes": "sequential"}),
}
#: image sides must be multiples of this for every tiny model (VAE 8 x UNet 2; smaller latents leave
#: GroupNorm one value per group)
SIZE_MULTIPLE = 16


def register() -> None:
    """Put the tiny configs at the front of the host's detection list (idempotent)."""
    for cls, _ in FAMILIES.values():
        if cls.__name__.startswith("Tiny") and cls not in sm.models:
            sm.models.insert(0, cls)


_POOL = 1_000_003  # prime: tiled rows of any layer width differ from each other


class _Noise:
    """Normal fp16 values tiled from one random pool: filling ~300 M weights costs one copy, not a randn."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.pools = {1.0: torch.randn(_POOL, generator=self.gen).half()}

    def __call__(self, shape, std: float = 1.0) -> torch.Tensor:
        if std not in self.pools:  # a few distinct fan-ins per model
            self.pools[std] = self.pools[1.0] * std
        pool = self.pools[std]
        n = math.prod(shape)
        start = int(torch.randint(_POOL, (1,), generator=self.gen))
        return pool.repeat((start + n) // _POOL + 1)[start:start + n].view(shape)


def _random_state(module: torch.nn.Module, noise: _Noise) -> dict[str, torch.Tensor]:
    """Random fp16 values for every state-dict entry of a module built on the meta device."""
    keys = set(module.state_dict())
    out = {}
    for mname, mod in module.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = f"{mname}.{pname}" if mname else pname
            if key not in keys:
                continue
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                v = torch.ones(p.shape) if pname == "weight" else torch.zeros(p.shape)
            elif pname == "position_ids":
                v = torch.arange(p.shape[-1]).expand(p.shape)
            elif isinstance(mod, torch.nn.Embedding):
                v = noise(p.shape, 0.02)
            elif p.ndim >= 2:
                v = noise(p.shape, 1 / math.sqrt(p[0].numel()))
            elif pname == "logit_scale":
                v = torch.full(p.shape, math.log(100.0))
            else:
                v = torch.zeros(p.shape)
            out[key] = v if not v.is_floating_point() else v.half()
    return out


def _vae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    return _random_state(vae, _Noise(seed + 1))


def checkpoint_state(family: str, seed: int = 0, vae_state: dict | None = None) -> dict[str, torch.Tensor]:
    """The full checkpoint state dict (host key layout) of a tiny ``family`` model."""
    cls, unet_config = FAMILIES[family]
    config = cls(unet_config)
    noise = _Noise(seed)
    with torch.device("meta"):
        unet = openaimodel.UNetModel(**config.unet_config, operations=comfy.ops.disable_weight_init)
        te = config.clip_target().clip(device="meta", dtype=torch.float32, model_options={})
    unet_sd = _random_state(unet, noise)
    if family == "sd20v":  # what the host's SD20.model_type reads to pick v-prediction
        key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
        unet_sd[key] = noise(unet_sd[key].shape, 0.2)
    sd = config.process_unet_state_dict_for_saving(unet_sd)
    sd.update(config.process_clip_state_dict_for_saving(_random_state(te, noise)))
    sd.update(config.process_vae_state_dict_for_saving(dict(vae_state if vae_state is not None else _vae_state(seed))))
    return {k: v.contiguous() for k, v in sd.items()}


def save_checkpoint(path: Path, family: str, seed: int = 0, vae_state: dict | None = None) -> Path:
    """Write one random-weight ``family`` checkpoint (fp16 safetensors) to ``path``."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    safetensors.torch.save_file(checkpoint_state(family, seed, vae_state), str(path))
    print(f"random-weight checkpoint {path.name}: {path.stat().st_size / 1e6:.0f} MB in "
          f"{time.perf_counter() - t0:.1f} s")
    return path


def build(folder: Path, families=("sd15", "sd20v", "sdxl"), seed: int = 0) -> dict[str, Path]:
    """Write ``tiny_<family>.safetensors`` files into ``folder``; returns family -> path."""
    vae = _vae_state(seed)
    return {family: save_checkpoint(Path(folder) / f"tiny_{family}.safetensors", family, seed, vae)
            for family in families}

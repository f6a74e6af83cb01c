"""One DreamBooth training step on the SD1.5 architecture: the pack's against diffusers' ``train_dreambooth.py``.

Run each side in its own process (two full-UNet optimiser states need twice
the memory); ``--impl`` picks the side:

* **diffusers**: ``UNet2DConditionModel`` from SD1.5's ``unet/config.json``
  (random init), ``DDPMScheduler`` with SD1.5's schedule, ``torch.optim.AdamW``
  (lr 5e-7, betas 0.9/0.999, weight decay 1e-2, eps 1e-8) and the step of
  diffusers' ``examples/dreambooth/train_dreambooth.py``: noise, random
  timesteps, ``add_noise``, UNet forward, ``mse_loss`` on epsilon, backward,
  ``clip_grad_norm_`` 1.0, ``optimizer.step()``, ``zero_grad(set_to_none=True)``.
  Needs ``diffusers`` in the benchmark's environment only; it is not a pack
  dependency.
* **pack**: the same UNet layout built with the host's classes and random
  weights, loaded by the host's checkpoint loader (:mod:`bench_protect`), and
  the Customize node's ``training=dreambooth`` path: the private float32 copy
  of the UNet (``antipure_comfy.dreambooth.trainable_copy``), the bridge's
  session and the core's ``customize`` loop with the same optimiser settings
  and clipping, progress hook included, then the trained weights turned into
  the output's patches (``differences``).

Both train on the same fixed latents (4 x res/8 x res/8) and a random
77 x 768 text conditioning, so the VAE encoder and the text encoder are out
of the step on both sides (diffusers' script encodes the images every step,
the pack once before training; the text encoder is frozen in this
comparison). Both hold the SD1.5 VAE in memory, as the script and the host
do. The first step is a warm-up (AdamW allocates its state); the
second is the census (FLOPs, peak memory: the process's anonymous resident
memory, weights and optimiser state included, or the CUDA allocator's peak);
the next ``--steps`` are timed (median of wall and of CPU seconds).

``--depth reduced`` keeps SD1.5's block types, widths, heads and context but
only its first three levels with one res block each (420 M parameters of
860 M): the same code path with fewer blocks, for machines where the pack's
full SD1.5 fine-tune (BENCHMARKS.md) does not fit; ``--depth small``
keeps the first two levels (107 M parameters).

    python benchmarks/bench_dreambooth.py --impl diffusers --resolution 256 --threads 2
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_dreambooth.py --impl pack --resolution 256 --threads 2
    # CUDA at 512²:
    python benchmarks/bench_dreambooth.py --impl diffusers --device cuda --resolution 512 --batch 2 --steps 10
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_dreambooth.py --impl pack --device cuda \\
        --resolution 512 --batch 2 --steps 10
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_protect import SD15_LAYOUT, Census, Clock, _proc_gib, machine  # noqa: E402

LR, BETAS, WEIGHT_DECAY, EPS, MAX_GRAD_NORM = 5e-7, (0.9, 0.999), 1e-2, 1e-8, 1.0  # train_dreambooth.py's AdamW
# runwayml/stable-diffusion-v1-5 unet/config.json (the fields that shape the network)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
# --depth reduced: SD1.5's first three levels (320/640/1280 wide, attention at each, the attention middle
# block), one res block per level; 420 M parameters (SD1.5: 860 M). The same network in both layouts.
REDUCED_UNET = dict(SD15_UNET, layers_per_block=1, block_out_channels=(320, 640, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3)
REDUCED_LAYOUT = dict(SD15_LAYOUT, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4], transformer_depth=[1, 1, 1],
                      transformer_depth_output=[1] * 6)
# --depth small: the first two levels (320/640), one res block each, the middle block at 640; 107 M parameters
SMALL_UNET = dict(REDUCED_UNET, block_out_channels=(320, 640), down_block_types=("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2)
SMALL_LAYOUT = dict(REDUCED_LAYOUT, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
                    transformer_depth_output=[1] * 4)
# runwayml/stable-diffusion-v1-5 vae/config.json
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512)
UNETS = {"full": (SD15_UNET, SD15_LAYOUT), "reduced": (REDUCED_UNET, REDUCED_LAYOUT), "small": (SMALL_UNET, SMALL_LAYOUT)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=("pack", "diffusers"), required=True)
    p.add_argument("--depth", choices=tuple(UNETS), default="full")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latents: side / 8)")
    p.add_argument("--batch", type=int, default=1, help="instance images per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--attention", default="default", help="pack: the host's attention backend (bench_protect)")
    a = p.parse_args(argv)
    a.dtype = "fp32"  # bench_protect.boot_host reads it: fp32 weights on both sides
    a.checkpointing = False
    return a


def data(a, device):
    g = torch.Generator().manual_seed(0)
    side = a.resolution // 8
    latents = torch.randn((a.batch, 4, side, side), generator=g).to(device)
    context = torch.randn((1, 77, 768), generator=g).to(device)
    return latents, context


def run_diffusers(a, device):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    cfg = UNETS[a.depth][0]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(device).train()
    # train_dreambooth.py keeps the VAE on the device for the whole run (as the host keeps the pack's VAE)
    vae = AutoencoderKL(**SD15_VAE).to(device).requires_grad_(False)  # noqa: F841
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    latents, context = data(a, device)
    context = context.expand(a.batch, -1, -1)

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    n = sum(p.numel() for p in unet.parameters())
    times, census, clock = [], Census(device), Clock(device)
    step()  # warm-up: AdamW's state is allocated here
    census.start()
    step()
    counted = census.stop()
    for _ in range(a.steps):
        clock.start()
        step()
        times.append(clock.stop())
    return n, times, counted


def run_pack(a, device):
    import bench_protect
    bench_protect.SD15_LAYOUT = UNETS[a.depth][1]  # load_sd15 builds the UNet from this layout
    pack = bench_protect.boot_host(a)
    patcher, vae = bench_protect.load_sd15(torch.float32)
    mod = lambda name: importlib.import_module(f"{pack.__name__}.{name}")  # noqa: E731
    db, bridge = mod("antipure_comfy.dreambooth"), mod("antipure_comfy.bridge")
    customize = mod("antipure_core.customize").customize
    node_callback = mod("antipure_comfy.progress").host_callback(a.steps + 2)
    latents, context = data(a, device)
    cond = [[context, {}]]
    times, census, clock, counted = [], Census(device), Clock(device), []

    def callback(info):  # after each step
        node_callback(info)  # the node's progress/cancel hook is part of its step
        if info["i"] == 0:
            census.start()
        elif info["i"] == 1:
            counted.append(census.stop())
        else:
            times.append(clock.stop())
        clock.start()

    with torch.inference_mode():  # as the host's executor runs a node
        bridge.check_inputs(patcher, vae)
        train_mp = db.trainable_copy(patcher)
        with bridge.open_session(train_mp, vae, None) as dm:
            weights = db.copy_parameters(train_mp)
            customize(dm, None, cond, list(weights.values()), steps=a.steps + 2, lr=LR, batch_size=a.batch,
                      prediction="eps", generator=0, callback=callback, latents=latents, max_grad_norm=MAX_GRAD_NORM,
                      restore=False, optimizer=db.optimizer_factory("adamw", device, fused=True))
        n = sum(w.numel() for w in weights.values())
        db.differences(patcher, weights)  # the node's last step: the trained weights as patches
    return n, times, counted[0]


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    t0 = time.perf_counter()
    n, times, census = (run_diffusers if a.impl == "diffusers" else run_pack)(a, device)
    wall = statistics.median(t[0] for t in times)
    cpu = statistics.median(t[1] + t[2] for t in times)
    print(f"# {machine(device)}; SD1.5 UNet ({a.depth} depth, {n / 1e6:.1f} M trained parameters), fp32, "
          f"{a.resolution}², batch {a.batch}, AdamW + clipping 1.0, {a.steps} timed steps after a warm-up and a census step")
    print(f"impl={a.impl} step_wall_s={wall:.3f} step_cpu_s={cpu:.3f} peak_gib={census['peak']:.2f} "
          f"step_gflop={census['gflop'] / max(a.steps, 1):.0f} process_s={time.perf_counter() - t0:.1f} "
          f"rss_hwm_gib={_proc_gib('VmHWM'):.2f}")


if __name__ == "__main__":
    main()

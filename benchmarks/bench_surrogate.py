"""One ASPL outer iteration on the full SD1.5 architecture against its bare model work; peak memory.

An outer iteration of ``aspl`` (Anti-DreamBooth's defaults) is 3 surrogate
training steps on the clean latents, 6 PGD steps against the surrogate, the
encoding of the protected images and 3 training steps of the model copy. Its
**bare** work is the same module calls straight on the host's UNet and VAE,
with the same trainable tensors attached (LoRA adapters or the full-UNet
difference) and no pack code: UNet forward + backward to the trainable tensors,
gradient clipping and an AdamW step per training step; encoder forward +
backward and UNet forward + backward per attack step; one encoder forward of
the images before the model's steps. The pack's run additionally snapshots the
trainable tensors (the surrogate "copy") and reports each step to the Protect
node's progress/cancel hook.

The pack runs ``protect_surrogate`` on the bridge for three outer iterations:
the first is the warm-up and makes the census (FLOPs, peak memory); the
second is timed step by step through the callback; the run is cancelled at the
third's first step. The bare outer iteration runs once for its census and once
timed. Reuses :mod:`bench_protect`'s random-weight SD1.5 and meters.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_surrogate.py --resolution 256 --batch 1 --threads 2
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_protect import ATTENTION, Census, Clock, _backward, _proc_gib, boot_host, load_sd15, machine  # noqa: E402

TRAIN, ATTACK = 3, 6  # Anti-DreamBooth's; --train-steps / --attack-steps change them (peak memory needs 1 / 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256, help="square image side in pixels (multiple of 8)")
    p.add_argument("--batch", type=int, default=1, help="images protected at once (Anti-DreamBooth: 4)")
    p.add_argument("--training", default="lora", help="comma-separated: lora (rank 4, attention), full")
    p.add_argument("--attention", choices=ATTENTION, default="pytorch", help="the host's attention backend")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of UNet and VAE blocks")
    p.add_argument("--census-only", action="store_true", help="only the warm-up census (FLOPs, peak memory)")
    p.add_argument("--train-steps", type=int, default=TRAIN, help="training steps per phase (Anti-DreamBooth: 3)")
    p.add_argument("--attack-steps", type=int, default=ATTACK, help="PGD steps per iteration (Anti-DreamBooth: 6)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    a.training = [t.strip() for t in a.training.split(",") if t.strip()]
    if set(a.training) - {"lora", "full"} or a.resolution % 8 or a.batch < 1:
        p.error("--training: lora and/or full; --resolution: a multiple of 8; --batch >= 1")
    if min(a.train_steps, a.attack_steps) < 1:
        p.error("--train-steps and --attack-steps must be >= 1")
    a.dtype = "fp32"
    return a


class BareOuter:
    """The module work of one ASPL outer iteration, on the host's UNet/VAE with the trainables attached."""

    def __init__(self, dm, params, context, lr: float, train: int, attack: int):
        self.dm, self.params, self.lr, self.train, self.attack = dm, params, lr, train, attack
        self.unet = dm.model.model.diffusion_model
        self.ae = dm.vae.first_stage_model
        self.context = context
        self.abar = dm.alphas_cumprod

    def _train(self, latents, steps: int):
        for p in self.params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(self.params, lr=self.lr)
        for k in range(steps):
            z0 = latents[k % len(latents)][None]
            t = torch.randint(0, 1000, (1,), device=z0.device)
            noise = torch.randn_like(z0)
            ab = self.abar[t].view(-1, 1, 1, 1)
            with torch.enable_grad():
                out = self.unet(ab.sqrt() * z0 + (1 - ab).sqrt() * noise, t.float(), context=self.context)
                F.mse_loss(out.float(), noise).backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p in self.params:
            p.requires_grad_(False)

    def __call__(self, clean_latents, x):
        self._train(clean_latents, self.train)
        for _ in range(self.attack):
            with torch.enable_grad():
                z = self.ae.encode((x * 2 - 1).requires_grad_(True))
                t = torch.randint(0, 1000, (len(x),), device=x.device)
                ctx = self.context.expand(len(x), -1, -1)
                _backward(self.unet(z.detach().requires_grad_(True), t.float(), context=ctx))
                _backward(z)
        with torch.no_grad():
            latents = torch.cat([self.ae.encode(x[k:k + 1] * 2 - 1) for k in range(len(x))])
        self._train(latents, self.train)


def _log(*msg):
    print(time.strftime("%H:%M:%S"), *msg, file=sys.stderr, flush=True)


class _Stop(Exception):
    pass


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    pack = boot_host(a)
    bridge = importlib.import_module(f"{pack.__name__}.antipure_comfy.bridge")
    lora_adapters = importlib.import_module(f"{pack.__name__}.antipure_comfy.lora_adapters")
    host_surrogate = importlib.import_module(f"{pack.__name__}.antipure_comfy.surrogate")
    core = importlib.import_module(f"{pack.__name__}.antipure_core.surrogate")
    encode_images = importlib.import_module(f"{pack.__name__}.antipure_core.customize").encode_images
    checkpointing = importlib.import_module(f"{pack.__name__}.antipure_comfy.checkpointing").gradient_checkpointing
    host_callback = importlib.import_module(f"{pack.__name__}.antipure_comfy.progress").host_callback
    device = torch.device(a.device)
    with torch.inference_mode():
        patcher, vae = load_sd15(torch.float32)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 77, 768, generator=g).to(device)
    x = torch.rand(a.batch, 3, a.resolution, a.resolution, generator=g).to(device)
    print(f"# full-size SD1.5, random weights; {machine(device)}; {time.strftime('%Y-%m-%d')}")
    print(f"# resolution {a.resolution}, batch {a.batch}, fp32, attention {a.attention}, "
          f"checkpointing {a.checkpointing}; one outer iteration = {a.train_steps} + {a.attack_steps} + "
          f"{a.train_steps} steps\n")
    print("| training | trainable M | bare s | outer s | outer/bare wall | outer/bare user CPU | GFLOP bare / outer "
          "| peak GiB bare / outer | above start GiB bare / outer |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for training in a.training:
        if training == "lora":
            mp, adapters = lora_adapters.attach_lora(patcher, lora_adapters.target_keys(patcher, "attention"), 4, 4.0, 0)
            params = lora_adapters.trainable_parameters(adapters)
        else:
            mp, params = host_surrogate.attach_full(patcher)
        lr = host_surrogate.AUTO_LR[training]
        settings = core.SurrogateSettings(lr=lr, train_steps=a.train_steps, attack_steps=a.attack_steps)
        n_train = sum(p.numel() for p in params) / 1e6
        with torch.inference_mode(), checkpointing(mp, vae, enabled=a.checkpointing), \
                bridge.session(mp, vae, [[context.cpu(), {}]]) as dm:
            for p in params:
                p.requires_grad_(False)
            bare = BareOuter(dm, params, context, lr, a.train_steps, a.attack_steps)
            clean = encode_images(dm, x)
            census, clock = Census(device), Clock(device)
            _log(training, "bare census")
            census.start()
            bare(clean, x)
            bare_census = census.stop()
            if not a.census_only:
                _log(training, "bare timed")
                clock.start()
                bare(clean, x)
                bare_time = clock.stop()
            per_outer = 2 * a.train_steps + a.attack_steps
            node_callback = host_callback(3 * per_outer)
            marks = {}

            def callback(info):
                node_callback(info)
                i = info["i"]
                _log(training, "pack step", i, info["phase"])
                if i == per_outer - 1:
                    marks["census"] = census.stop()
                    if a.census_only:
                        raise _Stop()
                    clock.start()
                elif i == 2 * per_outer - 1:
                    marks["outer"] = clock.stop()
                    raise _Stop()
            for p in params:
                p.requires_grad_(True)
            census.start()
            try:
                core.protect_surrogate(dm, x, dm.cond, params, "aspl", steps=3 * a.attack_steps, settings=settings,
                                       restore=False, callback=callback)
            except _Stop:
                pass
        bc, oc = bare_census, marks["census"]
        if a.census_only:
            times = "– | – | – | –"
        else:
            (bw, bu, _), (ow, ou, _) = bare_time, marks["outer"]
            times = f"{bw:.1f} | {ow:.1f} | {ow / bw:.3f} | {ou / bu:.3f}"
        print(f"| {training} | {n_train:.2f} | {times} | {bc['gflop']:.0f} / {oc['gflop']:.0f} | "
              f"{bc['peak']:.2f} / {oc['peak']:.2f} | {bc['extra']:.2f} / {oc['extra']:.2f} |", flush=True)
        del mp, params, bare
    print(f"\n# anonymous RSS at the end: {_proc_gib('RssAnon'):.2f} GiB")


if __name__ == "__main__":
    main()

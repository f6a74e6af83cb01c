"""Benchmark: one purified_advdm PGD step per gradient route against its bare model work (DESIGN §1.5, §3).

The customization model is the full-size SD1.5 (random weights, through the
host's checkpoint loader, :func:`bench_protect.load_sd15`), the purifier the
full-size guided-diffusion ADM-256 (random weights from the released key list,
:func:`adm256.build_adm256`) in GrIDPure's setting (t* = 10 ancestral steps,
256-px windows, one random window per step). Timing does not depend on weight
values. Per route (``one_step``, ``k_step``, ``full``):

(a) *bare*: the module calls one step makes, straight on the modules with
    frozen weights and no pack code: the plain term's VAE encoder and UNet
    forward + backward; the purifier chain on one window (the truncated steps
    without a graph, each differentiated step run forward, then, checkpointed,
    re-run with a graph and back-propagated one at a time; one_step: one ADM
    forward + backward at t ~ U{1..t*}); the purified image's encoder and UNet
    forward + backward;
(b) *step*: one PGD step of :func:`antipure_core.protect.protect` with
    ``method="purified_advdm"`` on the pack's bridges (the SD model through
    ``bridge.session``, the ADM through ``pixel_bridge.pixel_session``), the
    path the Protect node runs;
(c) the route's cost in model calls (:func:`antipure_core.purified_attack.calls_per_step`);
(d) the step against one AntiPure step on the same ADM (every window, as the
    Protect node's default) and one ASPL outer iteration on the same SD1.5
    (Anti-DreamBooth's 3 surrogate + 6 attack + 3 model steps, LoRA surrogate).

Step and bare are interleaved as in :mod:`bench_protect` (the bare work runs in
protect's per-step callback, outside the timed interval); the first step and
the first bare run are warm-ups and make the census (FLOPs by
:class:`bench_protect.FlopCount`, peak memory: the CUDA allocator's, on the
CPU anonymous resident memory). The purifier chain is checkpointed per step unless
``--no-chain-checkpoint``; ``--checkpointing`` also checkpoints the SD UNet /
VAE blocks and the ADM's blocks (the Protect node's ``gradient_checkpointing``).

Run (CPU, smallest size; ``--depth small`` and a shorter chain for a smoke run)::

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_purified.py --resolution 64 --threads 1 --steps 1
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_purified.py --resolution 64 --threads 1 --steps 1 \\
        --depth small --t-star 2 --aspl-steps 1,1

On a GPU at 512² (GrIDPure's ten 256-px windows; peak memory of each route with checkpointing)::

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_purified.py --device cuda --resolution 512 --steps 3
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adm256 import BareADM, build_adm256  # noqa: E402
from bench_protect import (ATTENTION, DTYPES, SD15_LAYOUT, Census, Clock, _backward, _held, load_sd15,  # noqa: E402
                           machine, measure, start)

ROUTES = ("one_step", "k_step", "full")
#: ``--depth small``: one res block per level (SD1.5 is still detected as SD1.5: depth is free), for smoke runs
SD15_SMALL = {**SD15_LAYOUT, "num_res_blocks": [1, 1, 1, 1], "transformer_depth": [1, 1, 1, 0],
              "transformer_depth_output": [1] * 6 + [0] * 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=64, help="square image side in pixels (multiple of 64)")
    p.add_argument("--batch", type=int, default=1, help="images protected at once")
    p.add_argument("--routes", default=",".join(ROUTES), help="comma-separated subset of " + ", ".join(ROUTES))
    p.add_argument("--k", type=int, default=3, help="k_step: the chain's last k steps carry the gradient")
    p.add_argument("--t-star", type=int, default=10, help="GrIDPure's t* in ADM steps (GrIDPure: 10; fewer for "
                                                          "a smoke run)")
    p.add_argument("--window", type=int, default=256, help="GrIDPure's window in pixels (the ADM-256's 256)")
    p.add_argument("--windows", choices=("random", "all"), default="random",
                   help="GrIDPure windows per step: one random (the settings' default) or all")
    p.add_argument("--no-chain-checkpoint", action="store_true",
                   help="keep the whole differentiated chain's graph instead of recomputing step by step")
    p.add_argument("--checkpointing", action="store_true",
                   help="also checkpoint the SD UNet/VAE blocks and the ADM's blocks (Protect's "
                        "gradient_checkpointing)")
    p.add_argument("--steps", type=int, default=2, help="timed PGD steps per route after the warm-up step "
                                                        "(median reported); 0: FLOP and memory census only")
    p.add_argument("--compare", default="antipure,aspl",
                   help="comma-separated references to time: antipure (one step, all windows), aspl (one outer "
                        "iteration); empty: none")
    p.add_argument("--aspl-steps", default="3,6", help="ASPL's train,attack steps per outer iteration "
                                                       "(Anti-DreamBooth: 3,6)")
    p.add_argument("--depth", choices=("full", "small"), default="full",
                   help="small: one res block per level in both models, for a quick smoke run (not the released "
                        "architectures: its times are not theirs)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype of both models")
    p.add_argument("--attention", choices=ATTENTION, default="default", help="the host's attention backend")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    a.routes = [r.strip() for r in a.routes.split(",") if r.strip()]
    a.compare = [c.strip() for c in a.compare.split(",") if c.strip()]
    if set(a.routes) - set(ROUTES) or not a.routes:
        p.error(f"--routes: choose from {', '.join(ROUTES)}")
    if set(a.compare) - {"antipure", "aspl"}:
        p.error("--compare: antipure and/or aspl")
    if a.resolution % 64 or a.resolution <= 0:
        p.error(f"--resolution: must be a positive multiple of 64 (ADM levels x VAE factor), got {a.resolution}")
    try:
        a.aspl_train, a.aspl_attack = (int(n) for n in a.aspl_steps.split(","))
    except ValueError:
        p.error(f"--aspl-steps: expected TRAIN,ATTACK, e.g. 3,6, got {a.aspl_steps!r}")
    if min(a.k, a.t_star, a.batch, a.aspl_train, a.aspl_attack) < 1 or a.steps < 0:
        p.error("--k, --t-star, --batch and --aspl-steps must be >= 1, --steps >= 0")
    return a


class BarePurified:
    """The module calls of one purified_advdm step on ``route``, with random upstream gradients and no pack code."""

    def __init__(self, sd_patcher, vae, adm_unet, context, route: str, t_star: int, k: int, window: int,
                 checkpointed: bool):
        base = sd_patcher.model
        self.unet, self.ae, self.adm = base.diffusion_model, vae.first_stage_model, adm_unet
        self.dtype = base.manual_cast_dtype or base.get_dtype()
        self.vae_dtype = vae.vae_dtype
        self.adm_dtype = next(adm_unet.parameters()).dtype
        self.context, self.route, self.t_star, self.window = context, route, t_star, window
        self.k = t_star if route == "full" else 1 if route == "one_step" else min(k, t_star)
        self.checkpointed = checkpointed and route != "one_step"  # one_step is one call: nothing to recompute

    def _ldm_loss(self, image):
        """Encoder and UNet forward + backward on ``image`` (the customization model's AdvDM loss)."""
        z = self.ae.encode((image * 2 - 1).to(self.vae_dtype))
        t = torch.randint(0, 1000, (len(image),), device=image.device).float()
        ctx = self.context.expand(len(image), -1, -1).to(self.dtype)
        zd = z.detach().to(self.dtype).requires_grad_(True)
        _backward(self.unet(zd, t, context=ctx))
        z.backward(zd.grad.to(z.dtype))

    def _step(self, x, t: int):
        """One chain step: the ADM call (ε and the learned variance) and a posterior-mean-like update."""
        out = self.adm(x.to(self.adm_dtype), torch.full((len(x),), t, device=x.device)).float()
        return 0.99 * x + 0.01 * out[:, :3] + 0.001 * out[:, 3:].exp()

    def __call__(self, method: str, x):
        with torch.enable_grad():
            self._ldm_loss(x.detach().requires_grad_(True))  # the plain term
            s = min(self.window, x.shape[-1])
            tile = x[..., :s, :s] * 2 - 1  # any one window does the same work
            ts = list(range(self.t_star - 1, -1, -1)) if self.route != "one_step" else [self.t_star // 2]
            cur = tile + 0.1 * torch.randn_like(tile)
            with torch.no_grad():
                for t in ts[:len(ts) - self.k]:
                    cur = self._step(cur, t)
            inputs = []
            if self.checkpointed:  # forward without graph, then each step re-run with one and back-propagated
                with torch.no_grad():
                    for t in ts[len(ts) - self.k:]:
                        inputs.append(cur)
                        cur = self._step(cur, t)
                out = cur
            else:
                leaf = cur = cur.detach().requires_grad_(True)
                for t in ts[len(ts) - self.k:]:
                    cur = self._step(cur, t)
                out = cur
            image = x.detach().clone()
            image[..., :s, :s] = ((out.detach() + 1) / 2).clamp(0, 1)
            image.requires_grad_(True)
            self._ldm_loss(image)  # the purified term
            grad = image.grad[..., :s, :s] / 2
            if self.checkpointed:
                for xi, t in zip(reversed(inputs), reversed(ts[len(ts) - self.k:])):
                    xi = xi.detach().requires_grad_(True)
                    self._step(xi, t).backward(grad)
                    grad = xi.grad
            else:
                out.backward(grad)
                grad = leaf.grad
            return grad


def aspl_outer(pack, dm, params, x, a, device) -> dict:
    """One ASPL outer iteration of the pack (protect_surrogate, LoRA surrogate): censused, then timed."""
    core = importlib.import_module(f"{pack.__name__}.antipure_core.surrogate")
    lr = importlib.import_module(f"{pack.__name__}.antipure_comfy.surrogate").AUTO_LR["lora"]
    settings = core.SurrogateSettings(lr=lr, train_steps=a.aspl_train, attack_steps=a.aspl_attack)
    census, clock = Census(device), Clock(device)
    census.start()  # a warm-up, counted; then timed without the counter's overhead
    core.protect_surrogate(dm, x, dm.cond, params, "aspl", steps=a.aspl_attack, settings=settings)
    counted = census.stop()
    clock.start()
    core.protect_surrogate(dm, x, dm.cond, params, "aspl", steps=a.aspl_attack, settings=settings)
    wall, user, _ = clock.stop()
    return {"wall": wall, "user": user, **counted}


def main(argv=None):
    a = parse_args(argv)
    pack, device = start(a)
    mod = lambda name: importlib.import_module(f"{pack.__name__}.{name}")  # noqa: E731
    bridge, pixel_bridge = mod("antipure_comfy.bridge"), mod("antipure_comfy.pixel_bridge")
    checkpointing = mod("antipure_comfy.checkpointing").gradient_checkpointing
    purified = mod("antipure_core.purified_attack")
    windows = mod("antipure_core.windows")
    small, dtype = a.depth == "small", DTYPES[a.dtype]

    t0 = time.perf_counter()
    with torch.inference_mode():  # the host's executor runs loaders and nodes in inference mode
        patcher, vae = load_sd15(dtype, layout=SD15_SMALL if small else SD15_LAYOUT)
        adm = build_adm256(pack, dtype, device, small=small)
    n_adm = sum(p.numel() for p in adm.parameters())
    print(f"# SD1.5 and guided-diffusion ADM-256 ({n_adm:,} ADM parameters), random weights"
          f"{' (--depth small: one res block per level, NOT the released architectures)' if small else ''}, "
          f"built in {time.perf_counter() - t0:.0f} s")
    print(f"# {machine(device)}; {time.strftime('%Y-%m-%d')}")
    layout = windows.grid_windows((a.resolution, a.resolution), a.window, a.window // 2)
    count = layout.count if a.resolution > a.window else 1
    chain_ckpt = not a.no_chain_checkpoint
    print(f"# resolution {a.resolution}, batch {a.batch}, dtype {a.dtype}, GrIDPure t* {a.t_star}, "
          f"{count} window(s) of {min(a.window, a.resolution)} px ({a.windows} per step), k {a.k}, chain "
          f"checkpointing {chain_ckpt}, module checkpointing {a.checkpointing}, timed steps {a.steps}")
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 77, 768, generator=g)  # a CLIP-L prompt embedding's shape
    x = torch.rand(a.batch, 3, a.resolution, a.resolution, generator=g).to(device)
    refs = {}
    # the references first, so that each route's row is printed (and kept) as soon as it is measured
    if "aspl" in a.compare:  # on a LoRA clone of the MODEL, in a session of its own (as the Protect node)
        lora = mod("antipure_comfy.lora_adapters")
        mp, adapters = lora.attach_lora(patcher, lora.target_keys(patcher, "attention"), 4, 4.0, 0)
        params = lora.trainable_parameters(adapters)
        with torch.inference_mode(), checkpointing(mp, vae, enabled=a.checkpointing), \
                bridge.session(mp, vae, [[context, {}]]) as train_dm:
            refs["aspl"] = aspl_outer(pack, train_dm, params, x, a, device)
        print(aspl_line(a, refs["aspl"]), flush=True)
    with torch.inference_mode(), checkpointing(patcher, vae, enabled=a.checkpointing), \
            bridge.session(patcher, vae, [[context, {}]]) as dm, \
            pixel_bridge.pixel_session(adm, a.checkpointing) as pdm:
        print("# " + _held(device.type == "cuda"))
        if "antipure" in a.compare:
            tiles = layout.crops
            bare_adm = BareADM(pdm, lambda z: tiles(z) if a.resolution > a.window else [z], t_purify=a.t_star)
            refs["antipure"] = measure(pack, pdm, bare_adm, "antipure", x, max(a.steps, 1), device, t_purify=a.t_star,
                                       window=a.window, window_mode="all")
            print(antipure_line(a, refs["antipure"]), flush=True)
        print(HEADER, flush=True)
        for route in a.routes:
            s = purified.PurifiedSettings(route=route, k=a.k, checkpoint=chain_ckpt, purifiers={"gridpure": 1.0},
                                          t_star=a.t_star, window=a.window, windows=a.windows)
            bare = BarePurified(patcher, vae, pdm.unet, context.to(device), route, a.t_star, a.k, a.window,
                                chain_ckpt)
            calls = purified.calls_per_step(s, "gridpure", windows=count)
            r = measure(pack, dm, bare, "purified_advdm", x, a.steps, device, cond=dm.cond,
                        options={"purification": s, "pixel_model": pdm})
            print(route_row(route, calls, r, refs, device), flush=True)
    if a.windows == "all" and count > 1:
        print(f"\n# the bare work covers one window; the step purifies {count}")


HEADER = ("\n| route | ADM calls fwd / bwd | SD UNet fwd / bwd | bare s | step s | step/bare wall | "
          "step/bare user CPU | GFLOP bare / step | peak GiB bare / step | above start GiB bare / step | "
          "step / AntiPure step | step / ASPL outer iteration |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def route_row(route: str, c: dict, r: dict, refs: dict, device) -> str:
    """One route's table row (against the references measured before it)."""
    (bw, bu, _), (sw, su, _) = r["bare"], r["step"]
    bc, sc = r["bare_census"], r["step_census"]
    cpu = "–" if device.type == "cuda" else f"{su / bu:.3f}"
    vs_anti = f"{sw / refs['antipure']['step'][0]:.2f}" if "antipure" in refs else "–"
    vs_aspl = f"{sw / refs['aspl']['wall']:.3f}" if "aspl" in refs else "–"
    return (f"| {route} | {c['purifier_forward']} / {c['purifier_backward']} | {c['unet_forward']} / "
            f"{c['unet_backward']} | {bw:.2f} | {sw:.2f} | {sw / bw:.3f} | {cpu} | {bc['gflop']:.0f} / "
            f"{sc['gflop']:.0f} | {bc['peak']:.2f} / {sc['peak']:.2f} | {bc['extra']:.2f} / {sc['extra']:.2f} | "
            f"{vs_anti} | {vs_aspl} |")


def antipure_line(a, r: dict) -> str:
    return (f"# AntiPure step on the ADM (all windows, t^p {a.t_star}): {r['step'][0]:.2f} s wall, "
            f"{r['step'][1]:.2f} s user CPU (bare {r['bare'][0]:.2f} s); peak {r['step_census']['peak']:.2f} GiB")


def aspl_line(a, r: dict) -> str:
    return (f"# ASPL outer iteration ({a.aspl_train} + {a.aspl_attack} + {a.aspl_train} steps, LoRA): "
            f"{r['wall']:.2f} s wall, {r['user']:.2f} s user CPU, {r['gflop']:.0f} GFLOP; peak {r['peak']:.2f} GiB")

if __name__ == "__main__":
    main()

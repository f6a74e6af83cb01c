"""Benchmark: one Protect step per method against the bare model work it needs (DESIGN §3).

Purifier ``sd15`` (default): builds the full-size SD1.5 UNet and VAE with
ComfyUI's own classes and random weights (timing does not depend on weight
values), loads them through the host's checkpoint loader
(``comfy.sd.load_state_dict_guess_config``). Purifier ``adm``: the full-size
guided-diffusion ADM-256 that GrIDPure uses, built from its key list
(:mod:`benchmarks.adm256`), attacked by antipure through the Protect node's
pixel bridge, with GrIDPure's 256-px windows on larger images. Times, per
method and batch size:

(a) *bare*: exactly the module calls one step of that method makes, straight
    on the modules with frozen weights and no core logic. SD1.5: encoder
    fwd+bwd; UNet fwd+bwd; antipure: one UNet fwd+bwd at t whose x̂₀ goes
    through the decoder fwd+bwd (PFG), plus ETG's UNet forward at t_err;
    SDS's UNet forward only. ADM: per window, UNet fwd+bwd at t plus the
    forward at t_err;
(b) *step*: one PGD step of :func:`antipure_core.protect.protect` on the
    pack's bridge (``nodes.bridge.session`` / ``nodes.pixel_bridge.pixel_session``),
    the path the Protect node runs.

Both are interleaved: the bare work runs inside protect's per-step callback,
outside the timed interval, so load from other processes hits both alike.
Step 0 of every protect call and the first bare run are warm-ups (first-call
allocations, cached target latents) and make the census: FLOPs counted by
torch's FLOP formulas (``flop_registry``: matmuls, convolutions, attention: a noise-free
check that the step does the bare work and no more) and peak memory (CUDA
allocator; on the CPU anonymous resident memory). The following ones are
timed; on the CPU the user CPU time is reported next to the wall time, the
ratio that stays meaningful on a machine shared with other jobs.

Run (CPU, a few minutes)::

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_protect.py --resolution 256 --batches 1 --threads 1

On a GPU (the 8 GB fp16 target is the step's "peak" column at 512², batch 1)::

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_protect.py --device cuda --resolution 512 \\
        --dtype fp16 --batches 1,2,4 --repeats 5

AntiPure against the ADM-256 (512²: GrIDPure's ten 256-px windows per step)::

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_protect.py --purifier adm --resolution 256 \\
        --batches 1,4 --repeats 1 --threads 1
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_protect.py --purifier adm --device cuda \\
        --resolution 512 --batches 1,4 --repeats 5   # and again with --checkpointing
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import math
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the pack's headless tools import from its root
    sys.path.append(str(ROOT))
METHODS = ("antipure", "advdm", "mist", "photoguard", "sds")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the host's attention switches (comfy/cli_args.py); "default" keeps the host's own choice
ATTENTION = {"default": None, "pytorch": "use_pytorch_cross_attention", "split": "use_split_cross_attention",
             "quad": "use_quad_cross_attention"}
# SD1.5 as comfy/model_detection.py detects it: its supported_models entry plus the layout
SD15_LAYOUT = {"image_size": 32, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2, 2],
               "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
               "transformer_depth_middle": 1, "transformer_depth_output": [1] * 9 + [0] * 3,
               "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
               "use_temporal_resblock": False}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--purifier", choices=("sd15", "adm"), default="sd15",
                   help="the model attacked: SD1.5 (MODEL + VAE) or the pixel-space ADM-256 (antipure only)")
    p.add_argument("--window", type=int, default=256, help="ADM: the attack's window in pixels (GrIDPure's 256)")
    p.add_argument("--window-mode", choices=("all", "random"), default="all",
                   help="ADM on images larger than the window: every window per step, or one random window")
    p.add_argument("--resolution", type=int, default=256, help="square image side in pixels (multiple of 64)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="UNet and VAE weight dtype")
    p.add_argument("--checkpointing", action="store_true",
                   help="gradient checkpointing of the UNet's blocks and the VAE's resnet blocks "
                        "(the Protect node's gradient_checkpointing)")
    p.add_argument("--attention", choices=ATTENTION, default="default", help="the host's attention backend")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of " + ", ".join(METHODS) + " (default: all; adm: antipure)")
    p.add_argument("--batches", default="1,2,4", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed steps per method and batch after the warm-up (median reported); "
                        "0: FLOP and memory census only")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in (a.methods or ("antipure" if a.purifier == "adm" else ",".join(METHODS))).split(",")
                 if m.strip()]
    a.batches = [int(b) for b in a.batches.split(",")]
    if unknown := set(a.methods) - set(METHODS):
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if a.purifier == "adm" and a.methods != ["antipure"]:
        p.error("--methods: the ADM purifier is benchmarked for antipure only")
    if a.resolution % 64 or a.resolution <= 0:
        p.error(f"--resolution: must be a positive multiple of 64 (PFG patch grid x VAE factor), got {a.resolution}")
    if a.repeats < 0 or min(a.batches) < 1:
        p.error("--repeats must be >= 0 and --batches >= 1")
    return a


def boot_host(a):
    """Import ComfyUI with the device/attention/VAE-dtype flags set first, load the pack as the host does and
    return it (its modules are then ``<pack>.antipure_comfy.*``, the very ones the nodes use)."""
    from antipure import comfyui

    comfy_root = Path(os.environ.get("COMFYUI_PATH", "/work/ComfyUI"))
    if not (comfy_root / "comfy").is_dir():
        sys.exit(f"COMFYUI_PATH: no ComfyUI at {str(comfy_root)!r}; point it at a ComfyUI checkout")
    sys.path.insert(0, str(comfy_root))
    from comfy.cli_args import args  # the flags must be set before comfy.model_management is imported
    if ATTENTION[a.attention]:
        setattr(args, ATTENTION[a.attention], True)
    setattr(args, f"{a.dtype}_vae", True)
    asyncio.run(comfyui.boot_host(comfy_root, cpu=a.device == "cpu"))
    if not asyncio.run(comfyui.load_pack(ROOT)):
        sys.exit(f"the host could not load the pack at {ROOT} (see its log)")
    return sys.modules[comfyui.pack_module_name(ROOT)]


# --- a full-size random-weight SD1.5 through the host's loader ---------------------------------

def load_sd15(dtype: torch.dtype, seed: int = 0, layout: dict = SD15_LAYOUT):
    """(MODEL, VAE) as the host's checkpoint loader returns them for SD1.5 with random weights in ``dtype``
    (``layout``: the UNet's depth, :data:`SD15_LAYOUT` for the released one)."""
    import comfy.model_management as mm
    import comfy.ops
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.supported_models import SD15
    # the pack's random-weight filler (norms 1/0, weights N(0, 1/fan_in) tiled from one pool)
    from antipure.random_checkpoint import _Noise, _random_state, _vae_state
    with torch.device("meta"):
        unet = UNetModel(**SD15.unet_config, **SD15.unet_extra_config, **layout,
                         operations=comfy.ops.disable_weight_init)
    sd = {f"model.diffusion_model.{k}": v for k, v in _random_state(unet, _Noise(seed)).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in _vae_state(seed).items()})
    patcher, _, vae, _ = comfy.sd.load_state_dict_guess_config(
        sd, output_vae=True, output_clip=False, model_options={"dtype": dtype})
    if type(patcher.model.model_config) is not SD15:
        raise RuntimeError(f"the host detected {type(patcher.model.model_config).__name__}, not SD15")
    del sd
    mm.load_models_gpu([patcher, vae.patcher], force_full_load=True)
    return patcher, vae


# --- (a) the bare module work -------------------------------------------------------------------

class Bare:
    """The module calls each method's step makes, with random upstream gradients and no core logic."""

    def __init__(self, patcher, vae, context):
        base = patcher.model
        self.unet, self.ae = base.diffusion_model, vae.first_stage_model
        self.dtype = base.manual_cast_dtype or base.get_dtype()  # what apply_model feeds the UNet
        self.vae_dtype = vae.vae_dtype
        self.context = context

    def _unet(self, z, t, grad: bool):
        ctx = self.context.expand(len(z), -1, -1).to(self.dtype)
        with torch.set_grad_enabled(grad):
            return self.unet(z.to(self.dtype).requires_grad_(grad), t.float(), context=ctx)

    def __call__(self, method: str, x):
        with torch.enable_grad():
            z = self.ae.encode((x * 2 - 1).to(self.vae_dtype).requires_grad_(True))
            zd = z.detach()
            t = torch.randint(0, 1000, (len(x),), device=x.device)
            if method in ("advdm", "mist"):
                _backward(self._unet(zd, t, grad=True))
            if method == "sds":
                self._unet(zd, t, grad=False)
            if method == "antipure":
                t = t % 10  # t ~ U{1..t^p}, t^p = 10
                eps = self._unet(zd, t, grad=True)
                self._unet(zd, t + 10, grad=False)  # ETG's stop-gradient forward at t_err
                # PFG: x̂₀ from the same prediction is decoded, so the decoder's graph sits on the
                # UNet's and both are alive in one backward
                _backward(self.ae.decode(eps.to(self.vae_dtype)))
            _backward(z)


def _backward(out):
    out.float().backward(torch.randn(out.shape, device=out.device))


# --- measurement --------------------------------------------------------------------------------

class Clock:
    """Wall time and this process's user/system CPU time of an interval (all threads)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0, self.r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> tuple[float, float, float]:
        """(wall, user, system) seconds since :meth:`start`."""
        if self.cuda:
            torch.cuda.synchronize()
        r = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter() - self.t0, r.ru_utime - self.r0.ru_utime, r.ru_stime - self.r0.ru_stime


class FlopCount(TorchDispatchMode):
    """The FLOPs of every op torch's ``FlopCounterMode`` counts (its ``flop_registry``), without its module
    tracker: that tracker's hooks keep module outputs alive inside ``torch.utils.checkpoint`` regions (bench_purified
    at 64², ``full`` route: 3.09 GiB above the start under it, 0.74 without; the same 4297 GFLOP)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


class Census:
    """FLOPs (:class:`FlopCount`: matmuls, convolutions, attention) and peak memory of an interval.

    CUDA: the allocator's peak. CPU: the peak of the process's anonymous
    resident memory (RssAnon, sampled every 5 ms; file-backed pages are left
    out, the kernel may evict those under memory pressure), with large blocks
    served by mmap and freed heap pages returned first, so freed tensors leave
    it at once. Both are reported absolute (weights included) and above the
    interval's start.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2 ** 30
        else:
            _malloc(mmap_threshold=1 << 20, trim=True)
            self.base = self.peak = _proc_gib("RssAnon")
            self.sampling = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        self.counter = FlopCount()
        self.counter.__enter__()

    def _sample(self):
        while not self.sampling.wait(0.005):
            self.peak = max(self.peak, _proc_gib("RssAnon"))

    def stop(self) -> dict:
        self.counter.__exit__(None, None, None)
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
        else:
            self.sampling.set()
            self.sampler.join()
            peak = max(self.peak, _proc_gib("RssAnon"))
            _malloc(mmap_threshold=32 << 20)  # glibc's own ceiling, where its adaptive threshold ends up
        return {"gflop": self.counter.get_total_flops() / 1e9, "peak": peak, "extra": peak - self.base}


def _proc_gib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2 ** 20


def _malloc(mmap_threshold: int, trim: bool = False) -> None:
    """glibc knobs: blocks above ``mmap_threshold`` go back to the OS on free; ``trim`` returns free heap pages."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then include freed heap memory
        pass


def measure(pack, dm, bare, method: str, x, repeats: int, device: torch.device, cond=None, **protect_kw) -> dict:
    """One protect call of ``repeats + 1`` steps interleaved with the bare work.

    Step 0 and the first bare run are warm-ups, taken for the FLOP and memory
    census; the rest are timed. Step 0 also fills per-attack caches (mist's and
    photoguard's target latent: one encoder forward without grad, once per call).
    """
    protect = importlib.import_module(f"{pack.__name__}.antipure_core.protect").protect
    node_callback = importlib.import_module(f"{pack.__name__}.antipure_comfy.progress").host_callback(repeats + 1)
    census, clock, steps, bares = Census(device), Clock(device), [], []

    census.start()
    bare(method, x)
    bare_census = census.stop()

    def callback(info):
        node_callback(info)  # the Protect node's progress/cancel hook is part of a step
        if info["i"] == 0:
            steps.append(census.stop())
        else:
            steps.append(clock.stop())
            clock.start()
            bare(method, x)
            bares.append(clock.stop())
        clock.start()

    census.start()
    protect(dm, x, cond, method=method, steps=repeats + 1, seed=0, callback=callback, **protect_kw)
    step_census, steps = steps[0], steps[1:]
    med = lambda rows, j: statistics.median(r[j] for r in rows) if rows else math.nan  # noqa: E731
    return {"bare": [med(bares, j) for j in range(3)], "step": [med(steps, j) for j in range(3)],
            "bare_census": bare_census, "step_census": step_census}


def machine(device: torch.device) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    s = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    return s + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")


def report_rows(a, run, device: torch.device) -> None:
    """Measure every method x batch with ``run(method, x) -> measure(...)`` and print the table rows."""
    cuda = device.type == "cuda"
    scale_by = "wall" if cuda else "user CPU"
    print("| method | batch | bare s | step s | step/bare wall | step/bare user CPU | GFLOP bare / step | "
          f"peak GiB bare / step | above start GiB bare / step | step / first batch ({scale_by}) |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    g = torch.Generator().manual_seed(1)
    for method in a.methods:
        first = None
        for b in a.batches:
            x = torch.rand(b, 3, a.resolution, a.resolution, generator=g).to(device)
            r = run(method, x)
            (bw, bu, _), (sw, su, _) = r["bare"], r["step"]
            bc, sc = r["bare_census"], r["step_census"]
            key = sw if cuda else su  # user CPU time: robust to other jobs on a shared CPU
            first = first or (b, key)
            scale = f"{key / first[1]:.2f} (batch x{b / first[0]:g})" if b != first[0] else "1.00"
            cpu = "–" if cuda else f"{su / bu:.3f}"  # a GPU run's CPU time is mostly waiting
            print(f"| {method} | {b} | {bw:.2f} | {sw:.2f} | {sw / bw:.3f} | {cpu} | "
                  f"{bc['gflop']:.0f} / {sc['gflop']:.0f} | {bc['peak']:.2f} / {sc['peak']:.2f} | "
                  f"{bc['extra']:.2f} / {sc['extra']:.2f} | {scale} |", flush=True)


def _held(cuda: bool) -> str:
    held = torch.cuda.memory_allocated() / 2 ** 30 if cuda else _proc_gib("RssAnon")
    return f"{'allocated' if cuda else 'anonymous RSS'} in the session before the first step: {held:.2f} GiB\n"


def main_adm(a, pack, device: torch.device) -> None:
    """AntiPure against the full-size ADM-256 through the Protect node's pixel bridge."""
    from benchmarks.adm256 import BareADM, build_adm256
    windows = importlib.import_module(f"{pack.__name__}.antipure_core.windows")
    pixel_session = importlib.import_module(f"{pack.__name__}.antipure_comfy.pixel_bridge").pixel_session
    t0 = time.perf_counter()
    with torch.inference_mode():  # as the loader node builds it
        purifier = build_adm256(pack, DTYPES[a.dtype], device)
    n = sum(p.numel() for p in purifier.parameters())
    weights = sum(p.numel() * p.element_size() for p in purifier.parameters()) / 2 ** 30
    print(f"# full-size guided-diffusion ADM-256 ({n:,} parameters), random weights ({weights:.2f} GiB), built "
          f"from the released key list in {time.perf_counter() - t0:.0f} s")
    print(f"# {machine(device)}; {time.strftime('%Y-%m-%d')}")
    tiles = windows.grid_windows((a.resolution, a.resolution), a.window, a.window // 2)
    count = 1 if a.resolution <= a.window or a.window_mode == "random" else tiles.count
    print(f"# resolution {a.resolution} ({count} window(s) of {min(a.window, a.resolution)} px per step, "
          f"window mode {a.window_mode}), dtype "
          f"{a.dtype}, t^p 10, checkpointing {a.checkpointing}, timed repeats {a.repeats}")

    def windows_of(z):
        if a.resolution <= a.window:
            return [z]
        crops = tiles.crops(z)
        return crops[:1] if a.window_mode == "random" else crops  # any one window does the same work
    with torch.inference_mode(), pixel_session(purifier, a.checkpointing) as dm:
        print("# " + _held(device.type == "cuda"))
        bare = BareADM(dm, windows_of)
        report_rows(a, lambda method, x: measure(pack, dm, bare, method, x, a.repeats, device, t_purify=10,
                                                 window=a.window, window_mode=a.window_mode), device)


def start(a) -> tuple:
    """Apply ``--threads`` and boot the host with the pack: ``(pack, torch device)``."""
    if a.threads:
        torch.set_num_threads(a.threads)
    return boot_host(a), torch.device(a.device)


def main(argv=None):
    a = parse_args(argv)
    pack, device = start(a)
    if a.purifier == "adm":
        return main_adm(a, pack, device)
    bridge = importlib.import_module(f"{pack.__name__}.antipure_comfy.bridge")
    t0 = time.perf_counter()
    with torch.inference_mode():  # the host's executor runs loaders and nodes in inference mode
        patcher, vae = load_sd15(DTYPES[a.dtype])
    weights = sum(p.numel() * p.element_size() for m in (patcher.model, vae.first_stage_model)
                  for p in m.parameters()) / 2 ** 30
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 77, 768, generator=g)  # a CLIP-L prompt embedding's shape
    print(f"# full-size SD1.5, random weights ({weights:.2f} GiB), built and loaded by the host in "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"# {machine(device)}; {time.strftime('%Y-%m-%d')}")
    print(f"# resolution {a.resolution}, dtype {a.dtype} (UNet computes in "
          f"{patcher.model.manual_cast_dtype or patcher.model.get_dtype()}, VAE in {vae.vae_dtype}), "
          f"attention {a.attention}, checkpointing {a.checkpointing}, timed repeats {a.repeats}")
    # the Protect node's gradient_checkpointing switch: UNet blocks and VAE resnet blocks
    checkpointing = importlib.import_module(f"{pack.__name__}.antipure_comfy.checkpointing").gradient_checkpointing
    with torch.inference_mode(), checkpointing(patcher, vae, enabled=a.checkpointing), \
            bridge.session(patcher, vae, [[context, {}]]) as dm:
        print("# " + _held(device.type == "cuda"))
        bare = Bare(patcher, vae, context.to(device))
        report_rows(a, lambda method, x: measure(pack, dm, bare, method, x, a.repeats, device, cond=dm.cond),
                    device)


if __name__ == "__main__":
    main()

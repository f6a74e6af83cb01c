"""``python -m antipure demo``: the stress-test workflow end to end on a random-weight demo checkpoint.

A plumbing demo, not a protection result: the checkpoint has the SD1.5 layout
(so the unmodified host loads it) but random weights, built locally in a few
seconds. It shows every node running — protect, three purifiers, LoRA
customization, generation, evaluation — and writes the report and the
comparison strip. With a real checkpoint, use ``python -m antipure run``.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path

from antipure import PACK_ROOT

CHECKPOINT = "antipure_demo_random_sd15.safetensors"
WORKFLOW = PACK_ROOT / "example_workflows" / "antipure_stress_test.json"
SAMPLE = PACK_ROOT / "assets" / "sample_face.png"

#: small settings so the whole graph runs on a CPU in a few minutes
PIXEL_CHECKPOINT = "demo_adm.safetensors"
DEMO_SETTINGS = [
    "Checkpoint.ckpt_name=" + CHECKPOINT,
    "Purifier.ckpt_name=" + PIXEL_CHECKPOINT, "Purifier.num_head_channels=32",
    "Protect.steps=5", "Protect.alpha=2",
    "DiffPure.steps=10",
    "Protect.window=64",
    "GrIDPure.grid_window=64", "GrIDPure.grid_stride=32", "GrIDPure.grid_iterations=2", "GrIDPure.grid_rounds=1",
    "Latent.width=64", "Latent.height=64", "Latent.batch_size=2",
    *[f"{p} LoRA.steps=10" for p in ("DiffPure", "GrIDPure", "JPEG")],
    *[f"{p} LoRA.gradient_checkpointing=false" for p in ("DiffPure", "GrIDPure", "JPEG")],
    *[f"{p} sample.steps=4" for p in ("DiffPure", "GrIDPure", "JPEG", "DreamBooth")],
    "DreamBooth model.steps=10", "DreamBooth model.learning_rate=1e-5", "DreamBooth model.class_image_count=2",
    "DreamBooth model.class_sampling_steps=4", "DreamBooth model.gradient_checkpointing=false",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m antipure demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="antipure-demo", help="folder for the demo model, inputs and results")
    parser.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's location)")
    ns = parser.parse_args(argv)
    from antipure import cli
    from antipure.comfyui import boot_host, find_comfyui
    from antipure.errors import RunnerError

    out = Path(ns.out).resolve()
    try:
        comfy_root = find_comfyui(ns.comfyui)
        asyncio.run(boot_host(comfy_root))
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    ckpt = out / "models" / "checkpoints" / CHECKPOINT
    if not ckpt.exists():
        from antipure.random_checkpoint import save_checkpoint

        print("building the random-weight demo checkpoint (SD1.5 layout; plumbing only) ...")
        save_checkpoint(ckpt, "demo")
    pixel = out / "models" / "pixel_diffusion" / PIXEL_CHECKPOINT
    if not pixel.exists():
        from antipure.random_pixel import save_random_adm

        print("building the random-weight demo pixel purifier (tiny ADM; plumbing only) ...")
        save_random_adm(pixel)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLE, images / SAMPLE.name)
    args = ["run", str(WORKFLOW), "--images", str(images), "--out", str(out / "results"),
            "--models", str(out / "models"), "--comfyui", str(comfy_root)]
    for item in DEMO_SETTINGS:
        args += ["--set", item]
    code = cli.main(args)
    if code == 0:
        print(f"\nDemo finished (random weights: the numbers show the plumbing works, not protection "
              f"efficacy). Results: {out / 'results'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())

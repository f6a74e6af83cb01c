"""``python -m antipure demo``: the stress-test workflow end to end on a random-weight demo checkpoint.

A plumbing demo, not a protection result: the checkpoint has the SD1.5 layout
(so the unmodified host loads it) but random weights, built locally in a few
seconds. It shows every node running — protect, three purifiers, LoRA
customization and a DreamBooth lane, generation, evaluation — on the sample face downscaled to 64 px,
and saves the protected, purified and generated images, the LoRAs, the reports
and the comparison strips under ``--out``. With a real checkpoint, use
``python -m antipure run``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

from antipure import PACK_ROOT

CHECKPOINT = "antipure_demo_random_sd15.safetensors"
WORKFLOW = PACK_ROOT / "example_workflows" / "antipure_stress_test.json"
SAMPLE = PACK_ROOT / "assets" / "sample_face.png"
DEFAULT_OUT = PACK_ROOT / "antipure-demo"  # in the pack's folder, ignored by git
LANES = ("GrIDPure", "DiffPure", "JPEG")  # the stress test's purifier lanes (node titles)
SIZE = 64  # px: the full-size SD VAE dominates the CPU time, which grows with the pixel count

#: small settings so the whole graph runs on 2 CPU cores in under 3 minutes
PIXEL_CHECKPOINT = "demo_adm.safetensors"
DEMO_SETTINGS = [
    "Checkpoint.ckpt_name=" + CHECKPOINT,
    "Purifier.ckpt_name=" + PIXEL_CHECKPOINT, "Purifier.num_head_channels=32",
    "Protect.steps=3", "Protect.alpha=2",
    "DiffPure.steps=10",
    "Protect.window=64", "Purified settings.grid_window=64",  # one window, for method=purified_advdm too
    "GrIDPure.grid_window=64", "GrIDPure.grid_stride=32", "GrIDPure.grid_iterations=2", "GrIDPure.grid_rounds=1",
    "Latent.width=64", "Latent.height=64", "Latent.batch_size=1",
    *[f"{p} LoRA.steps=4" for p in LANES],
    *[f"{p} LoRA.gradient_checkpointing=false" for p in LANES],
    *[f"{p} sample.steps=3" for p in (*LANES, "DreamBooth")],
    "DreamBooth model.steps=4", "DreamBooth model.learning_rate=1e-5", "DreamBooth model.class_image_count=2",
    "DreamBooth model.class_sampling_steps=3", "DreamBooth model.gradient_checkpointing=false",
]


def with_saved_images(workflow: dict) -> dict:
    """The stress-test workflow (UI format) plus a SaveImage for each purifier lane's purified and generated
    images and the DreamBooth lane's generated ones, so the demo keeps them as files, not only inside the
    comparison strips."""
    workflow = json.loads(json.dumps(workflow))
    by_title = {n.get("title"): n for n in workflow["nodes"]}
    saves = [(lane, source, what) for lane in LANES
             for source, what in ((lane, "purified"), (f"{lane} decode", "generated"))]
    for lane, source, what in [*saves, ("DreamBooth", "DreamBooth decode", "generated")]:
        node_id = workflow["last_node_id"] = workflow["last_node_id"] + 1
        link_id = workflow["last_link_id"] = workflow["last_link_id"] + 1
        src = by_title[source]
        src["outputs"][0].setdefault("links", []).append(link_id)
        workflow["links"].append([link_id, src["id"], 0, node_id, 0, "IMAGE"])
        workflow["nodes"].append({"id": node_id, "type": "SaveImage", "mode": 0, "title": f"{lane} {what} save",
                                  "inputs": [{"name": "images", "type": "IMAGE", "link": link_id}], "outputs": [],
                                  "properties": {}, "widgets_values": [f"antipure/{what}_{lane.lower()}"]})
    return workflow


def _sample(images: Path) -> Path:
    """The sample face, checked and downscaled to SIZE px, in ``images/``."""
    from PIL import Image

    from antipure.image_check import check_image

    check_image(SAMPLE)  # a damaged clone must not give a demo of black rows
    images.mkdir(parents=True, exist_ok=True)
    target = images / SAMPLE.name
    with Image.open(SAMPLE) as im:
        im.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS).save(target)
    return target


def _summary(out: Path, seconds: float) -> str:
    results = out / "results"
    lines = [f"\nDemo finished in {seconds:.0f} s (random weights: the numbers show the plumbing works, not "
             f"protection efficacy). Under {out}:"]
    for label, pattern in (("protected", "*/antipure/protected_*.png"), ("purified", "*/antipure/purified_*.png"),
                           ("generated", "*/antipure/generated_*.png"), ("strips", "*/antipure/comparison_*.png"),
                           ("reports", "*/*.md"), ("scores", "*/antipure/stress_test.*")):
        found = sorted(p.relative_to(out).as_posix() for p in results.glob(pattern))
        lines.append(f"  {label}: {', '.join(found) or 'none'}")
    loras = sorted(p.relative_to(out).as_posix() for p in (out / "models" / "loras").rglob("*.safetensors"))
    lines.append(f"  LoRAs: {', '.join(loras) or 'none'}")
    lines.append(f"  table: {(results / 'results.csv').relative_to(out)} (one row per lane)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m antipure demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for the demo models, input and results (default: antipure-demo/ in the "
                             "pack's folder, which git ignores)")
    parser.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's location)")
    ns = parser.parse_args(argv)
    from antipure import cli
    from antipure.comfyui import boot_host, find_comfyui
    from antipure.errors import RunnerError
    from antipure.image_check import BadImage

    t0 = time.perf_counter()
    out = Path(ns.out).resolve()
    try:
        image = _sample(out / "images")
    except BadImage as e:
        print(f"error: the demo's sample image {SAMPLE} cannot be used: {e}. Restore it with "
              "git checkout -- assets/", file=sys.stderr)
        return 1
    try:
        comfy_root = find_comfyui(ns.comfyui)
        print("starting ComfyUI ...", flush=True)
        asyncio.run(boot_host(comfy_root))
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    ckpt = out / "models" / "checkpoints" / CHECKPOINT
    if not ckpt.exists():
        from antipure.random_checkpoint import save_checkpoint

        print("building the random-weight demo checkpoint (SD1.5 layout; plumbing only) ...", flush=True)
        save_checkpoint(ckpt, "demo")
    pixel = out / "models" / "pixel_diffusion" / PIXEL_CHECKPOINT
    if not pixel.exists():
        from antipure.random_pixel import save_random_adm

        print("building the random-weight demo pixel purifier (tiny ADM; plumbing only) ...", flush=True)
        save_random_adm(pixel)
    loras = out / "models" / "loras"
    shutil.rmtree(loras, ignore_errors=True)  # the LoRAs of an earlier demo: the list at the end is this run's
    loras.mkdir(parents=True)  # registered first, so Customize saves here, not in the host's models/loras
    workflow = out / "antipure_stress_test_demo.json"
    workflow.write_text(json.dumps(with_saved_images(json.loads(WORKFLOW.read_text(encoding="utf-8")))))
    args = ["run", str(workflow), "--images", str(image.parent), "--out", str(out / "results"),
            "--models", str(out / "models"), "--comfyui", str(comfy_root)]
    for item in DEMO_SETTINGS:
        args += ["--set", item]
    code = cli.main(args)
    if code == 0:
        print(_summary(out, time.perf_counter() - t0))
    return code


if __name__ == "__main__":
    raise SystemExit(main())

"""Write the pack's shipped workflows (``example_workflows/*.json``, the host's UI format) from short graph descriptions.

Each workflow is a list of stages (titled groups, left to right) and nodes;
parallel chains are *lanes* built from one table, so adding a purifier to the
stress test is one line in ``PURIFIER_LANES`` and adding a method to the
comparison one line in ``BASELINES``. Layout and the UI format are in
``scripts/ui_graph.py``, which also carries a link that would skip a stage
(the checkpoint into Customize, the clean images into Evaluate) through each
stage in between with a Reroute; widget order and defaults come from the
host's own node schemas. Run it in a ComfyUI environment, then
``scripts/render_previews.py`` for the .jpg previews:

    COMFYUI_PATH=/path/to/ComfyUI python scripts/build_workflows.py
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui_graph import LANE_COLORS, Graph, N, Stage, to_ui  # noqa: E402

WORKFLOWS_DIR = PACK_ROOT / "example_workflows"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
PIXEL_CHECKPOINT = "256x256_diffusion_uncond.pt"  # guided-diffusion's ADM, the purifier the paper attacks
INSTANCE_PROMPT = "a photo of sks person"
CLASS_PROMPT = "a photo of person"

MODEL, CLIP, VAE, PROMPT = ("Checkpoint", 0), ("Checkpoint", 1), ("Checkpoint", 2), ("Prompt", 0)
SD_PURIFIER = {"model": MODEL, "vae": VAE, "positive": PROMPT}  # purify through the loaded SD model
PIXEL = ("Purifier", 0)  # the pixel-space ADM: Protect attacks it, GrIDPure purifies with it

#: GrIDPure as AntiPure's paper evaluates it: 2 rounds x 20 iterations on the pixel ADM
GRIDPURE = ("AntiPurePurifyGrIDPure", {"pixel_model": PIXEL, "grid_rounds": 2})
#: stress-test lanes: (title, Purify node, its inputs); a lane's nodes are titled "<title> LoRA", ...
PURIFIER_LANES = [
    ("GrIDPure", *GRIDPURE),
    ("DiffPure", "AntiPurePurifyDiffPure", SD_PURIFIER),  # SDEdit through the SD model the attacker fine-tunes
    ("JPEG", "AntiPurePurifyJPEG", {}),
]
#: baseline-comparison lanes: Protect methods, each purified by GrIDPure (as in the paper) and scored
BASELINES = ["antipure", "purified_advdm", "aspl", "simac", "fsmg", "advdm", "mist", "photoguard", "sds", "random"]
METHOD_TITLES = {"antipure": "AntiPure", "purified_advdm": "Purified-AdvDM", "advdm": "AdvDM", "mist": "Mist",
                 "photoguard": "PhotoGuard", "sds": "SDS", "random": "Random", "aspl": "ASPL", "fsmg": "FSMG",
                 "simac": "SimAC"}
#: the settings node of the purified methods (route, windows, the purifier set), collapsed in the Protect stage
PURIFIED_SETTINGS = "Purified settings"

INPUTS, PROTECT, PURIFY, CUSTOMIZE, GENERATE, EVALUATE = (
    "Inputs", "Protect", "Purify", "Customize", "Generate", "Evaluate")
SAVE = "Save"
STAGE_COLORS = {INPUTS: "yellow", PROTECT: "pale_blue", PURIFY: "red", CUSTOMIZE: "purple",
                GENERATE: "green", EVALUATE: "cyan", SAVE: "cyan"}


def _stages(*titles: str) -> list[Stage]:
    return [Stage(t, STAGE_COLORS[t]) for t in titles]


def _note(text: str, height: int = 250) -> N:
    return N("Read me", "MarkdownNote", INPUTS, {"text": text}, color="yellow", height=height)


def _inputs() -> list[N]:
    """Images, checkpoint, prompt: what a user changes first."""
    return [
        N("Checkpoint", "CheckpointLoaderSimple", INPUTS, {"ckpt_name": CHECKPOINT}),
        N("Prompt", "CLIPTextEncode", INPUTS, {"clip": CLIP, "text": INSTANCE_PROMPT}, height=130),
        N("Images", "LoadImage", INPUTS, {"image": "example.png"}),
    ]


def _pixel_purifier() -> N:
    return N("Purifier", "AntiPureLoadPixelDiffusion", INPUTS, {"ckpt_name": PIXEL_CHECKPOINT})


def _guidance() -> list[N]:
    """AntiPure's PFG and ETG settings; disconnect one for an ablation."""
    return [N("PFG", "AntiPureFrequencyGuidance", PROTECT, collapsed=True),
            N("ETG", "AntiPureTimestepGuidance", PROTECT, collapsed=True)]


def _purified_settings() -> N:
    """The purified methods' settings (defaults: full chain through one random GrIDPure window of the ADM)."""
    return N(PURIFIED_SETTINGS, "AntiPurePurifiedSettings", PROTECT, collapsed=True)


def _protect(key: str, method: str, model: bool = True, purifier: bool = False, purified: bool = False,
             **layout) -> N:
    """Protect with ``method`` on MODEL + VAE + prompt (``model``) and/or the pixel ADM (``purifier``: the one
    antipure attacks, the paper's setting); ``purified``: the purified methods' settings wired in too."""
    guidance = {"frequency_guidance": ("PFG", 0), "timestep_guidance": ("ETG", 0)} if method == "antipure" else {}
    target = {"model": MODEL, "vae": VAE, "positive": PROMPT} if model else {}
    if purifier:
        target["purifier"] = PIXEL
    if purified:
        target["purified_settings"] = (PURIFIED_SETTINGS, 0)
    return N(key, "AntiPureProtect", PROTECT, {"image": ("Images", 0), **target, "method": method, **guidance},
             **layout)


def _report(key: str, evaluate: str, **layout) -> N:
    """The Evaluate report drawn on the canvas (the frontend shows text on its own Preview Any node)."""
    return N(key, "PreviewAny", EVALUATE, {"source": (evaluate, 0)}, height=130, **layout)


PROTECT_NOTE = """## Protect images
Adds AntiPure's bounded perturbation to every image so that a model fine-tuned on them
(DreamBooth/LoRA) learns garbage, even after the attacker purifies them. It attacks the
purifier's own denoiser: the pixel-space ADM in *Purifier* (guided-diffusion's
256x256_diffusion_uncond.pt in models/pixel_diffusion).

**Change first:** your photos in *Images*, and *eta* (budget, in /255) and *steps* on
*Protect*. Without the ADM file, delete *Purifier* and connect a checkpoint's MODEL, VAE
and prompt to *Protect*: the SD model is then the purifier.

PFG and ETG are AntiPure's two guidance terms (click a collapsed node's dot to open it);
disconnect one to turn it off."""


def protect_workflow() -> Graph:
    return Graph(_stages(INPUTS, PROTECT, SAVE), [
        _note(PROTECT_NOTE), N("Images", "LoadImage", INPUTS, {"image": "example.png"}), _pixel_purifier(),
        *_guidance(), _protect("Protect", "antipure", purifier=True, model=False),
        N("Protected", "SaveImage", SAVE, {"images": ("Protect", 0), "filename_prefix": "antipure/protected"}),
        N("Perturbation", "PreviewImage", SAVE, {"images": ("Protect", 1)}),
    ])


STRESS_NOTE = """## Protection stress test
Protects the images, then plays the attacker: each lane **purifies** the protected images
({lanes}), **fine-tunes** a DreamBooth LoRA on them, **generates** the instance prompt and
**scores** the result (reports on the right, files in output/antipure/). The last lane runs
full DreamBooth (UNet + text encoder, prior preservation, Anti-DreamBooth's settings) on the
GrIDPure-purified images, as the paper's tables do.

**Change first:** *Images*, *Checkpoint*, the identity token in *Prompt*; then *eta*/*steps*
on *Protect*. *Protect* attacks the pixel purifier in *Purifier* (guided-diffusion's
256x256_diffusion_uncond.pt in models/pixel_diffusion), which the GrIDPure lane uses; set
*method* to purified_advdm to attack the SD model through it (*Purified settings*).

Collapsed nodes hold the paper's settings: click a node's dot to open it. *Latent* sets the
size and number of generated images."""


def stress_test_workflow() -> Graph:
    g = [_note(STRESS_NOTE.format(lanes=", ".join(t for t, _, _ in PURIFIER_LANES)), height=275), *_inputs(),
         _pixel_purifier(),
         N("Negative", "CLIPTextEncode", GENERATE, {"clip": CLIP, "text": ""}, collapsed=True),
         N("Latent", "EmptyLatentImage", GENERATE, {"width": 512, "height": 512, "batch_size": 4}, collapsed=True),
         *_guidance(), _purified_settings(), _protect("Protect", "antipure", purifier=True, purified=True),
         N("Protected", "SaveImage", PROTECT, {"images": ("Protect", 0), "filename_prefix": "antipure/protected"})]
    for lane, (title, purifier, purify) in enumerate(PURIFIER_LANES):
        color = LANE_COLORS[lane % len(LANE_COLORS)]
        lora, sample, decode, scores = (f"{title} LoRA", f"{title} sample", f"{title} decode", f"{title} scores")
        at = {"lane": lane, "collapsed": True, "color": color}
        g += [
            N(title, purifier, PURIFY, {"image": ("Protect", 0), **purify}, **at),
            N(lora, "AntiPureCustomize", CUSTOMIZE,
              {"model": MODEL, "vae": VAE, "images": (title, 0), "positive": PROMPT,
               "lora_name": f"antipure/stress_test_{title.lower()}"}, **at),
            N(sample, "KSampler", GENERATE, {"model": (lora, 0), "positive": PROMPT,
                                             "negative": ("Negative", 0), "latent_image": ("Latent", 0),
                                             "steps": 30, "cfg": 7.0}, **at),
            N(decode, "VAEDecode", GENERATE, {"samples": (sample, 0), "vae": VAE}, col=1, **at),
            N(scores, "AntiPureEvaluate", EVALUATE,
              {"clean": ("Images", 0), "protected": ("Protect", 0), "purified": (title, 0),
               "generated": (decode, 0), "label": f"antipure+{title.lower()}",
               "filename_prefix": "antipure/stress_test"}, **at),
            N(f"{title} strip", "SaveImage", EVALUATE, {"images": (scores, 1),
                                                         "filename_prefix": f"antipure/comparison_{title.lower()}"},
              col=1, **at),
            _report(f"{title} report", scores, col=2, lane=lane, color=color),
        ]
    g += _dreambooth_lane(len(PURIFIER_LANES))
    return Graph(_stages(INPUTS, PROTECT, PURIFY, CUSTOMIZE, GENERATE, EVALUATE), g)


def _dreambooth_lane(lane: int) -> list[N]:
    """The paper's attack: DreamBooth (full UNet + text encoder, prior preservation with class images the
    model generates) on the GrIDPure-purified images; Customize's defaults are Anti-DreamBooth's."""
    title, color = "DreamBooth", LANE_COLORS[lane % len(LANE_COLORS)]
    at = {"lane": lane, "collapsed": True, "color": color}
    model, sample, decode, scores = (f"{title} model", f"{title} sample", f"{title} decode", f"{title} scores")
    return [
        N("Class prompt", "CLIPTextEncode", INPUTS, {"clip": CLIP, "text": CLASS_PROMPT}, collapsed=True),
        N(model, "AntiPureCustomize", CUSTOMIZE,
          {"model": MODEL, "vae": VAE, "clip": CLIP, "images": ("GrIDPure", 0), "positive": PROMPT,
           "class_positive": ("Class prompt", 0), "training": "dreambooth", "lora_name": "",
           "steps": 0, "learning_rate": 0.0, "batch_size": 0,  # 0 = Anti-DreamBooth's 1000 / 5e-7 / 2
           "instance_prompt": INSTANCE_PROMPT, "class_prompt": CLASS_PROMPT}, **at),
        N(sample, "KSampler", GENERATE, {"model": (model, 0), "positive": PROMPT, "negative": ("Negative", 0),
                                         "latent_image": ("Latent", 0), "steps": 30, "cfg": 7.0}, **at),
        N(decode, "VAEDecode", GENERATE, {"samples": (sample, 0), "vae": VAE}, col=1, **at),
        N(scores, "AntiPureEvaluate", EVALUATE,
          {"clean": ("Images", 0), "protected": ("Protect", 0), "purified": ("GrIDPure", 0),
           "generated": (decode, 0), "label": "antipure+gridpure+dreambooth",
           "filename_prefix": "antipure/stress_test"}, **at),
        N(f"{title} strip", "SaveImage", EVALUATE, {"images": (scores, 1),
                                                     "filename_prefix": "antipure/comparison_dreambooth"},
          col=1, **at),
        _report(f"{title} report", scores, col=2, lane=lane, color=color),
    ]


COMPARISON_NOTE = """## Protection methods compared
Each lane protects the same images with one method at the same budget, purifies them with
GrIDPure (2 x 20 on the pixel ADM in *Purifier*, as in AntiPure's paper) and scores what
survives (reports on the right; the plot collects every method). AntiPure attacks that
purifier; Purified-AdvDM attacks *Checkpoint* through it (*Purified settings*);
ASPL, SimAC and FSMG fine-tune surrogates of *Checkpoint*; the others attack it.

**Change first:** *Images*, *Checkpoint*; *eta* (budget, /255) and *steps* (PGD
steps) set the same budget for every method.

Collapsed nodes hold each method's settings: click a node's dot to open it."""


def baseline_comparison_workflow() -> Graph:
    from antipure_core.methods import get_method  # the pack's root is on the path once the host loaded it

    checkpoint, prompt, images = _inputs()
    g = [_note(COMPARISON_NOTE), checkpoint, prompt, _pixel_purifier(),
         N("eta", "PrimitiveNode", INPUTS, {"value": 8.0}, height=82),
         N("steps", "PrimitiveNode", INPUTS, {"value": 100}, height=82), images, *_guidance(), _purified_settings()]
    for lane, method in enumerate(BASELINES):
        title = METHOD_TITLES.get(method, method)
        color = LANE_COLORS[lane % len(LANE_COLORS)]
        at = {"lane": lane, "collapsed": True, "color": color}
        pixel, purified = method == "antipure", get_method(method).purifies
        protect = _protect(title, method, model=not pixel, purifier=pixel or purified, purified=purified, **at)
        protect.inputs.update(eta=("eta", 0), steps=("steps", 0))
        g += [
            protect,
            N(f"{title} purified", GRIDPURE[0], PURIFY, {"image": (title, 0), **GRIDPURE[1]}, **at),
            N(f"{title} scores", "AntiPureEvaluate", EVALUATE,
              {"clean": ("Images", 0), "protected": (title, 0), "purified": (f"{title} purified", 0),
               "label": method, "filename_prefix": "antipure/baseline_comparison", "faces": False}, **at),
            _report(f"{title} report", f"{title} scores", col=1, lane=lane, color=color),
        ]
    last = METHOD_TITLES.get(BASELINES[-1], BASELINES[-1])
    g.append(N("Comparison plot", "SaveImage", EVALUATE, {"images": (f"{last} scores", 1),
                                                          "filename_prefix": "antipure/baseline_comparison"},
                   col=1, lane=len(BASELINES)))
    return Graph(_stages(INPUTS, PROTECT, PURIFY, EVALUATE), g)


WORKFLOWS = {
    "antipure_protect": protect_workflow,
    "antipure_stress_test": stress_test_workflow,
    "antipure_baseline_comparison": baseline_comparison_workflow,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="ComfyUI root (default: $COMFYUI_PATH or the enclosing ComfyUI)")
    parser.add_argument("--out", default=str(WORKFLOWS_DIR), help="output folder (default: example_workflows/)")
    ns = parser.parse_args(argv)
    sys.path.insert(0, str(PACK_ROOT))
    from antipure.comfyui import boot_host, find_comfyui, load_pack

    asyncio.run(boot_host(find_comfyui(ns.comfyui), cpu=True))
    if not asyncio.run(load_pack(PACK_ROOT)):
        raise SystemExit("the host could not load the pack (see its log)")
    import nodes  # the host's nodes.py (booted above)

    node_classes = nodes.NODE_CLASS_MAPPINGS
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, build in WORKFLOWS.items():
        path = out / f"{name}.json"
        path.write_text(json.dumps(to_ui(build(), node_classes), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write the pack's shipped workflows (``example_workflows/*.json``, the host's UI format) from short graph descriptions.

Widget order and defaults come from the host's own node schemas, so a saved
workflow matches what the frontend would save for the same graph. Run it in a
ComfyUI environment, then ``scripts/render_previews.py`` for the .jpg previews:

    COMFYUI_PATH=/path/to/ComfyUI python scripts/build_workflows.py
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = PACK_ROOT / "example_workflows"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
INSTANCE_PROMPT = "a photo of sks person"
PURIFIERS = ("diffpure", "gridpure", "jpeg")
BASELINES = ("antipure", "advdm", "mist", "photoguard", "sds", "random")


@dataclass
class N:
    """A node: its key (used for links and as the title), class, grid column and inputs.

    ``inputs`` values are widget values, or ``("key", slot)`` links to another node's output.
    """

    key: str
    cls: str
    col: int
    inputs: dict[str, Any] = field(default_factory=dict)
    title: str | None = None


def _protect_nodes(col: int, method: str = "antipure", key: str = "protect") -> list[N]:
    return [N(key, "AntiPureProtect", col, {"image": ("image", 0), "model": ("checkpoint", 0),
                                            "vae": ("checkpoint", 2), "positive": ("instance prompt", 0),
                                            "method": method,
                                            **({"frequency_guidance": ("frequency guidance", 0),
                                                "timestep_guidance": ("timestep guidance", 0)}
                                               if method == "antipure" else {})},
              title=f"Protect ({method})")]


def _report(evaluate: str, col: int, name: str) -> N:
    """The Evaluate report drawn on the canvas (the frontend shows text on its own Preview Any node)."""
    return N(f"report {name}", "PreviewAny", col, {"source": (evaluate, 0)}, title=f"Report ({name})")


def _common(cols: int = 0) -> list[N]:
    return [
        N("image", "LoadImage", cols, {"image": "example.png"}, title="Images to protect"),
        N("checkpoint", "CheckpointLoaderSimple", cols, {"ckpt_name": CHECKPOINT}),
        N("instance prompt", "CLIPTextEncode", cols + 1, {"clip": ("checkpoint", 1), "text": INSTANCE_PROMPT}),
        N("frequency guidance", "AntiPureFrequencyGuidance", cols + 1),
        N("timestep guidance", "AntiPureTimestepGuidance", cols + 1),
    ]


def protect_workflow() -> list[N]:
    return _common() + _protect_nodes(2) + [
        N("save", "SaveImage", 3, {"images": ("protect", 0), "filename_prefix": "antipure/protected"}),
        N("delta", "PreviewImage", 3, {"images": ("protect", 1)}, title="Perturbation δ (amplified)"),
    ]


def stress_test_workflow() -> list[N]:
    g = _common() + _protect_nodes(2) + [
        N("negative prompt", "CLIPTextEncode", 1, {"clip": ("checkpoint", 1), "text": ""}),
        N("save protected", "SaveImage", 3, {"images": ("protect", 0), "filename_prefix": "antipure/protected"}),
        N("latent", "EmptyLatentImage", 2, {"width": 512, "height": 512, "batch_size": 4}),
    ]
    for name in PURIFIERS:
        g += [
            N(f"purify {name}", "AntiPurePurify", 3, {"image": ("protect", 0), "method": name,
                                                      "model": ("checkpoint", 0), "vae": ("checkpoint", 2),
                                                      "positive": ("instance prompt", 0)}),
            N(f"customize {name}", "AntiPureCustomize", 4,
              {"model": ("checkpoint", 0), "vae": ("checkpoint", 2), "images": (f"purify {name}", 0),
               "positive": ("instance prompt", 0), "lora_name": f"antipure/stress_test_{name}"}),
            N(f"generate {name}", "KSampler", 5,
              {"model": (f"customize {name}", 0), "positive": ("instance prompt", 0),
               "negative": ("negative prompt", 0), "latent_image": ("latent", 0), "steps": 30, "cfg": 7.0}),
            N(f"decode {name}", "VAEDecode", 6, {"samples": (f"generate {name}", 0), "vae": ("checkpoint", 2)}),
            N(f"evaluate {name}", "AntiPureEvaluate", 7,
              {"clean": ("image", 0), "protected": ("protect", 0), "purified": (f"purify {name}", 0),
               "generated": (f"decode {name}", 0), "label": f"antipure+{name}",
               "filename_prefix": "antipure/stress_test"}),
            N(f"save comparison {name}", "SaveImage", 8, {"images": (f"evaluate {name}", 1),
                                                          "filename_prefix": f"antipure/comparison_{name}"}),
            _report(f"evaluate {name}", 9, name),
        ]
    return g


def baseline_comparison_workflow() -> list[N]:
    g = _common()
    for method in BASELINES:
        key = f"protect {method}"
        g += _protect_nodes(2, method, key)
        g += [
            N(f"purify {method}", "AntiPurePurify", 3, {"image": (key, 0), "method": "diffpure",
                                                        "model": ("checkpoint", 0), "vae": ("checkpoint", 2),
                                                        "positive": ("instance prompt", 0)}),
            N(f"evaluate {method}", "AntiPureEvaluate", 4,
              {"clean": ("image", 0), "protected": (key, 0), "purified": (f"purify {method}", 0),
               "label": method, "filename_prefix": "antipure/baseline_comparison", "faces": False}),
            _report(f"evaluate {method}", 5, method),
        ]
    g.append(N("save comparison", "SaveImage", 6, {"images": ("evaluate random", 1),
                                                   "filename_prefix": "antipure/baseline_comparison"},
               title="Comparison plot (all methods so far)"))
    return g


WORKFLOWS = {
    "antipure_protect": protect_workflow,
    "antipure_stress_test": stress_test_workflow,
    "antipure_baseline_comparison": baseline_comparison_workflow,
}


def _schema(node_classes, cls: str) -> tuple[dict, list[str], list[str]]:
    node_class = node_classes[cls]
    return node_class.INPUT_TYPES(), list(node_class.RETURN_TYPES), list(
        getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES)


def to_ui(graph: list[N], node_classes) -> dict:
    """Lay out ``graph`` in columns and write it in the host's UI format (links, sockets, widget values)."""
    from antipure.workflow_format import _spec, _widget_default, _widget_type, widget_slots

    ids = {n.key: i + 1 for i, n in enumerate(graph)}
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    col_y: dict[int, float] = {}
    for n in graph:
        inputs_spec, out_types, out_names = _schema(node_classes, n.cls)
        specs = {**(inputs_spec.get("required") or {}), **(inputs_spec.get("optional") or {})}
        unknown = set(n.inputs) - set(specs)
        if unknown:
            raise SystemExit(f"{n.key}: {n.cls} has no input(s) {sorted(unknown)}")
        sockets, widgets = [], []
        for name in widget_slots(inputs_spec):
            if name is None:  # control_after_generate / upload button: frontend-only slot
                widgets.append("fixed" if widgets and isinstance(widgets[-1], int) else "image")
                continue
            type_, opts = _spec(specs[name])
            value = n.inputs.get(name, _widget_default(type_, opts))
            widgets.append(None if isinstance(value, tuple) else value)
        for name, spec in specs.items():
            type_, opts = _spec(spec)
            value = n.inputs.get(name)
            is_widget = _widget_type(type_, opts) is not None and not opts.get("forceInput")
            if is_widget and not isinstance(value, tuple):
                continue
            entry = {"name": name, "type": type_ if isinstance(type_, str) else "COMBO", "link": None}
            if is_widget:
                entry["widget"] = {"name": name}
            if isinstance(value, tuple):
                src_key, slot = value
                link_id = len(links) + 1
                links.append([link_id, ids[src_key], slot, ids[n.key], len(sockets), entry["type"]])
                out_links.setdefault((ids[src_key], slot), []).append(link_id)
                entry["link"] = link_id
            sockets.append(entry)
        height = 46 + 26 * max(len(sockets), len(out_types)) + 26 * len(widgets)
        height += 280 if n.cls in ("LoadImage", "PreviewImage", "SaveImage") else 0
        y = col_y.get(n.col, 40.0)
        col_y[n.col] = y + height + 50
        ui_nodes.append({
            "id": ids[n.key], "type": n.cls, "pos": [40 + 380 * n.col, y], "size": [340, height], "flags": {},
            "order": len(ui_nodes), "mode": 0, "inputs": sockets,
            "outputs": [{"name": name, "type": t, "links": [], "slot_index": i}
                        for i, (name, t) in enumerate(zip(out_names, out_types))],
            "properties": {"Node name for S&R": n.cls}, "widgets_values": widgets,
            **({"title": n.title or n.key} if (n.title or n.key) else {}),
        })
    for node in ui_nodes:
        for slot, out in enumerate(node["outputs"]):
            out["links"] = out_links.get((node["id"], slot), [])
    return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="ComfyUI root (default: $COMFYUI_PATH or the enclosing ComfyUI)")
    parser.add_argument("--out", default=str(WORKFLOWS_DIR), help="output folder (default: example_workflows/)")
    ns = parser.parse_args(argv)
    sys.path.insert(0, str(PACK_ROOT))
    from antipure.runner import boot_host, find_comfyui, load_pack

    asyncio.run(boot_host(find_comfyui(ns.comfyui), cpu=True))
    if not asyncio.run(load_pack(PACK_ROOT)):
        raise SystemExit("the host could not load the pack (see its log)")
    import nodes  # the host's nodes.py, now first on sys.path

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

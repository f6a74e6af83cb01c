"""AntiPureEvaluate: score one experiment, append it to a results table in the output folder, draw the comparison."""
from __future__ import annotations

import os
from datetime import datetime
from typing import Mapping

import torch

from ..antipure_core.metrics import append_results, evaluate, markdown_table
from ..antipure_core.metrics.plot import evaluation_figure, summarize
from ..antipure_core.metrics.report import format_value
from .comfy_host import folder_paths, io, ui
from .images import to_core, to_host

WEIGHTS_FOLDER = "antipure"
GROUPS = ("clean", "protected", "purified", "generated")
# which way a metric moves when the protection works better (from antipure_core.metrics' table)
BETTER = {
    "protected/psnr": "higher (less visible)", "protected/ssim": "higher (less visible)",
    "protected/linf": "lower (less visible)", "protected/linf_255": "lower (less visible)",
    "protected/l2": "lower (less visible)", "protected/l2_255": "lower (less visible)",
    "protected/lpips": "lower (less visible)",
    "generated/brisque": "higher", "generated/grid_score": "higher", "generated/hf_ratio": "higher",
    "generated/face_detection_failure_rate": "higher", "generated/identity_similarity": "lower",
    "generated/identity_distance": "higher", "generated/arcface_similarity": "lower",
    "generated/clip_iqa": "lower", "generated/liqe": "lower", "generated/fid": "higher",
}


def weights_folder() -> str:
    """The folder for user-supplied metric weights: the first existing ``antipure`` model folder.

    ``models/antipure/`` is registered with the host's ``folder_paths`` (an
    ``antipure:`` entry in ``extra_model_paths.yaml`` is searched first). Each
    optional metric's "not available" message names the file it wants there.
    """
    folder_paths.add_model_folder_path(WEIGHTS_FOLDER, os.path.join(folder_paths.models_dir, WEIGHTS_FOLDER))
    paths = folder_paths.get_folder_paths(WEIGHTS_FOLDER)
    return next((p for p in paths if os.path.isdir(p)), paths[0])


weights_folder()  # register models/antipure at load, so the folder is known before the first run


def results_paths(filename_prefix: str) -> tuple[str, str]:
    """``<output>/<prefix>.json`` and ``.csv``; the prefix may name subfolders but not leave the output folder."""
    prefix = filename_prefix.strip()
    if not prefix or prefix.endswith(("/", "\\")):
        raise ValueError(f"filename_prefix: needs a file name, e.g. 'antipure/results', got {filename_prefix!r}")
    out = os.path.abspath(folder_paths.get_output_directory())
    base = os.path.abspath(os.path.join(out, os.path.normpath(prefix)))
    if os.path.commonpath((out, base)) != out or base == out:
        raise ValueError(f"filename_prefix: {filename_prefix!r} leaves the output folder; use a relative name "
                         "such as 'antipure/results'")
    return base + ".json", base + ".csv"


def _describe(image: torch.Tensor) -> str:
    b, h, w = image.shape[:3]
    return f"{b} image{'s' if b != 1 else ''} of {w}x{h}"


def _check_inputs(images: Mapping[str, torch.Tensor]) -> None:
    """Boundary checks in the host's terms (IMAGE batches, W x H), before the core sees the tensors."""
    for name, image in images.items():
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[0] == 0:
            raise ValueError(f"{name}: the IMAGE batch is empty; connect a node that outputs at least one image")
    clean, protected = images["clean"], images.get("protected")
    if protected is not None and protected.ndim == 4 and protected.shape[:3] != clean.shape[:3]:
        raise ValueError(f"protected: {_describe(protected)} do not match clean's {_describe(clean)}; the "
                         "perturbation is measured pixel by pixel against the clean original, so both need the "
                         "same images at the same size (no resize between them)")


def _cell(v) -> str:
    if isinstance(v, str) and v.startswith(("not available", "n/a")):
        return v.split(":")[0]  # the reason is listed once under the table
    return format_value(v)


def report_markdown(label: str, row: Mapping, tables: Mapping[str, list], inputs: Mapping[str, str],
                    prefix: str, weights_dir: str) -> str:
    """The node's markdown report: this run, reasons for missing values, and every label in the results file."""
    lines = [f"## AntiPure evaluation: {label}", "",
             " · ".join(f"{k}: {v}" for k, v in inputs.items()), "",
             "| metric | value | better protection when |", "|---|---|---|"]
    metrics = [k for k in row if "/" in k]
    lines += [f"| {k} | {_cell(row[k])} | {BETTER.get(k, '')} |" for k in metrics]
    reasons: dict[str, list[str]] = {}
    for k in metrics:
        v = row[k]
        if isinstance(v, str) and v.startswith(("not available", "n/a")):
            reasons.setdefault(v, []).append(k)
    if reasons:
        lines += ["", "Missing values:"]
        lines += [f"- {', '.join(keys)}: {reason}" for reason, keys in reasons.items()]
        lines += [f"- optional metric weights are read from `{weights_dir}`"]
    if row.get("notes"):
        lines += ["", f"Notes: {row['notes']}"]
    runs = sum(len(r) for r in tables.values())
    lines += ["", f"Appended to `{prefix}.json` / `{prefix}.csv` ({runs} run{'s' if runs != 1 else ''}, "
                  f"{len(tables)} label{'s' if len(tables) != 1 else ''})."]
    if runs > 1:
        stats = summarize(tables)
        labels = [lab for lab in tables if tables[lab]]
        names = [k for k in dict.fromkeys(k for lab in labels for r in tables[lab] for k in r)
                 if any(k in stats[lab] for lab in labels)]
        cols = {f"{lab} ({len(tables[lab])})": lab for lab in labels}
        compare = [{"metric": k, **{c: format_value(stats[lab][k][0]) if k in stats[lab] else ""
                                    for c, lab in cols.items()}} for k in names]
        lines += ["", "### All labels in this results file (mean over runs; run count in brackets)", "",
                  markdown_table(compare)]
    return "\n".join(lines)


class AntiPureEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureEvaluate",
            display_name="AntiPure Evaluate",
            category="AntiPure",
            description="Score a protect → purify → customize → generate experiment: perceptibility of the "
                        "perturbation (PSNR, SSIM, L∞/L2, LPIPS) and the distortion it leaves (BRISQUE, grid "
                        "artifacts, face detection failure, identity similarity, CLIP-IQA, FID of generated vs "
                        "clean). Appends one row per run to <output>/<filename_prefix>.json/.csv; Evaluate nodes "
                        "with different labels and the same prefix build one comparison table and plot.",
            inputs=[
                io.Image.Input("clean", tooltip="The original, unprotected images: the reference for every "
                                                "comparison and the identity for face metrics."),
                io.String.Input("label", default="antipure",
                                tooltip="Name of this run's group in the results file, e.g. the method "
                                        "('antipure', 'advdm', 'mist eta=8'). Runs with the same label are "
                                        "averaged in the comparison table and plot."),
                io.String.Input("filename_prefix", default="antipure/results",
                                tooltip="Results file in the output folder, without extension: "
                                        "<prefix>.json and <prefix>.csv. Use the same prefix in several "
                                        "Evaluate nodes to compare their labels."),
                io.Boolean.Input("faces", default=True,
                                 tooltip="Face metrics (detection failure rate, identity similarity). Turn off "
                                         "for art-style experiments. Need dlib-bin + face-recognition-models "
                                         "(requirements-metrics.txt), else scikit-image's detector, else "
                                         "reported as not available."),
                io.Int.Input("patch_size", default=8, min=2, max=64,
                             tooltip="Grid period in pixels for grid_score / hf_ratio (8 = the SD VAE's "
                                     "latent cell)."),
                io.Image.Input("protected", optional=True,
                               tooltip="The protected images, same count and size as clean: perceptibility of "
                                       "the perturbation. Optional weights: LPIPS needs torchvision's "
                                       "alexnet-owt-7be5be79.pth and lpips_alex_v0.1.pth in models/antipure/."),
                io.Image.Input("purified", optional=True,
                               tooltip="The attacker's purified images, same count as clean (resized to clean's "
                                       "size for PSNR/SSIM): how much of the protection survived."),
                io.Image.Input("generated", optional=True,
                               tooltip="Images sampled from the model customized on the (purified) images, any "
                                       "count and size. Optional weights in models/antipure/: arcface.onnx "
                                       "(needs onnxruntime) for ArcFace identity, a transformers CLIP folder "
                                       "clip/ (needs transformers) for CLIP-IQA, the FID Inception weights "
                                       "pt_inception-2015-12-05-6726825d.pth (needs torch-fidelity) for FID "
                                       "against clean (2+ images in each)."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Markdown report: this run's metrics, why any "
                                                                "are missing, and every label in the results file."),
                io.Image.Output(display_name="plot", tooltip="clean | protected | purified | generated strip above "
                                                             "one bar chart per metric, one bar per label."),
            ],
            is_output_node=True,
            not_idempotent=True,  # each node appends its own row, even with inputs identical to another's
        )

    @classmethod
    def execute(cls, clean, label, filename_prefix, faces, patch_size, protected=None, purified=None,
                generated=None) -> io.NodeOutput:
        label = label.strip()
        if not label:
            raise ValueError("label: must name the run group, e.g. 'antipure' or 'advdm eta=8'")
        path_json, path_csv = results_paths(filename_prefix)
        host = {k: v for k, v in zip(GROUPS, (clean, protected, purified, generated)) if v is not None}
        _check_inputs(host)
        images, notes = {}, []
        for name, image in host.items():
            x, alpha = to_core(image, name)  # metrics run on the CPU (numpy/dlib backends)
            if image.shape[-1] == 1:
                notes.append(f"{name} is grayscale (replicated to RGB)")
            if alpha is not None:
                notes.append(f"{name}'s alpha channel is ignored")
            images[name] = x.cpu()
        weights_dir = weights_folder()
        row = evaluate(images["clean"], images.get("protected"), images.get("purified"), images.get("generated"),
                       patch_size=patch_size, weights_dir=weights_dir, faces=faces)
        if notes:
            row["notes"] = "; ".join(filter(None, [row.get("notes"), *notes]))
        row = {"time": datetime.now().isoformat(timespec="seconds"), **row}
        tables = append_results(path_json, path_csv, label, row)
        prefix = os.path.relpath(path_json[:-len(".json")], folder_paths.get_output_directory())
        report = report_markdown(label, row, tables, {k: _describe(v) for k, v in host.items()}, prefix,
                                 weights_dir)
        plot = to_host(evaluation_figure(list(images.items()), tables))
        # "metrics": one value per score, so the headless runner's results.csv gets a column each
        metrics = {k: str(v) for k, v in row.items() if k not in ("time", "notes")}
        return io.NodeOutput(report, plot, ui={**ui.PreviewText(report).as_dict(),
                                               **ui.PreviewImage(plot, cls=cls).as_dict(), "metrics": [metrics]})

"""Evaluate on the host: score one experiment, append it to a results table in the output folder, draw the comparison."""
from __future__ import annotations

import os
from datetime import datetime
from typing import Mapping

import torch

from ..antipure_core.metrics import append_results, evaluate, markdown_table
from ..antipure_core.metrics.plot import evaluation_figure, summarize
from ..antipure_core.metrics.report import format_value
from .comfy_host import folder_paths
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


def evaluate_run(clean, label, filename_prefix, faces, patch_size, protected=None, purified=None, generated=None):
    """The Evaluate node's work: score the IMAGE batches, append the row to the results file, draw the figure.

    Returns ``(markdown report, plot IMAGE, {metric: value as text})``.
    """
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
    # one value per score, so the headless runner's results.csv gets a column each
    metrics = {k: str(v) for k, v in row.items() if k not in ("time", "notes")}
    return report, plot, metrics

"""Tables, comparisons and figures of the testbed's results (Pillow only, no matplotlib)."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from antipure_core.metrics import markdown_table

from .experiment import CURVE, Settings

#: (column, what it means, higher is better for the protection?)
METRIC_DOC = [
    ("sample_gain", "RMSE of the samples to the clean-customized model's samples, minus the same for the "
                    "unprotected photos under the same purifier: the protection's own effect on what the attacker "
                    "gets", True),
    ("subject_drop", "ISM proxy: how much less the samples resemble the subject than those customized on the "
                     "unprotected photos under the same purifier (cosine similarity of coarse colour layout)", True),
    ("survival", "RMSE (1/255 levels) between the purified protected photos and the purified clean photos; the "
                 "`none` row is the purifier's own randomness (clean purified twice)", True),
    ("grid_residual", "grid-artifact score (8-px period) of the purified protected photos minus the purified clean "
                      "ones: a grid the protection leaves after purification", True),
    ("grid_purified", "grid-artifact score (8-px period) of the purified photos themselves", True),
    ("grid_generated", "grid-artifact score (8-px period) of the generated samples", True),
    ("hf_purified", "high-frequency energy ratio (8-px patches) of the purified photos", True),
    ("hf_generated", "high-frequency energy ratio (8-px patches) of the samples", True),
    ("subject_sim", "ISM proxy itself: best cosine similarity of a sample to a subject photo (lower = protected)",
     False),
]
METRICS = [m for m, _, _ in METRIC_DOC] + ["sample_dist", "psnr_protected", "protect_s", "objective_start",
                                           "objective_end"]


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sample s.d. over subjects for every (eta, method, purifier)."""
    keys = []
    for r in rows:
        k = (r["eta"], r["method"], r["purifier"])
        if k not in keys:
            keys.append(k)
    out = []
    for eta, method, pur in keys:
        cell = [r for r in rows if (r["eta"], r["method"], r["purifier"]) == (eta, method, pur)]
        agg = {"eta": eta, "method": method, "purifier": pur, "repeats": len(cell)}
        for m in METRICS:
            if all(m in r for r in cell):
                v = torch.tensor([r[m] for r in cell], dtype=torch.float64)
                agg[m] = float(v.mean())
                agg[m + "_sd"] = float(v.std()) if len(v) > 1 else float("nan")
        out.append(agg)
    return out


def _get(agg, eta, method, pur, metric):
    return next(a[metric] for a in agg if (a["eta"], a["method"], a["purifier"]) == (eta, method, pur))


def comparison(agg: list[dict], rows: list[dict], eta: int, purifiers, metric: str) -> list[dict]:
    """Per purifier: the best method, AntiPure's rank, AntiPure minus the best baseline paired over subjects."""
    higher = next((h for m, _, h in METRIC_DOC if m == metric), True)
    out = []
    for pur in purifiers:
        cells = [a for a in agg if a["eta"] == eta and a["purifier"] == pur and a["method"] != "none"]
        if not cells or metric not in cells[0]:
            continue
        cells.sort(key=lambda a: -a[metric] if higher else a[metric])
        order = [a["method"] for a in cells]
        entry = {"purifier": pur, "best": order[0]}
        baselines = [m for m in order if not m.startswith("antipure") and m != "random"]
        if "antipure" in order and baselines:
            best = baselines[0]
            val = lambda m: {r["subject"]: r[metric] for r in rows  # noqa: E731
                             if r["eta"] == eta and r["method"] == m and r["purifier"] == pur}
            a, b = val("antipure"), val(best)
            diff = torch.tensor([(a[k] - b[k]) * (1 if higher else -1) for k in a if k in b], dtype=torch.float64)
            entry.update({"antipure_rank": f"{order.index('antipure') + 1}/{len(order)}", "best_baseline": best,
                          "antipure_minus_best": fmt(float(diff.mean()), float(diff.std()) if len(diff) > 1
                                                     else float("nan")),
                          "antipure_ahead": f"{int((diff > 0).sum())}/{len(diff)}"})
        out.append(entry)
    return out


def fmt(mean: float, sd: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def metric_table(agg, eta: int, metric: str, purifiers) -> str:
    table = {}
    digits = 2 if metric == "survival" else 3
    for a in agg:
        if a["eta"] == eta and a["purifier"] in purifiers and metric in a:
            table.setdefault(a["method"], {})[a["purifier"]] = fmt(a[metric], a[metric + "_sd"], digits)
    return markdown_table(table, "method")


def curve_table(agg, eta: int, metric: str = "subject_sim") -> str:
    table = {}
    for a in agg:
        if a["eta"] == eta and (a["purifier"].startswith("gridpure@") or a["purifier"] == "gridpure") \
                and metric in a:
            k = CURVE[-1] if a["purifier"] == "gridpure" else int(a["purifier"].split("@")[1])
            table.setdefault(a["method"], {})[f"{k} it"] = fmt(a[metric], a[metric + "_sd"])
    for v in table.values():
        v_sorted = dict(sorted(v.items(), key=lambda kv: int(kv[0].split()[0])))
        v.clear()
        v.update(v_sorted)
    return markdown_table(table, "method")


def write_csv(path: Path, rows: list[dict]) -> Path:
    """``rows`` as CSV, one column per key any row has (in first-seen order)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def write_results(out_dir: Path, tag: str, rows: list[dict], s: Settings, meta: dict, etas) -> list[Path]:
    """``{tag}.csv`` (one line per subject and cell), ``{tag}.md`` (tables, comparisons, settings)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = write_csv(out_dir / f"{tag}.csv", rows), out_dir / f"{tag}.md"
    agg = aggregate(rows)
    subjects = sorted({r["subject"] for r in rows})
    lines = [f"# Testbed v2 results: {tag}", "",
             f"Repeats: {len(subjects)} held-out subjects {subjects} (seed = {s.seed} + 1000·subject); values are "
             "mean ± sample s.d. over subjects. Columns are the attacker's purifiers; `gridpure` = 2 rounds × 20 "
             "iterations.", "", f"Models: {meta.get('models', '')}", "",
             f"Run time: {meta.get('seconds', 0):.0f} s wall ({meta.get('cpu_seconds', 0):.0f} s CPU in the "
             f"workers), {meta.get('machine', '')}.", ""]
    for eta in etas:
        lines += [f"## η = {eta}/255", ""]
        for metric, what, higher in METRIC_DOC:
            if metric not in rows[0]:
                continue
            arrow = "higher" if higher else "lower"
            lines += [f"### {metric} ({arrow} = stronger protection)", "", what + ".", "",
                      metric_table(agg, eta, metric, s.purifiers), ""]
        for metric in ("sample_gain", "subject_drop", "survival", "grid_residual"):
            table = comparison(agg, rows, eta, s.purifiers, metric)
            if table:
                lines += [f"### Ranking by {metric}: AntiPure against the best baseline, paired by subject", "",
                          markdown_table(table), ""]
        if any(r["purifier"].startswith("gridpure@") for r in rows) and "subject_sim" in rows[0]:
            lines += ["### ISM-style curve: subject_sim after GrIDPure with 10/20/30/40 iterations "
                      "(lower = stronger protection)", "", curve_table(agg, eta), "",
                      "sample_gain over the same iterations:", "", curve_table(agg, eta, "sample_gain"), ""]
        psnr_row = {a["method"]: f"{a['psnr_protected']:.1f}" for a in agg
                    if a["eta"] == eta and a["purifier"] == "none"}
        time_row = {a["method"]: f"{a['protect_s']:.0f}" for a in agg if a["eta"] == eta and a["purifier"] == "none"}
        lines += ["### PSNR of the protected photos (dB) and seconds to protect 4 photos", "",
                  markdown_table([psnr_row, time_row]), ""]
    lines += ["## Settings", "", "```json", json.dumps(asdict(s), indent=1, default=str), "```", ""]
    md_path.write_text("\n".join(lines))
    return [md_path, csv_path]


def _label(draw, xy, text):
    draw.text(xy, text, fill="black")


def example_figure(examples: dict, methods, path: Path, purifier: str = "gridpure", scale: int = 2,
                   amplify: float = 8.0) -> Path:
    """One row per method: clean-purified, protected, purified, the residual (amplified), three samples.

    ``residual = amplify · (purified protected − purified clean) + ½``: a grid the protection leaves after
    purification shows here as a regular 8-px pattern.
    """
    rows = []
    for name in methods:
        prot, pur, pur_clean, samples = examples[(name, purifier)]
        resid = ((pur - pur_clean) * amplify + 0.5).clamp(0, 1)
        gap = torch.ones(3, prot.shape[-2], 3)
        rows.append(torch.cat([prot, gap, pur, gap, resid, gap, *[torch.cat([s, gap], -1) for s in samples]], -1))
    grid = torch.cat([torch.cat([r, torch.ones(3, 3, r.shape[-1])], -2) for r in rows], -2).clamp(0, 1)
    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    left, top = 118, 30
    canvas = Image.new("RGB", (img.width + left, img.height + top), "white")
    canvas.paste(img, (left, top))
    draw = ImageDraw.Draw(canvas)
    cell = (prot.shape[-1] + 3) * scale
    for j, head in enumerate(["protected", f"{purifier}", f"residual x{amplify:g}", "generated (3 samples)"]):
        _label(draw, (left + j * cell + 2, 8), head)
    row_h = (prot.shape[-2] + 3) * scale
    for i, name in enumerate(methods):
        _label(draw, (4, top + i * row_h + row_h // 2 - 6), name)
    canvas.save(path)
    return path


def curve_figure(agg: list[dict], eta: int, methods, path: Path, metric: str = "subject_sim") -> Path:
    """A small line chart: ``metric`` after 10/20/30/40 GrIDPure iterations, one line per method."""
    w, h, pad = 560, 320, 50
    img = Image.new("RGB", (w + 170, h), "white")
    d = ImageDraw.Draw(img)
    series = {}
    for m in methods:
        pts = []
        for k in CURVE:
            col = "gridpure" if k == CURVE[-1] else f"gridpure@{k}"
            try:
                pts.append(_get(agg, eta, m, col, metric))
            except StopIteration:
                pts = []
                break
        if pts:
            series[m] = pts
    if not series:
        return path
    lo = min(min(v) for v in series.values())
    hi = max(max(v) for v in series.values())
    hi = hi if hi > lo else lo + 1e-6
    X = lambda i: pad + i * (w - 2 * pad) / (len(CURVE) - 1)  # noqa: E731
    Y = lambda v: h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)  # noqa: E731
    d.line([(pad, h - pad), (w - pad, h - pad)], fill="black")
    d.line([(pad, pad), (pad, h - pad)], fill="black")
    for i, k in enumerate(CURVE):
        d.text((X(i) - 8, h - pad + 6), f"{k}", fill="black")
    d.text((w // 2 - 60, h - 20), "GrIDPure iterations", fill="black")
    higher = next((h for m, _, h in METRIC_DOC if m == metric), False)
    d.text((4, 8), f"{metric} (eta = {eta}/255; {'higher' if higher else 'lower'} = stronger protection)",
           fill="black")
    d.text((4, pad - 14), f"{hi:.3f}", fill="black")
    d.text((4, h - pad - 8), f"{lo:.3f}", fill="black")
    palette = ["#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf", "#aec7e8", "#98df8a"]
    for j, (m, pts) in enumerate(series.items()):
        c = palette[j % len(palette)]
        width = 3 if m == "antipure" else 1
        d.line([(X(i), Y(v)) for i, v in enumerate(pts)], fill=c, width=width)
        d.text((w + 10, 30 + 16 * j), m, fill=c)
    img.save(path)
    return path

"""Testbed v3's report: calibration, per-column effects with paired 95 % intervals, objectives, cost.

Every interval is Student's t over the units' paired differences (a unit = one crop of one held-out
photo with its own seed; the method and ``none``, or the method and the best baseline, share the
unit's photos, purifier noise, LoRA initialisation and sampling noise). A difference whose interval
contains 0 is reported as *unresolved*, never as an effect. The units are 3-4 crops of each of three
photos, so they are not fully independent: each table also says on how many of the three photos the
mean difference has the interval's sign.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from antipure_core.metrics import markdown_table

from .experiment import CURVE, Settings
from .paired import fmt_iv, paired, question_tables, resolved, t_interval, values
from .report import aggregate, curve_figure, write_csv

#: effect scores of the customized model (higher = stronger protection), and what each one is
EFFECTS = {
    "sample_gain": "RMSE of the samples to the clean-customized model's samples, minus the same for the "
                   "unprotected photos under the same purifier",
    "subject_drop": "how much less the samples resemble the subject (cosine similarity of 4x-pooled, "
                    "mean-centred images) than those customized on the unprotected photos",
    "brisque_gain": "BRISQUE of the samples (higher = worse quality; texture and grid artefacts raise it) minus "
                    "the same for the unprotected photos",
}
#: the pack's purified_advdm, one method per gradient route
PURIFIED = ("purified_advdm-one_step", "purified_advdm-k_step", "purified_advdm-full")
CANDIDATES = ("antipure", "antipure-pfg50", "oracle", *PURIFIED)


def _mean(v) -> float:
    v = list(v)
    return sum(v) / len(v) if v else math.nan


def _photo_signs(rows, iv: dict) -> str:
    """On how many photos the mean per-unit difference has the interval's mean's sign: e.g. '3/3'."""
    photo = {int(r["subject"]): r["photo"] for r in rows}
    by = {}
    for (unit, _), d in iv["diffs"].items():
        by.setdefault(photo[unit], []).append(d)
    sign = 1 if iv["mean"] >= 0 else -1
    return f"{sum(1 for v in by.values() if _mean(v) * sign > 0)}/{len(by)}"


def best_in(rows, eta: int, col: str, metric: str, methods) -> str:
    means = {m: _mean(v.values()) for m in methods if (v := values(rows, eta, m, col, metric))}
    return max(means, key=means.get)


def effect_table(rows, eta: int, col: str, methods) -> str:
    table = []
    for m in methods:
        if m == "none" or not values(rows, eta, m, col, "survival"):
            continue
        entry = {"method": m, "survival (1/255)": f"{_mean(values(rows, eta, m, col, 'survival').values()):.2f}"}
        for metric in EFFECTS:
            v = values(rows, eta, m, col, metric)
            if v:
                iv = {**t_interval(v.values()), "diffs": v}
                entry[metric] = f"{fmt_iv(iv)} {resolved(iv)}"
        table.append(entry)
    return markdown_table(table)


def glance_table(rows, eta: int, metric: str, methods, cols) -> str:
    """``metric``'s mean per method and column; ``*`` marks an interval above 0, ``(−)`` one below 0."""
    table = []
    for m in methods:
        if m == "none":
            continue
        entry = {"method": m}
        for col in cols:
            v = values(rows, eta, m, col, metric)
            if not v:
                entry[col] = ""
                continue
            iv = t_interval(v.values())
            mark = {"> 0": "*", "< 0": " (−)"}.get(resolved(iv), "")
            entry[col] = f"{iv['mean']:+.3f}{mark}"
        table.append(entry)
    return markdown_table(table)


def versus_best(rows, eta: int, col: str, baselines) -> str:
    table = []
    for metric in ("sample_gain", "subject_drop"):
        if not values(rows, eta, baselines[0], col, metric):
            continue
        best = best_in(rows, eta, col, metric, baselines)
        for m in CANDIDATES:
            mine = values(rows, eta, m, col, metric)
            if not mine:
                continue
            iv = paired(mine, values(rows, eta, best, col, metric))
            table.append({"score": metric, "method": m, "best baseline": best, "method − best": fmt_iv(iv),
                          "resolved": resolved(iv), "photos with that sign": _photo_signs(rows, iv)})
    return markdown_table(table) if table else ""


def survival_vs_advdm(rows, eta: int, methods) -> str:
    """Each method's survival after GrIDPure minus AdvDM's (same units), with its paired interval."""
    advdm = values(rows, eta, "advdm", "gridpure", "survival")
    table = []
    for m in methods:
        iv = paired(values(rows, eta, m, "gridpure", "survival"), advdm)
        table.append({"method": m, "survival − AdvDM's": fmt_iv(iv, 2), "resolved": resolved(iv)})
    return markdown_table(table)


def calibration_section(recs, meta) -> list[str]:
    out = ["## Calibration (measured in this run)", ""]
    cal = meta.get("calibration") or {}
    if cal:
        table = []
        for which, c in cal.items():
            row = {"purifier": which}
            row.update({f"PSNR after {k} (dB)": c.get(f"psnr@{k}") for k in (1, *CURVE)})
            row.update({"colour drift after 40 (1/255)": c.get(f"drift@{CURVE[-1]}"),
                        "η = 8/255 uniform noise kept": c.get("noise_kept")})
            table.append(row)
        out += ["GrIDPure (t* = 10, 32-px windows at stride 16, γ = 0.1) on the held-out subjects' clean views "
                "(4 each), `benchmarks/testbed/calibration.py`; noise kept = RMSE between the purified noisy and "
                "purified clean photos (same purifier noise) over the noise's RMSE:", "", markdown_table(table), ""]
    cols = sorted({c for r in recs for c in r["calibration"]})
    row = {c: f"{_mean(r['calibration'][c] for r in recs):.1f}" for c in cols}
    out += ["PSNR (dB) of each unit's clean photos after each purifier alone (mean over units):", "",
            markdown_table([row]), "", f"Customization model's VAE round trip on the held-out subjects' views at "
            f"this scale: {meta.get('vae_heldout_db')} dB PSNR.", ""]
    return out


def objective_section(recs) -> list[str]:
    out = ["## Each method's own objective", "",
           "Each term of the method's loss at the same seeded draws (4 samples) on the clean and on the protected "
           "photos, mean over units; and the PGD objective over its first and last 5 steps (each step draws its "
           "own t, noise and window; ASPL/SimAC's loop does not report one).", ""]
    table = []
    for m in recs[0]["terms"]:
        terms = {k[:-len("_clean")] for r in recs for k in r["terms"][m] if k.endswith("_clean")}
        cells = {t: f"{_mean(r['terms'][m][t + '_clean'] for r in recs):.4g} → "
                    f"{_mean(r['terms'][m][t + '_protected'] for r in recs):.4g}" for t in sorted(terms)}
        obj = [r["objectives"][m] for r in recs if r["objectives"].get(m)]
        pgd = (f"{_mean(o['objective_start'] for o in obj):.4g} → {_mean(o['objective_end'] for o in obj):.4g}"
               if obj else "")
        table.append({"method": m, "terms (clean → protected)": "; ".join(f"{k} {v}" for k, v in cells.items()),
                      "PGD objective (first → last 5 steps)": pgd})
    out += [markdown_table(table), ""]
    shares = [r["shares"] for r in recs if r["shares"]]
    if shares:
        table = []
        for m in shares[0]:
            s = {k: _mean(x[m][k] for x in shares) for k in shares[0][m]}
            table.append({"method": m, "λ₁ (mean over PGD steps)": f"{s['pfg_lambda']:.3g}",
                          **{k: f"{v:.3f}" for k, v in s.items() if k != "pfg_lambda"}})
        out += ["AntiPure's terms' shares of the gradient norm (sum of the terms' norms) and the fraction of "
                "pixels where each term's gradient has the total's sign, at the protected photos:", "",
                markdown_table(table), ""]
    return out


def write_report(out_dir: Path, tag: str, recs: list[dict], s: Settings, meta: dict) -> list[Path]:
    """``{tag}.md``, ``{tag}.csv`` (one line per unit and cell) and ``{tag}_survival.png``."""
    rows = [r for rec in recs for r in rec["rows"]]
    eta = round(s.eta * 255)
    csv_path, md_path = write_csv(out_dir / f"{tag}.csv", rows), out_dir / f"{tag}.md"
    methods = list(dict.fromkeys(r["method"] for r in rows))
    baselines = [m for m in ("random", "advdm", "mist", "photoguard", "sds", "aspl", "simac") if m in methods]
    cols = list(dict.fromkeys(r["purifier"] for r in rows if not r["purifier"].startswith("gridpure@")))
    n = len(recs)
    cpu = sum(r["cpu_s"] for r in recs)
    units = ", ".join(f"{r['subject']} {tuple(r['shift'])}" for r in recs)
    lines = [f"# Testbed v3: {tag}", "",
             f"`{meta['command']}` — {n} units ({units}), "
             f"η = {eta}/255, {s.pgd_steps} PGD steps, common random numbers in every purifier. "
             f"Wall time {meta['wall_s']} s ({meta.get('invocations', 1)} invocation(s) that ran units); "
             f"{cpu:.0f} CPU s in the units "
             f"({cpu / max(n, 1):.0f} s a unit); {meta['machine']}.", "",
             __doc__.split("\n\n", 1)[1].strip(), ""]
    lines += calibration_section(recs, meta)
    lines += ["## At a glance", ""]
    for metric in ("sample_gain", "subject_drop"):
        lines += [f"**{metric}** by attacker column (mean over units; `*`: the 95 % paired interval is above 0, "
                  "`(−)`: below 0; details below):", "", glance_table(rows, eta, metric, methods, cols), ""]
    lines += ["## Effects on the customized model, by attacker column", "",
              "Each cell: mean over units [95 % paired t interval] and whether it excludes 0. "
              + " ".join(f"**{k}**: {v}." for k, v in EFFECTS.items()) + " Survival: RMSE (1/255) between the "
              "purified protected and purified clean photos (same noise).", ""]
    for col in cols:
        lines += [f"### {col}", "", effect_table(rows, eta, col, methods), ""]
        vs = versus_best(rows, eta, col, baselines)
        if vs:
            lines += [f"Against the best baseline under {col} (by mean; paired by unit):", "", vs, ""]
    agg = aggregate(rows)
    def survival_at(m, k):
        col = "gridpure" if k == CURVE[-1] else f"gridpure@{k}"
        return f"{_mean(values(rows, eta, m, col, 'survival').values()):.2f}"
    curve = [{"method": m, **{f"after {k}": survival_at(m, k) for k in CURVE}} for m in methods if m != "none"]
    fig = curve_figure(agg, eta, [m for m in methods if m != "none"], out_dir / f"{tag}_survival.png", "survival")
    lines += ["## Survival over GrIDPure iterations (1/255, common random numbers)", "", markdown_table(curve), "",
              f"![survival]({fig.name})", ""]
    if any(m in methods for m in PURIFIED):
        lines += ["## purified_advdm: the issue-27 questions", "",
                  question_tables(rows, eta, [m for m in PURIFIED if m in methods], baselines), ""]
        if "advdm" in methods:
            lines += ["#### survival after GrIDPure 2 × 20 (1/255), minus AdvDM's: what the purified term buys", "",
                      survival_vs_advdm(rows, eta, [m for m in PURIFIED if m in methods]), ""]
    lines += objective_section(recs)
    cost = {m: f"{_mean(r['protect_s'] for r in rows if r['method'] == m and r['purifier'] == 'none'):.0f}"
            for m in methods}
    lines += ["## Seconds to protect 4 photos (one thread)", "", markdown_table([cost]), "",
              "## Settings", "", "```json",
              json.dumps({**asdict(s), "methods": methods, "unknown_purifier": meta["unknown"]}, indent=1,
                         default=str), "```", ""]
    md_path.write_text("\n".join(lines))
    return [md_path, csv_path, fig]

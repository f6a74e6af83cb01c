"""Paired 95 % intervals over subjects, and the purified-attack question of issue 27, from testbed CSVs.

Every comparison pairs two methods' rows of the same subject (and seed) at one budget and one purifier column;
the interval is Student's t on the per-subject differences (n − 1 degrees of freedom). With n = 3 subjects,
t(0.975, 2) = 4.30, so the half-width is 2.5 standard deviations of the differences: only a difference that is
large *and* consistent across the three subjects is resolved (its interval excludes 0).

    python -m benchmarks.testbed.paired results/purified_v2.csv            # the tables, markdown on stdout
    python -m benchmarks.testbed.paired a.csv b.csv --merge out.csv        # join per-subject runs first
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Iterable

from antipure_core.metrics import markdown_table

from .report import aggregate, fmt, metric_table

#: Student's t 97.5 % quantile by degrees of freedom (two-sided 95 % interval)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}
#: columns the purified methods attack (GrIDPure on the testbed's ADM) and the ones they do not
ATTACKED = "gridpure"
UNSEEN = ("gridpure-unknown", "jpeg", "noisy_upscale", "gridpure+jpeg")
#: the testbed's effect scores (higher = stronger protection)
EFFECTS = ("sample_gain", "subject_drop")


def t_quantile(df: int) -> float:
    """t(0.975, df) from :data:`T975` (the next smaller tabulated df above 10, conservative; 1.96 beyond 30)."""
    if df < 1:
        return math.nan
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


def t_interval(diffs: Iterable[float]) -> dict:
    """Mean and 95 % Student-t interval of paired differences: ``{n, mean, lo, hi, sd}`` (NaN bounds for n < 2)."""
    d = [float(v) for v in diffs]
    n = len(d)
    mean = sum(d) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else math.nan
    half = t_quantile(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd}


def resolved(iv: dict) -> str:
    """``'> 0'`` or ``'< 0'`` when the interval excludes 0, else ``'unresolved'``."""
    if iv["lo"] > 0:
        return "> 0"
    if iv["hi"] < 0:
        return "< 0"
    return "unresolved"


def values(rows: list[dict], eta: int, method: str, purifier: str, metric: str) -> dict[tuple, float]:
    """``{(subject, seed): value}`` of one cell."""
    return {(int(r["subject"]), int(r["seed"])): float(r[metric]) for r in rows
            if int(r["eta"]) == eta and r["method"] == method and r["purifier"] == purifier}


def paired(a: dict[tuple, float], b: dict[tuple, float], b_scale: float = 1.0) -> dict:
    """Interval of ``a − b_scale · b`` over the keys both have, and the per-key differences (``'diffs'``)."""
    keys = sorted(set(a) & set(b))
    diffs = {k: a[k] - b_scale * b[k] for k in keys}
    return {**t_interval(diffs.values()), "diffs": diffs}


def best_baseline(rows: list[dict], eta: int, purifier: str, metric: str, baselines: Iterable[str]) -> str:
    """The baseline with the highest mean ``metric`` under ``purifier`` (ties: the first)."""
    means = {m: sum(v.values()) / len(v) for m in baselines if (v := values(rows, eta, m, purifier, metric))}
    return max(means, key=means.get)


def fmt_iv(iv: dict, digits: int = 3) -> str:
    return f"{iv['mean']:+.{digits}f} [{iv['lo']:+.{digits}f}, {iv['hi']:+.{digits}f}]"


def fmt_diffs(iv: dict, digits: int = 3) -> str:
    return " / ".join(f"{v:+.{digits}f}" for v in iv["diffs"].values())


def question_tables(rows: list[dict], eta: int, methods: list[str], baselines: list[str],
                    unseen: Iterable[str] = UNSEEN) -> str:
    """Issue 27's two questions for each method in ``methods``, per effect score, as markdown.

    1. ``method − best baseline`` under GrIDPure (the best by mean under GrIDPure in these rows);
    2. for each unseen column, ``effect(unseen) − ½ · effect(GrIDPure)``: > 0 when at least half of the effect
       through the attacked purifier holds under one the method never saw.
    """
    cols = sorted({r["purifier"] for r in rows})
    out = []
    for metric in EFFECTS:
        best = best_baseline(rows, eta, ATTACKED, metric, baselines)
        table = []
        for m in methods:
            mine = values(rows, eta, m, ATTACKED, metric)
            iv = paired(mine, values(rows, eta, best, ATTACKED, metric))
            entry = {"method": m, f"{metric} after GrIDPure": fmt_iv(t_interval(mine.values())),
                     f"minus {best} (best baseline)": fmt_iv(iv), "per subject": fmt_diffs(iv),
                     "resolved": resolved(iv)}
            table.append(entry)
        out += [f"#### {metric}: after GrIDPure 2 × 20, against the best baseline ({best}), η = {eta}/255", "",
                markdown_table(table), ""]
        table = []
        for m in methods + [best]:
            g = values(rows, eta, m, ATTACKED, metric)
            for col in (c for c in unseen if c in cols):
                u = values(rows, eta, m, col, metric)
                if not u:  # a column this method's run did not have
                    continue
                iv = paired(u, g, 0.5)
                vs = paired(u, values(rows, eta, best, col, metric))
                versus = ("" if m == best else f"{fmt_iv(vs)} ({resolved(vs)})" if vs["n"] > 1
                          else f"– ({best} not run there)")
                table.append({"method": m, "column": col, f"{metric} there": fmt_iv(t_interval(u.values())),
                              "minus ½ · GrIDPure's": fmt_iv(iv), "per subject": fmt_diffs(iv),
                              "resolved": resolved(iv), f"minus {best} there": versus})
        out += [f"#### {metric}: does at least half of the GrIDPure effect hold under unseen purifiers? "
                f"η = {eta}/255", "", markdown_table(table), ""]
    return "\n".join(out)


def _number(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def merge(paths: list[Path]) -> list[dict]:
    """Rows of several runs, numbers parsed; a ``none`` row repeated by a later run (same subject, eta, column)
    is dropped (each run's ``sample_gain``/``subject_drop`` are already relative to its own ``none`` rows)."""
    rows, seen = [], set()
    for p in paths:
        with Path(p).open() as f:
            for r in csv.DictReader(f):
                key = (r["subject"], r["eta"], r["method"], r["purifier"])
                if key in seen:
                    continue
                seen.add(key)
                rows.append({k: _number(v) for k, v in r.items() if v != ""})
    return rows


def summary_tables(rows: list[dict], eta: int) -> str:
    """Mean ± s.d. over subjects of the effect scores and survival by method × column, and the objectives."""
    agg = aggregate(rows)
    purifiers = list(dict.fromkeys(r["purifier"] for r in rows))
    out = []
    for metric in (*EFFECTS, "survival"):
        out += [f"#### {metric} (mean ± s.d. over subjects), η = {eta}/255", "",
                metric_table(agg, eta, metric, purifiers), ""]
    obj = {a["method"]: {"objective first 5 steps": fmt(a["objective_start"], a["objective_start_sd"], 4),
                         "last 5 steps": fmt(a["objective_end"], a["objective_end_sd"], 4),
                         "seconds to protect 4 photos": f"{a['protect_s']:.0f}"}
           for a in agg if a["eta"] == eta and a["purifier"] == "none" and "objective_start" in a}
    if obj:
        out += [f"#### The purified methods' own objective (PGD loss, mean ± s.d. over subjects), η = {eta}/255", "",
                markdown_table(obj, "method"), ""]
    return "\n".join(out)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description="paired 95 % intervals of testbed results (issue 27's questions)")
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--merge", type=Path, help="write the joined rows here first")
    ap.add_argument("--eta", type=int, nargs="+", default=[16])
    a = ap.parse_args(argv)
    rows = merge(a.csv)
    if a.merge:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with a.merge.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    names = list(dict.fromkeys(r["method"] for r in rows))
    methods = [m for m in names if m.startswith("purified_")]
    baselines = [m for m in names if m != "none" and m not in methods]
    text = "\n".join(summary_tables(rows, eta) + "\n" + question_tables(rows, eta, methods, baselines)
                     for eta in a.eta if any(int(r["eta"]) == eta for r in rows))
    print(text)
    return text


if __name__ == "__main__":
    main()

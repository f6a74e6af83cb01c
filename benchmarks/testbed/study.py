"""Why AntiPure does (not) win in the testbed: its open parameters varied one at a time, through GrIDPure.

Each variant changes one of AntiPure's open choices (DESIGN §1.1) from the
testbed's default (t^p = 10, λ₁ = λ₂ = 0.5, s = 8, t_err = t + t^p, all windows,
50 PGD steps) and runs the same pipeline as :mod:`.run`, limited to the
``none`` and ``gridpure`` (2 × 20) columns::

    python -m benchmarks.testbed.study                 # η = 16/255: writes results/study_eta16.md / .csv
    python -m benchmarks.testbed.study --eta 8
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import time
from dataclasses import replace
from pathlib import Path

import torch

from antipure_core.metrics import markdown_table

from .data import SUBJECTS, subject_views
from .experiment import Settings, Variant, run_job
from .purifier import PurifierConfig
from .report import aggregate, comparison, fmt
from .run import CACHE_DIR, MODELS_DIR, QUICK_PURIFIER, QUICK_SETTINGS, QUICK_TRAIN, RESULTS_DIR, load_models
from .train import TrainConfig

#: name -> (method, Settings overrides); the baselines that won in the main tables ride along for comparison
VARIANTS: dict[str, Variant] = {
    "antipure": ("antipure", {}),
    "t^p=5": ("antipure", {"t_purify": 5}),
    "t^p=20": ("antipure", {"t_purify": 20}),
    "t^p=50": ("antipure", {"t_purify": 50}),
    "λ1=5": ("antipure", {"pfg_weight": 5.0}),
    "λ1=50": ("antipure", {"pfg_weight": 50.0}),
    "λ2=5": ("antipure", {"etg_weight": 5.0}),
    "s=4": ("antipure", {"pfg_patch": 4}),
    "s=16": ("antipure", {"pfg_patch": 16}),
    "t_err=2(t+1)-1": ("antipure", {"etg_rule": "scale"}),
    "steps=150": ("antipure", {"pgd_steps": 150}),
    "random window": ("antipure", {"window_mode": "random"}),
}
METRICS = ("survival", "grid_residual", "sample_gain", "subject_drop", "grid_generated")


def _job(args):
    subject_idx, s, train, pur, models_dir, variants = args
    torch.set_num_threads(1)
    ldm, _, adm, _ = load_models(train, pur, Path(models_dir), verbose=False)
    name = list(SUBJECTS)[subject_idx]
    views = subject_views(name, n=2 * s.num_photos)
    log = lambda msg: print(f"[study {name}] {msg.strip()}", flush=True)  # noqa: E731
    return run_job(ldm, adm, views[:s.num_photos], views[s.num_photos:], subject_idx, s, log=log,
                   variants=variants)[0]


def write_study(out_dir: Path, tag: str, rows: list[dict], s: Settings, variants: dict, seconds: float) -> Path:
    agg = aggregate(rows)
    eta = rows[0]["eta"]
    subjects = sorted({r["subject"] for r in rows})
    lines = [f"# AntiPure variants through GrIDPure 2 × 20 (η = {eta}/255)", "",
             f"{len(subjects)} subjects {subjects}; mean ± s.d. over subjects; {seconds:.0f} s wall. Each variant "
             "changes one setting of the default `antipure` row; `none` is the clean photos (its survival is "
             "GrIDPure's own randomness).", ""]
    for pur in s.purifiers:
        table = {}
        for a in agg:
            if a["purifier"] == pur:
                table[a["method"]] = {m: fmt(a[m], a[m + "_sd"], 2 if m == "survival" else 3)
                                      for m in METRICS if m in a}
        lines += [f"## purifier: {pur}", "", markdown_table(table, "variant"), ""]
    for metric in ("sample_gain", "survival"):
        best = comparison(agg, rows, eta, ["gridpure"], metric)
        if best:
            lines += [f"Best by {metric} under GrIDPure: {best[0]['best']}.", ""]
    lines += ["## Variants", "", markdown_table([{"variant": k, "method": v[0], "overrides": str(v[1])}
                                                 for k, v in variants.items()]), ""]
    path = out_dir / f"{tag}.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--eta", type=int, default=16, help="budget in 1/255 (default 16)")
    ap.add_argument("--subjects", nargs="+", choices=list(SUBJECTS))
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all")
    ap.add_argument("--baselines", nargs="*", default=["aspl", "photoguard"], help="baselines run alongside")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    variants = {k: VARIANTS[k] for k in (a.variants or VARIANTS)}
    base = Settings(**QUICK_SETTINGS) if a.quick else Settings()
    s = replace(base, eta=a.eta / 255, purifiers=("none", "gridpure"), curve=False,
                methods=tuple(["none", *a.baselines, *variants]))
    train, pur = (QUICK_TRAIN, QUICK_PURIFIER) if a.quick else (TrainConfig(), PurifierConfig())
    models_dir = CACHE_DIR / "quick" if a.quick else MODELS_DIR
    load_models(train, pur, models_dir, verbose=True)  # trains (once) before the workers start
    subjects = a.subjects or (list(SUBJECTS)[:1] if a.quick else list(SUBJECTS))
    # one job per subject and half of the variants, so two workers stay busy
    names = list(variants)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    jobs = []
    for subj in subjects:
        for k, half in enumerate(halves):
            extra = a.baselines if k == 0 else []
            methods = tuple(["none", *extra, *half])
            jobs.append((list(SUBJECTS).index(subj), replace(s, methods=methods), train, pur, str(models_dir),
                         variants))
    with mp.get_context("spawn").Pool(max(1, a.workers)) as pool:
        parts = pool.map(_job, jobs, chunksize=1)
    rows = []
    for part in parts:  # `none` appears in both halves of a subject (same seed, same numbers): keep it once
        rows += [r for r in part if not (r["method"] == "none" and any(
            q["method"] == "none" and q["subject"] == r["subject"] and q["purifier"] == r["purifier"] for q in rows))]
    out_dir = a.out or (CACHE_DIR / "quick" if a.quick else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"study_eta{a.eta}"
    with (out_dir / f"{tag}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    path = write_study(out_dir, tag, rows, s, variants, time.perf_counter() - t0)
    print(path.read_text(), flush=True)
    return path


if __name__ == "__main__":
    main()

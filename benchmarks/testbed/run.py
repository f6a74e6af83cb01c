"""Testbed v2: protect -> purify (pixel DDPM) -> LoRA-customize (separate LDM) -> sample -> score, at 64 px.

One command trains (or loads) both models, then runs three phases, each
spread over the workers (one torch thread each): protect every (subject,
budget); purify every image in two equal batches (GrIDPure dominates the
cost, so it is balanced by image count, not by job); customize and score
every (subject, budget)::

    python -m benchmarks.testbed.run                  # full run, writes benchmarks/testbed/results/
    python -m benchmarks.testbed.run --quick          # minutes; a plumbing check, numbers meaningless

See ``benchmarks/testbed/README.md`` for the design and the verdict.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from .data import SUBJECTS, subject_views
from .experiment import ALL_PURIFIERS, METHODS, Settings, protect_job, purify_all, score_job
from .purifier import PurifierConfig, build_purifier
from .report import aggregate, curve_figure, example_figure, write_results
from .train import CACHE_DIR, MODELS_DIR, TrainConfig, build_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"

QUICK_SETTINGS = dict(pgd_steps=4, lora_steps=4, num_samples=3, sample_steps=3, gridpure_iterations=2,
                      diffpure_t_star=4, sdedit_steps=2, surrogate_attack_steps=2, surrogate_train_steps=1)
QUICK_TRAIN = TrainConfig(crops=256, vae_steps=40, unet_steps=40)
QUICK_PURIFIER = PurifierConfig(steps=40, crops=256)


def load_models(train: TrainConfig, pur: PurifierConfig, models_dir: Path, verbose: bool = True):
    ldm, ldm_info = build_model(train, cache_dir=models_dir, verbose=verbose)
    adm, adm_info = build_purifier(pur, cache_dir=models_dir, verbose=verbose)
    return ldm, ldm_info, adm, adm_info


def unknown_config(pur: PurifierConfig, s: Settings) -> PurifierConfig:
    """The ``gridpure-unknown`` column's purifier: the attacked one's config with another training seed."""
    return replace(pur, seed=s.unknown_purifier_seed)


def _train_one(which: str, cfg, models_dir: str) -> dict:
    torch.set_num_threads(1)
    build = build_model if which == "ldm" else build_purifier
    return build(cfg, cache_dir=models_dir)[1]


def _worker_models(train, pur, models_dir):
    torch.set_num_threads(1)
    ldm, _, adm, _ = load_models(train, pur, Path(models_dir), verbose=False)
    return ldm, adm


def _views(subject_idx: int, s: Settings):
    views = subject_views(list(SUBJECTS)[subject_idx], n=2 * s.num_photos)
    return views[:s.num_photos], views[s.num_photos:]  # set B (protected), set A (ASPL/SimAC's clean set)


def _log(subject_idx: int, s: Settings):
    tag = f"[{list(SUBJECTS)[subject_idx]} η={s.eta * 255:.0f}]"
    return lambda msg: print(f"{tag} {msg.strip()}", flush=True)


def _protect(args):
    subject_idx, s, train, pur, models_dir = args
    t0 = time.process_time()
    ldm, adm = _worker_models(train, pur, models_dir)
    photos, set_a = _views(subject_idx, s)
    objectives = {}
    protected, seconds = protect_job(ldm, adm, photos, set_a, subject_idx, s, _log(subject_idx, s),
                                     objectives=objectives)
    return protected, seconds, time.process_time() - t0, objectives


def _purify(args):
    k, images, s, train, pur, models_dir = args
    t0 = time.process_time()
    ldm, adm = _worker_models(train, pur, models_dir)
    unknown = (build_purifier(unknown_config(pur, s), cache_dir=models_dir, verbose=False)[0]
               if "gridpure-unknown" in s.purifiers else None)
    # with common random numbers both batches draw the same noise, so every set's photo k sees the same
    out = purify_all(images, ldm, adm, s, seed=s.seed + 500_000 + (0 if s.common_noise else k),
                     log=lambda m: print(f"[purify batch {k}] {m.strip()}", flush=True), unknown=unknown)
    return out, time.process_time() - t0


def _score(args):
    subject_idx, s, train, pur, models_dir, protected, purified, seconds, objectives = args
    t0 = time.process_time()
    ldm, _ = _worker_models(train, pur, models_dir)
    photos, _ = _views(subject_idx, s)
    rows, examples = score_job(ldm, photos, subject_idx, s, protected, purified, seconds, _log(subject_idx, s),
                               objectives=objectives)
    return rows, examples, time.process_time() - t0


def purify_jobs(protected: list[dict], jobs: list[tuple], pool, s: Settings, common: tuple) -> tuple[list[dict], float]:
    """Purify the clean photos of each subject (once, twice over: ``clean`` and ``none``) and every protected
    set, in two batches of equal size; returns, per job, ``{column: {'clean'|method: images}}``, and the CPU seconds."""
    def key(j, name):  # the clean photos do not depend on the budget: purified once per subject
        return (jobs[j][0], None if name in ("clean", "none") else j, name)

    slot, groups = {}, []
    for j, (job, prot) in enumerate(zip(jobs, protected)):
        for name in ["clean", *job[1].methods]:
            if key(j, name) not in slot:
                slot[key(j, name)] = len(groups)
                groups.append(prot["none"] if name == "clean" else prot[name])
    images = torch.cat(groups)
    n = groups[0].shape[0]
    half = (len(groups) + 1) // 2 * n
    batches = [images[:half], images[half:]]
    results = pool.map(_purify, [(k, b, s, *common) for k, b in enumerate(batches)], chunksize=1)
    chunks = {col: torch.cat([r[0][col] for r in results]).split(n) for col in results[0][0]}
    out = [{col: {name: c[slot[key(j, name)]] for name in ["clean", *job[1].methods]} for col, c in chunks.items()}
           for j, job in enumerate(jobs)]
    return out, sum(r[1] for r in results)


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description="AntiPure testbed v2 (protect -> purify -> customize -> score)")
    ap.add_argument("--quick", action="store_true", help="tiny version: a few steps, one subject, tiny training")
    ap.add_argument("--eta", type=int, nargs="+", default=[8, 16], help="budgets in 1/255 (default 8 16)")
    ap.add_argument("--subjects", nargs="+", choices=list(SUBJECTS), help="held-out subjects (default: all)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS),
                    help="methods to run ('none' is always added; default: v2's eleven)")
    ap.add_argument("--purifiers", nargs="+", choices=list(ALL_PURIFIERS),
                    help="attacker columns (default: v2's none gridpure diffpure sdedit-ldm)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override a Settings field, e.g. t_purify=20 pfg_weight=5")
    ap.add_argument("--workers", type=int, default=2, help="parallel jobs, one torch thread each (default 2)")
    ap.add_argument("--models", type=Path, default=None,
                    help="where trained weights are read/cached (default: the committed models/)")
    ap.add_argument("--out", type=Path, help="results folder (default results/, or cache/quick/ with --quick)")
    ap.add_argument("--tag", default="testbed_v2")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    s = Settings(**QUICK_SETTINGS) if a.quick else Settings()
    train, pur = (QUICK_TRAIN, QUICK_PURIFIER) if a.quick else (TrainConfig(), PurifierConfig())
    if a.methods:
        s.methods = tuple(["none"] + [m for m in a.methods if m != "none"])
    if a.purifiers:
        s.purifiers = tuple(a.purifiers)
    for kv in a.set:
        key, value = kv.split("=", 1)
        if not hasattr(s, key) or key in ("methods", "purifiers"):
            raise SystemExit(f"--set: unknown setting {key!r}")
        old = getattr(s, key)
        setattr(s, key, (value.lower() in ("1", "true", "yes")) if isinstance(old, bool) else type(old)(value))
    subjects = a.subjects or (list(SUBJECTS)[:1] if a.quick else list(SUBJECTS))
    models_dir = a.models or (CACHE_DIR / "quick" if a.quick else MODELS_DIR)
    out_dir = a.out or (CACHE_DIR / "quick" if a.quick else RESULTS_DIR)
    ctx = mp.get_context("spawn")
    workers = max(1, min(a.workers, os.cpu_count() or 1))

    # both models train at once, one per core (each is cached, keyed by its config); the unknown purifier if asked
    todo = [("ldm", train, str(models_dir)), ("purifier", pur, str(models_dir))]
    if "gridpure-unknown" in s.purifiers:
        todo.append(("purifier", unknown_config(pur, s), str(models_dir)))
    with ctx.Pool(min(workers, 2)) as pool:
        infos = pool.starmap(_train_one, todo)
    ldm_info, adm_info = infos[:2]
    models = (f"TinyLDM (64 px, VAE ×8, VAE PSNR {ldm_info.get('vae_psnr_db', '?')} dB); pixel ADM purifier "
              f"(32 px, one-step x̂₀ at t = 10: {adm_info.get('psnr_at_t10', '?')}); "
              + ("loaded from " + str(models_dir) if ldm_info.get("cached") and adm_info.get("cached")
                 else f"trained in {time.perf_counter() - t_start:.0f} s"))
    print(models, flush=True)

    common = (train, pur, str(models_dir))
    jobs = [(list(SUBJECTS).index(subj), replace(s, eta=eta / 255)) for eta in a.eta for subj in subjects]
    with ctx.Pool(min(workers, len(jobs))) as pool:
        prot = pool.map(_protect, [(*job, *common) for job in jobs], chunksize=1)
        print(f"protected in {time.perf_counter() - t_start:.0f} s", flush=True)
        purified, cpu_purify = purify_jobs([p[0] for p in prot], jobs, pool, s, common)
        print(f"purified in {time.perf_counter() - t_start:.0f} s", flush=True)
        results = pool.map(_score, [(*job, *common, p[0], pur_, p[1], p[3])
                                    for job, p, pur_ in zip(jobs, prot, purified)],
                           chunksize=1)
    rows = [r for res in results for r in res[0]]
    cpu = sum(res[2] for res in results) + sum(p[2] for p in prot) + cpu_purify
    meta = {"models": models, "seconds": time.perf_counter() - t_start, "cpu_seconds": cpu,
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                       f"{workers} worker(s) x 1 thread"}
    written = write_results(out_dir, a.tag, rows, s, meta, a.eta)
    # everything the figures need, so they can be redrawn without re-running (cache/ is not committed)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"rows": rows, "examples": [r[1] for r in results], "jobs": [(j[0], j[1].eta) for j in jobs]},
               CACHE_DIR / f"{a.tag}_last_run.pt")
    agg = aggregate(rows)
    drawn = set()
    for (_, js), (_, examples, _) in zip(jobs, results):
        e = round(js.eta * 255)
        if e not in drawn:  # the first subject's examples per budget
            drawn.add(e)
            written.append(example_figure(examples, s.methods, out_dir / f"{a.tag}_eta{e}_examples.png"))
    if s.curve and "gridpure" in s.purifiers:
        for eta in a.eta:
            written.append(curve_figure(agg, eta, s.methods, out_dir / f"{a.tag}_eta{eta}_curve.png"))
    print(f"total {time.perf_counter() - t_start:.0f} s wall, {cpu:.0f} s CPU in the jobs; wrote "
          + ", ".join(str(p) for p in written), flush=True)
    return written


if __name__ == "__main__":
    main()

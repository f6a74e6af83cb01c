"""Testbed v3: a calibrated purifier, ten paired units, every attacker column, each method's own objective.

One *unit* is a held-out subject at one crop of its photo (:data:`UNITS`; the photos at
:data:`~.data.V3_SCALE`), with its own seed. A unit runs end to end in one worker (one torch
thread): protect with every method of :data:`V3_METHODS` at η; log each method's own loss terms on
the clean and on the protected photos (and AntiPure's gradient shares); purify the clean photos and
every protected set in one batch with common random numbers (photo k of every set sees the same
purifier noise, so ``none`` is the clean photos' own purification and survival's floor is 0);
LoRA-customize the testbed's LDM on every cell, sample from the same noise, score. Units are written
as they finish (``results/v3_units/``) and a rerun skips the ones done with the same settings, so a
long run can be stopped and resumed; the report is rebuilt from whatever units exist::

    python -m benchmarks.testbed.v3                      # full run (committed models), then the report
    python -m benchmarks.testbed.v3 --quick              # plumbing check in minutes (numbers meaningless)
    python -m benchmarks.testbed.v3 --report-only        # rebuild results/testbed_v3.md from the units
    python -m benchmarks.testbed.v3 --purifier-weights my-purifier.safetensors   # evaluate against another
    python -m benchmarks.testbed.v3 --methods none purified_advdm-k_step   # add a method to the stored units
    python -m benchmarks.testbed.v3 --eta 8 --units 0 7 --methods none advdm sds   # another budget, a subset

The attacked purifier is :class:`~.purifier.CalibratedPurifierConfig`'s; the ``gridpure-unknown``
column runs GrIDPure 2 × 20 on :class:`~.purifier.UnknownPurifierConfig`'s (another seed; no method
attacks it), or on ``--purifier-weights``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from antipure_core.frequency import FrequencyGuidance
from antipure_core.metrics import psnr
from antipure_core.metrics.quality import brisque
from antipure_core.protect import term_gradients
from antipure_core.timestep import TimestepGuidance

from . import calibration
from .data import V3_SCALE, subject_views
from .experiment import (CURVE, Settings, _gridpure_2x20, customize_and_sample, instance_cond, method_objective,
                         objective_summary, protect_photos, purified_scores, purify_all, sample_scores)
from .purifier import CalibratedPurifierConfig, UnknownPurifierConfig, build_purifier
from .train import MODELS_DIR, TrainConfig, build_model, heldout_vae_psnr
from .v3_report import PURIFIED, write_report

RESULTS_DIR = Path(__file__).resolve().parent / "results"
UNITS_DIR = RESULTS_DIR / "v3_units"

#: the baselines, AntiPure as published and with PFG given half the gradient, the oracle on the purifier,
#: and the pack's purified_advdm (one-step and full-chain routes)
BASELINES = ("random", "advdm", "mist", "photoguard", "sds", "aspl", "simac")
V3_METHODS = ("none", *BASELINES, "antipure", "antipure-pfg50", "oracle", *PURIFIED)
#: PFG carries 50 % of the gradient (the published λ₁ = 0.5 gives it ~1 %: see the report's term shares)
VARIANTS = {"antipure-pfg50": ("antipure", {"pfg_share": 0.5})}
V3_PURIFIERS = ("none", "gridpure", "diffpure", "sdedit-ldm", "jpeg", "noisy_upscale", "gridpure+jpeg")
#: the unknown purifier costs a GrIDPure 2 × 20 per set: run on the methods a verdict needs
UNKNOWN_METHODS = ("none", "random", "advdm", "mist", "aspl", "antipure", "antipure-pfg50", "oracle", *PURIFIED)
#: (subject, centre shift as fractions of the photo): ten units, three photos, 3-4 crops each
UNITS = (("astronaut", (0.0, 0.0)), ("astronaut", (0.08, -0.08)), ("astronaut", (-0.06, 0.08)),
         ("astronaut", (0.08, 0.08)), ("chelsea", (0.0, 0.0)), ("chelsea", (0.08, -0.08)),
         ("chelsea", (-0.06, 0.08)), ("coffee", (0.0, 0.0)), ("coffee", (0.08, -0.08)), ("coffee", (-0.06, 0.08)))
V3_SETTINGS = dict(eta=16 / 255, common_noise=True, curve=False, methods=V3_METHODS,
                   purifiers=V3_PURIFIERS + ("gridpure-unknown",))
QUICK = dict(pgd_steps=3, lora_steps=3, num_samples=2, sample_steps=2, gridpure_iterations=2, diffpure_t_star=3,
             sdedit_steps=2, surrogate_attack_steps=1, surrogate_train_steps=1)


def unit_views(unit: int, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit ``unit``'s protected photos and ASPL/SimAC's clean set A (the next ``num_photos`` views)."""
    name, shift = UNITS[unit]
    views = subject_views(name, n=2 * s.num_photos, scale=V3_SCALE, shift=shift)
    return views[:s.num_photos], views[s.num_photos:]


def unit_seed(s: Settings, unit: int) -> int:
    return s.seed + 1000 * unit


def settings_key(s: Settings, unknown: str) -> str:
    """The unit files' key: every setting but the method list (a rerun with more methods adds them to the units)."""
    blob = json.dumps({**asdict(s), "methods": None, "unknown": unknown}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def load_unknown(path: Optional[str], models_dir: Path):
    """The unknown column's pixel purifier: ``--purifier-weights`` (an ADM state dict of the calibrated
    architecture, e.g. a model trained with another seed or data) or the committed seed-1 one."""
    adm, _ = build_purifier(UnknownPurifierConfig(), models_dir, verbose=False)
    if path:
        state = load_file(path)
        missing, unexpected = adm.unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SystemExit(f"--purifier-weights: {path} is not an ADM of UnknownPurifierConfig's architecture "
                             f"(missing {len(missing)} keys, unexpected {len(unexpected)}); train one with "
                             f"benchmarks.testbed.purifier.build_purifier and pass its .safetensors")
    return adm


def antipure_shares(adm, protected, photos, s: Settings, seed: int, pfg_lambda: Optional[float]) -> dict:
    """Each AntiPure term's share of the gradient and sign agreement at the protected photos (λ₁ as it ran)."""
    freq = FrequencyGuidance(weight=pfg_lambda if pfg_lambda is not None else s.pfg_weight, patch_size=s.pfg_patch)
    out = term_gradients(adm, protected, photos, None, "antipure", seed=seed + 91, samples=4, frequency=freq,
                         timestep=TimestepGuidance(weight=s.etg_weight, rule=s.etg_rule), t_purify=s.t_purify,
                         window=s.window, stride=s.stride, window_mode=s.window_mode)
    flat = {f"{k}_share": v["share"] for k, v in out["terms"].items()}
    flat.update({f"{k}_sign_agreement": v["sign_agreement"] for k, v in out["terms"].items()})
    return {**flat, "pfg_lambda": freq.weight}


def run_unit(unit: int, s: Settings, models_dir: Path, unknown_path: Optional[str], log=print,
             previous: Optional[dict] = None) -> dict:
    """Everything for one unit; returns the JSON-able record written to :data:`UNITS_DIR`.

    ``previous``: the unit's record from a run with fewer methods; only the methods it lacks are run and
    added. Every draw is seeded per unit and the purifiers' noise per set, so a method run later sees the
    same purifier noise, LoRA initialisation and sampling noise as one run with the rest; the ``none`` rows
    are taken from ``previous`` after one of them (GrIDPure) is recomputed and checked equal."""
    t_cpu = time.process_time()
    if previous is not None:
        s = replace(s, methods=tuple(m for m in s.methods if m not in previous["terms"]))
        if not s.methods:
            return previous
    ldm, _ = build_model(TrainConfig(), models_dir, verbose=False)
    adm, _ = build_purifier(CalibratedPurifierConfig(), models_dir, verbose=False)
    unknown = load_unknown(unknown_path, models_dir)
    photos, set_a = unit_views(unit, s)
    seed = unit_seed(s, unit)
    cond = instance_cond(ldm, unit)
    protected, seconds, objectives, terms, shares = {}, {}, {}, {}, {}
    for name in s.methods if previous is None else s.methods + ("none",):
        t0, steps, lambdas = time.perf_counter(), [], []
        protected[name] = protect_photos(name, ldm, adm, photos, set_a, cond, s, seed, VARIANTS, steps, lambdas)
        seconds[name] = round(time.perf_counter() - t0, 1)
        objectives[name] = objective_summary(steps) if steps else {}
        terms[name] = method_objective(name, ldm, adm, photos, protected[name], cond, s, seed, variants=VARIANTS)
        if name.startswith("antipure"):
            shares[name] = antipure_shares(adm, protected[name], photos, s, seed,
                                           sum(lambdas) / len(lambdas) if lambdas else None)
        log(f"{name:24s} protected in {seconds[name]:6.1f}s")
    # one batch, common random numbers: 'none' is the clean photos' own purification
    names = [m for m in protected if m != "none"]
    batch = torch.cat([photos] + [protected[m] for m in names])
    main = replace(s, purifiers=tuple(p for p in s.purifiers if p != "gridpure-unknown"))
    t0 = time.perf_counter()
    cols = purify_all(batch, ldm, adm, main, seed + 500, log)
    purified = {c: dict(zip(["none", *names], v.split(s.num_photos))) for c, v in cols.items()}
    if "gridpure-unknown" in s.purifiers:
        known = [m for m in ["none", *names] if m in UNKNOWN_METHODS]
        sub = torch.cat([protected[m] for m in known])
        purified["gridpure-unknown"] = dict(zip(known, _gridpure_2x20(unknown, sub, s, seed + 504, s.num_photos)
                                                .split(s.num_photos)))
    log(f"purified in {time.perf_counter() - t0:.0f}s")
    # calibration on this unit's clean photos: what the purifiers do to them alone
    calib = {c: float(psnr(purified[c]["none"], photos).mean()) for c in purified if c != "none"}
    rows = []
    reference = customize_and_sample(ldm, photos, cond, s, seed)
    for name in protected:
        t0 = time.perf_counter()
        for col, sets in purified.items():
            if name not in sets or (previous is not None and name == "none" and col != "gridpure"):
                continue
            got = sets[name]
            row = {"subject": unit, "photo": UNITS[unit][0], "eta": round(s.eta * 255), "method": name,
                   "purifier": col, "seed": seed,
                   "psnr_protected": float(psnr(protected[name], photos).clamp(max=99).mean()),
                   "perturbation_rmse": float((protected[name] - photos).square().mean().sqrt() * 255),
                   "protect_s": seconds[name]}
            row.update(purified_scores(got, sets["none"], s.grid_patch))
            if not col.startswith("gridpure@"):
                samples = reference if (name, col) == ("none", "none") else customize_and_sample(ldm, got, cond, s,
                                                                                                 seed)
                row.update(sample_scores(samples, reference, photos, s.grid_patch))
                row["brisque_generated"] = float(brisque(samples).mean())
            rows.append(row)
        log(f"{name:24s} customized in {time.perf_counter() - t0:6.1f}s")
    rec = {"unit": unit, "subject": UNITS[unit][0], "shift": UNITS[unit][1], "seed": seed, "rows": rows,
           "objectives": objectives, "terms": terms, "shares": shares, "calibration": calib,
           "cpu_s": round(time.process_time() - t_cpu, 1)}
    if previous is not None:
        rec = merge_units(previous, rec)
    for r in rec["rows"]:  # the protection's own effect beyond what the purifier alone does (paired: same unit)
        base = next(b for b in rec["rows"] if b["method"] == "none" and b["purifier"] == r["purifier"])
        if "sample_dist" in r:
            r["sample_gain"] = r["sample_dist"] - base["sample_dist"]
            r["subject_drop"] = base["subject_sim"] - r["subject_sim"]
            r["brisque_gain"] = r["brisque_generated"] - base["brisque_generated"]
    return rec


def merge_units(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s methods added, rows in :data:`V3_METHODS` order. ``new``'s one ``none`` row
    (GrIDPure, recomputed) must equal ``old``'s: else the two runs are not paired and nothing is merged."""
    check = lambda rec: next(r for r in rec["rows"] if r["method"] == "none" and r["purifier"] == "gridpure")  # noqa: E731
    a, b = check(old), check(new)
    for k in ("sample_dist", "subject_sim", "survival"):
        if k in a and abs(a[k] - b[k]) > 1e-5:
            raise RuntimeError(f"unit {old['unit']}: the recomputed none/gridpure {k} ({b[k]:.6f}) differs from "
                               f"the stored one ({a[k]:.6f}); this machine or torch build does not reproduce the "
                               f"stored units: rerun them all (delete {UNITS_DIR.name}/unit-*.json)")
    rows = old["rows"] + [r for r in new["rows"] if r["method"] != "none"]
    order = {m: i for i, m in enumerate(V3_METHODS)}
    rows.sort(key=lambda r: order.get(r["method"], len(order)))  # stable: columns keep their order
    merged = {**old, "rows": rows, "cpu_s": round(old["cpu_s"] + new["cpu_s"], 1)}
    for k in ("objectives", "terms", "shares"):
        merged[k] = {**old[k], **{m: v for m, v in new[k].items() if m != "none"}}
    return merged


def _unit_job(args):
    unit, s, models_dir, unknown_path, out_dir, key, previous = args
    torch.set_num_threads(1)
    tag = f"[unit {unit} {UNITS[unit][0]}]"
    rec = run_unit(unit, s, Path(models_dir), unknown_path, lambda m: print(f"{tag} {m}", flush=True), previous)
    rec["settings_key"] = key
    path = Path(out_dir) / f"unit-{unit:02d}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    tmp.replace(path)  # a unit is either complete on disk or absent
    print(f"{tag} done in {rec['cpu_s']:.0f} CPU s", flush=True)
    return unit


def _calibration_job(args):
    which, models_dir, unknown_path = args
    torch.set_num_threads(1)
    adm = (build_purifier(CalibratedPurifierConfig(), Path(models_dir), verbose=False)[0] if which == "attacked"
           else load_unknown(unknown_path, Path(models_dir)))
    return which, calibration.calibrate(adm, calibration.held_out_photos(4, V3_SCALE), snapshots=(1, *CURVE))


def done_units(out_dir: Path, key: str) -> dict[int, dict]:
    recs = {}
    for p in sorted(out_dir.glob("unit-*.json")):
        rec = json.loads(p.read_text())
        if rec.get("settings_key") == key:
            recs[rec["unit"]] = rec
    return recs


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description="AntiPure testbed v3 (calibrated purifier, paired units)")
    ap.add_argument("--quick", action="store_true", help="a few steps on two units: a plumbing check")
    ap.add_argument("--units", type=int, nargs="+", help=f"unit indices (default: all {len(UNITS)})")
    ap.add_argument("--purifier-weights", metavar="PATH",
                    help="the unknown column's pixel purifier (.safetensors, UnknownPurifierConfig's architecture)")
    ap.add_argument("--workers", type=int, default=2, help="parallel units, one torch thread each (default 2)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the units on disk")
    ap.add_argument("--eta", type=int, default=16, help="the budget in 1/255 (default 16; results of another "
                                                          "budget go to testbed_v3_eta<N>)")
    ap.add_argument("--methods", nargs="+", metavar="METHOD",
                    help="methods to run (default: all of V3_METHODS); 'none' is always run; units already on "
                         "disk with these settings get only the methods they lack")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: testbed's results/)")
    a = ap.parse_args(argv)
    if a.purifier_weights and not Path(a.purifier_weights).is_file():
        raise SystemExit(f"--purifier-weights: no file {a.purifier_weights}")
    if a.eta <= 0 or a.eta > 255:
        raise SystemExit(f"--eta: a budget in 1/255, 1..255, got {a.eta}")
    methods = V3_METHODS if not a.methods else ("none", *dict.fromkeys(m for m in a.methods if m != "none"))
    unknown_methods = [m for m in methods if m not in V3_METHODS]
    if unknown_methods:
        raise SystemExit(f"--methods: {unknown_methods} not in testbed v3; choose from {', '.join(V3_METHODS)}")
    s = replace(Settings(), **{**V3_SETTINGS, "eta": a.eta / 255, "methods": methods}, **(QUICK if a.quick else {}))
    tag = "testbed_v3" + ("_quick" if a.quick else "") + ("" if a.eta == 16 else f"_eta{a.eta}")
    units_dir = a.out / (tag.replace("testbed_", "") + "_units")
    units_dir.mkdir(parents=True, exist_ok=True)
    key = settings_key(s, a.purifier_weights or "seed-1")
    units = a.units or ([0, 7] if a.quick else list(range(len(UNITS))))
    bad = [u for u in units if not 0 <= u < len(UNITS)]
    if bad:
        raise SystemExit(f"--units: {bad} out of range; units are 0..{len(UNITS) - 1}")
    t0 = time.perf_counter()
    calib = {}
    if not a.report_only:
        # trained here, once, if a config's weights are not committed (else every worker would train them)
        build_model(TrainConfig(), MODELS_DIR)
        for cfg in (CalibratedPurifierConfig(), UnknownPurifierConfig()):
            build_purifier(cfg, MODELS_DIR)
        done = done_units(units_dir, key)
        todo = [u for u in units if u not in done or set(methods) - set(done[u]["terms"])]
        print(f"testbed v3: {len(todo)} of {len(units)} units to run or complete ({units_dir})", flush=True)
        cal_path = units_dir / f"calibration-{key}.json"
        cal_jobs = [] if cal_path.exists() or a.quick else [("attacked", str(MODELS_DIR), a.purifier_weights),
                                                            ("unknown", str(MODELS_DIR), a.purifier_weights)]
        ctx = mp.get_context("spawn")
        with ctx.Pool(a.workers) as pool:
            cal = pool.map_async(_calibration_job, cal_jobs, chunksize=1) if cal_jobs else None
            for u in pool.imap_unordered(_unit_job, [(u, s, str(MODELS_DIR), a.purifier_weights, str(units_dir),
                                                      key, done.get(u)) for u in todo], chunksize=1):
                print(f"unit {u} written", flush=True)
            if cal is not None:
                cal_path.write_text(json.dumps(dict(cal.get())))
    cal_path = units_dir / f"calibration-{key}.json"
    if cal_path.exists():
        calib = json.loads(cal_path.read_text())
    recs = done_units(units_dir, key)
    if not recs:
        raise SystemExit(f"no finished units in {units_dir} for these settings; run without --report-only")
    ldm, _ = build_model(TrainConfig(), MODELS_DIR, verbose=False)
    # the last full invocation's wall time and machine, kept beside the units for --report-only
    # the invocations' wall time and machine, kept beside the units for --report-only
    run_path = units_dir / f"run-{key}.json"
    run = json.loads(run_path.read_text()) if run_path.exists() else {"wall_s": None, "machine": "?"}
    if not a.report_only and todo:
        run = {"wall_s": round(time.perf_counter() - t0) + (run["wall_s"] or 0),
               "invocations": run.get("invocations", 1 if run["wall_s"] else 0) + 1,
               "machine": f"{platform.machine()}, torch {torch.__version__}, {a.workers} worker(s) x 1 thread, "
                          f"{os.cpu_count()} cores"}
        run_path.write_text(json.dumps(run))
    meta = {"command": "python -m benchmarks.testbed.v3" + (" --quick" if a.quick else "")
            + ("" if a.eta == 16 else f" --eta {a.eta}"),
            "wall_s": run["wall_s"], "invocations": run.get("invocations", 1), "machine": run["machine"],
            "vae_heldout_db": heldout_vae_psnr(ldm, V3_SCALE), "unknown": a.purifier_weights or "seed-1 (committed)",
            "calibration": calib}
    return write_report(a.out, tag, [recs[u] for u in sorted(recs)], s, meta)


if __name__ == "__main__":
    main()

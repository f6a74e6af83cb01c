"""Why purified_advdm keeps no more effect than AdvDM after GrIDPure: measured on testbed v3's units.

purified_advdm maximises the customization model's loss (AdvDM's L_ldm) on x′ and on the purifier's output
P(x′) (one GrIDPure window, t* steps, gradients through the chain). Testbed v3 finds its effect on the customized
model equal to AdvDM's. Three measurements on the same units, seeds and protected photos as testbed v3
(``protect_photos`` with the unit's seed reproduces them; checked against the stored units' perturbation RMSE):

1. **Does the purified term steer the step?** Each term's share of the gradient norm, the cosine between the two
   terms' gradients and the fraction of pixels where the purified term has the sign of the sum (PGD steps along
   the sign), at the clean and the protected photos (:func:`~antipure_core.protect.term_gradients`).
2. **Does it raise the loss the method targets more than AdvDM does?** The purified term itself, L_ldm(P(x′)) at
   the attack's own seeded draws of P, on AdvDM's and on each route's photos.
3. **Where the attacker trains**: L_ldm (fixed draws) of the photos after 0, 1, 10 and 40 GrIDPure iterations
   (the attacker's 2 × 20, common random numbers), each method minus the clean photos' value, and each route minus
   AdvDM with paired 95 % intervals over the units. And how far each route's δ is from AdvDM's.

    python -m benchmarks.testbed.purified_why              # 10 units, 2 workers: results/purified_why.md + .json
    python -m benchmarks.testbed.purified_why --units 0 7  # a subset
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import replace
from pathlib import Path

import torch

from antipure_core.metrics import markdown_table
from antipure_core.protect import evaluate_objective, term_gradients

from .experiment import Settings, attack_call, instance_cond, protect_photos, purify_all
from .paired import fmt_iv, resolved, t_interval
from .purifier import CalibratedPurifierConfig, build_purifier
from .train import MODELS_DIR, TrainConfig, build_model
from .v3 import UNITS, UNITS_DIR, V3_SETTINGS, unit_seed, unit_views
from .v3_report import PURIFIED

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: GrIDPure iterations after which the customization model's loss is read (and after all of the attacker's)
SNAPSHOTS = (0, 1, 10)
SETS = ("none", "advdm", *PURIFIED)


def why_unit(unit: int, s: Settings, models_dir: Path, log=print) -> dict:
    """The three measurements on one unit (JSON-able)."""
    ldm, _ = build_model(TrainConfig(), models_dir, verbose=False)
    adm, _ = build_purifier(CalibratedPurifierConfig(), models_dir, verbose=False)
    photos, set_a = unit_views(unit, s)
    seed, cond = unit_seed(s, unit), instance_cond(ldm, unit)
    protected = {m: protect_photos(m, ldm, adm, photos, set_a, cond, s, seed) for m in SETS}
    rmse = {m: float((protected[m] - photos).square().mean().sqrt() * 255) for m in SETS}
    delta = {m: protected[m] - photos for m in SETS}
    rec = {"unit": unit, "subject": UNITS[unit][0], "perturbation_rmse": rmse, "gradients": {}, "own_term": {},
           "delta_vs_advdm": {}, "ldm_after": {}}
    for route in PURIFIED:
        model, c, kw = attack_call(route, ldm, adm, cond, s)
        grads = {}
        for tag, x in (("clean", photos), ("protected", protected[route])):
            rep = term_gradients(model, x, photos, c, seed=seed + 77, samples=4, **kw)["terms"]
            grads[tag] = {"purified_share": rep["purified"]["share"], "cosine": rep["purified"]["cosine_to_rest"],
                          "purified_sign_agreement": rep["purified"]["sign_agreement"],
                          "plain_sign_agreement": rep["plain"]["sign_agreement"]}
        rec["gradients"][route] = grads
        # the purified term at the route's own seeded draws of P, on the clean, AdvDM's and the route's photos
        rec["own_term"][route] = {m: evaluate_objective(model, protected[m], photos, c, seed=seed + 77, samples=4,
                                                        **kw)["ldm_purified"] for m in ("none", "advdm", route)}
        d, a = delta[route].flatten(), delta["advdm"].flatten()
        rec["delta_vs_advdm"][route] = {"rmse": float((d - a).square().mean().sqrt() * 255),
                                        "cosine": float(torch.nn.functional.cosine_similarity(d, a, dim=0)),
                                        "sign_differs": float(((d.sign() != a.sign()) & (d != 0) & (a != 0))
                                                              .float().mean())}
        log(f"{route}: gradients and own term measured")
    # the attacker's GrIDPure 2 x 20 with common random numbers (photo k of every set sees the same noise)
    n = s.num_photos
    purified = purify_all(torch.cat([protected[m] for m in SETS]), ldm, adm, replace(s, purifiers=("gridpure",)),
                          seed + 500, log, curve=tuple(k for k in SNAPSHOTS if k))
    for k in snapshots(s):
        y = purified["none" if k == 0 else "gridpure" if k == s.gridpure_iterations else f"gridpure@{k}"]
        rec["ldm_after"][str(k)] = {
            m: evaluate_objective(ldm, part, photos, cond, "advdm", seed=seed + 78, samples=8)["ldm"]
            for m, part in zip(SETS, y.split(n))}
        log(f"L_ldm after {k} GrIDPure iterations measured")
    return rec


def snapshots(s: Settings) -> list[int]:
    return sorted({k for k in SNAPSHOTS if k < s.gridpure_iterations} | {s.gridpure_iterations})


def _job(args):
    unit, s, models_dir = args
    torch.set_num_threads(1)
    t0 = time.process_time()
    rec = why_unit(unit, s, Path(models_dir), lambda m: print(f"[unit {unit}] {m}", flush=True))
    rec["cpu_s"] = round(time.process_time() - t0, 1)
    return rec


def stored_rmse(unit: int) -> dict:
    """Testbed v3's stored perturbation RMSE of each set on ``unit`` (empty when its unit file is absent)."""
    path = UNITS_DIR / f"unit-{unit:02d}.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {r["method"]: r["perturbation_rmse"] for r in rows if r["purifier"] == "none" and r["method"] in SETS}


def _mean(v) -> float:
    v = list(v)
    return sum(v) / len(v)


def report(recs: list[dict], s: Settings, meta: dict) -> str:
    n = len(recs)
    lines = ["# Why purified_advdm keeps no more effect than AdvDM after GrIDPure", "",
             f"`{meta['command']}` — {n} testbed v3 units, η = {round(s.eta * 255)}/255, {s.pgd_steps} PGD steps; "
             f"{meta['wall_s']} s wall, {sum(r['cpu_s'] for r in recs):.0f} CPU s; {meta['machine']}. "
             f"Protected photos reproduce testbed v3's: largest perturbation-RMSE difference from the stored units "
             f"{meta['reproduced']}.", "",
             __doc__.split("\n\n")[1].strip(), ""]
    lines += ["## 1. The purified term's pull on the step", "",
              "Mean over units (4 seeded draws each). share: the purified term's gradient norm over the sum of both "
              "terms' norms (w = 0.5 weights them equally); cosine: between the two terms' gradients; sign "
              "agreement: fraction of pixels where the term's gradient has the sign of the sum.", ""]
    table = []
    for route in PURIFIED:
        for tag in ("clean", "protected"):
            g = [r["gradients"][route][tag] for r in recs]
            table.append({"route": route, "at": tag, **{k: f"{_mean(x[k] for x in g):.3f}" for k in g[0]}})
    lines += [markdown_table(table), ""]
    lines += ["## 2. The purified term itself, L_ldm(P(x′)), at the route's own draws of P", "",
              "Each route's photos and AdvDM's, minus the clean photos' value, and the route minus AdvDM "
              "(paired 95 % t interval over units):", ""]
    table = []
    for route in PURIFIED:
        own = [r["own_term"][route] for r in recs]
        iv = t_interval(o[route] - o["advdm"] for o in own)
        table.append({"route": route, "clean": f"{_mean(o['none'] for o in own):.4f}",
                      "AdvDM − clean": f"{_mean(o['advdm'] - o['none'] for o in own):+.4f}",
                      "route − clean": f"{_mean(o[route] - o['none'] for o in own):+.4f}",
                      "route − AdvDM": fmt_iv(iv, 4), "": resolved(iv)})
    lines += [markdown_table(table), ""]
    lines += ["## 3. The customization model's loss after the attacker's GrIDPure", "",
              "L_ldm at 8 fixed draws of the photos after k GrIDPure iterations (common random numbers), minus the "
              "clean photos' after the same k; last columns: each route minus AdvDM, paired 95 % t interval.", ""]
    table = []
    for k in map(str, snapshots(s)):
        vals = [r["ldm_after"][k] for r in recs]
        row = {"iterations": k, "clean": f"{_mean(v['none'] for v in vals):.4f}",
               **{f"{m} − clean": f"{_mean(v[m] - v['none'] for v in vals):+.4f}" for m in SETS[1:]}}
        for route in PURIFIED:
            iv = t_interval(v[route] - v["advdm"] for v in vals)
            row[f"{route} − AdvDM"] = f"{fmt_iv(iv, 4)} {resolved(iv)}"
        table.append(row)
    lines += [markdown_table(table), ""]
    lines += ["## δ of each route against AdvDM's (same seed)", "",
              "RMSE of the difference (1/255), cosine, and the fraction of pixels where both are non-zero and differ "
              "in sign:", ""]
    table = [{"route": route, **{k: f"{_mean(r['delta_vs_advdm'][route][k] for r in recs):.3f}"
                                 for k in ("rmse", "cosine", "sign_differs")}} for route in PURIFIED]
    return "\n".join(lines + [markdown_table(table), ""])


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, nargs="+", help=f"unit indices (default: all {len(UNITS)})")
    ap.add_argument("--workers", type=int, default=2, help="parallel units, one torch thread each (default 2)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: testbed's results/)")
    a = ap.parse_args(argv)
    units = a.units or list(range(len(UNITS)))
    bad = [u for u in units if not 0 <= u < len(UNITS)]
    if bad:
        raise SystemExit(f"--units: {bad} out of range; units are 0..{len(UNITS) - 1}")
    s = replace(Settings(), **V3_SETTINGS)
    build_model(TrainConfig(), MODELS_DIR)  # trained here once if absent, not in every worker
    build_purifier(CalibratedPurifierConfig(), MODELS_DIR)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(a.workers) as pool:
        recs = sorted(pool.map(_job, [(u, s, str(MODELS_DIR)) for u in units], chunksize=1), key=lambda r: r["unit"])
    gaps = [abs(r["perturbation_rmse"][m] - v) for r in recs for m, v in stored_rmse(r["unit"]).items()]
    meta = {"command": "python -m benchmarks.testbed.purified_why" + (f" --units {' '.join(map(str, units))}"
                                                                      if a.units else ""),
            "wall_s": round(time.perf_counter() - t0), "reproduced": f"{max(gaps):.2g}/255" if gaps else "n/a",
            "machine": f"torch {torch.__version__}, {a.workers} worker(s) x 1 thread"}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "purified_why.json").write_text(json.dumps({"meta": meta, "units": recs}, indent=1))
    path = a.out / "purified_why.md"
    path.write_text(report(recs, s, meta))
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()

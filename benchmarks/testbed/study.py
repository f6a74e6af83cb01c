"""Why does (or doesn't) AntiPure win? Variants of its guidance, budget and the attacker's t*.

Screens AntiPure variants (and the baselines for reference) by how much of
the perturbation survives each purifier (cheap: no customization), carries
the variants in :data:`FULL` through the whole protect -> purify -> customize
-> score loop of :mod:`.run`, and writes ``results/study.md`` /
``results/study.csv``. Also measures how large each
loss term's gradient is relative to the base loss (PGD follows the sign of the
sum, so a term with a tiny gradient changes nothing).

    python -m benchmarks.testbed.study [--quick]
"""
from __future__ import annotations

import argparse
import csv
import time
from dataclasses import replace
from pathlib import Path

import torch

from antipure_core.diffusion import predict_x0, q_sample
from antipure_core.frequency import high_frequency_distance, high_frequency_mask, pfg_loss
from antipure_core.methods import (AttackContext, antipure_loss, get_method, register_method,
                                   simulated_purification)
from antipure_core.metrics import markdown_table

from . import run as tb
from .train import CACHE_DIR, build_model, subject_views


def _purified_estimate(ctx: AttackContext, z: torch.Tensor):
    """AntiPure's one-step purified estimate x̂ = D(ẑ0(z_tp)), with its t_p and noise."""
    z0, t_p, noise = simulated_purification(ctx, z, ctx.options["frequency"].t_star)
    return ctx.model.decode(z0), t_p, noise


def _base(ctx: AttackContext, x_adv, z) -> dict:
    """L_ldm - λ_etg L_etg, exactly as the core's AntiPure computes them (PFG off)."""
    return antipure_loss(replace(ctx, frequency=None, timestep=ctx.options["timestep"]), x_adv, z)


@register_method("antipure_pfg_sg", "study: AntiPure with a stop-gradient on x' in L_pfg (only the purifier path moves)")
def antipure_pfg_sg_loss(ctx: AttackContext, x_adv, z) -> dict:
    out = _base(ctx, x_adv, z)
    cfg = ctx.options["frequency"]
    x_hat, _, _ = _purified_estimate(ctx, z)
    out["pfg"] = pfg_loss(x_hat, x_adv.detach(), cfg)
    out["objective"] = out["objective"] - cfg.weight * out["pfg"]
    return out


@register_method("antipure_survive", "study: AntiPure whose frequency term maximises the high-frequency "
                                     "difference between the purified estimates of x' and x")
def antipure_survive_loss(ctx: AttackContext, x_adv, z) -> dict:
    out = _base(ctx, x_adv, z)
    cfg = ctx.options["frequency"]
    x_hat, t_p, noise = _purified_estimate(ctx, z)
    model = ctx.model
    with torch.no_grad():  # the clean photos through the same simulated purification (same t_p and noise)
        if "z_clean" not in ctx.cache:
            ctx.cache["z_clean"] = model.encode(ctx.x)
        zc = q_sample(model, ctx.cache["z_clean"], t_p, noise)
        x_hat_clean = model.decode(predict_x0(model, zc, t_p, model.predict_noise(zc, t_p, ctx.cond)))
    mask = high_frequency_mask(cfg.patch_size, cfg.threshold, cfg.soft_mask, cfg.transform, z.device)
    out["survive"] = high_frequency_distance(x_hat.float(), x_hat_clean.float(), mask, cfg.transform)
    out["objective"] = out["objective"] + cfg.weight * out["survive"]
    return out


tb.PROTECTIONS.update({"antipure-pfg-sg": {"method": "antipure_pfg_sg"},
                       "antipure-survive": {"method": "antipure_survive"}})

#: (label, Settings overrides, protection names) screened by perturbation survival
VARIANTS: list[tuple[str, dict, tuple]] = [
    ("reference (run.py defaults)", {},
     ("random", "advdm", "mist", "photoguard", "sds", "antipure", "antipure-noPFG", "antipure-noETG")),
    ("PFG weight 10", {"pfg_weight": 10.0}, ("antipure",)),
    ("PFG weight 100", {"pfg_weight": 100.0}, ("antipure",)),
    ("PFG weight 1000", {"pfg_weight": 1000.0}, ("antipure",)),
    ("PFG t* = 0.1 (the attacker's)", {"pfg_t_star": 0.1}, ("antipure",)),
    ("PFG t* = 0.1, weight 100", {"pfg_t_star": 0.1, "pfg_weight": 100.0}, ("antipure",)),
    ("PFG in latent space (2-cell patches)", {"pfg_space": "latent", "pfg_patch": 2}, ("antipure",)),
    ("PFG patch 8 px", {"pfg_patch": 8}, ("antipure",)),
    ("ETG offset +500", {"etg_mapping": "offset"}, ("antipure",)),
    ("ETG mode error", {"etg_mode": "error"}, ("antipure",)),
    ("ETG weight 10", {"etg_weight": 10.0}, ("antipure",)),
    ("eta 16/255", {"eta": 16 / 255}, ("advdm", "mist", "photoguard", "antipure")),
    ("attacker t* = 0.05", {"diffpure_t_star": 0.05}, ("advdm", "mist", "photoguard", "antipure")),
    ("attacker t* = 0.2", {"diffpure_t_star": 0.2}, ("advdm", "mist", "photoguard", "antipure")),
    # two alternative readings of PFG (not the core's): see the README
    ("PFG with stop-gradient on x', weight 100", {"pfg_weight": 100.0}, ("antipure-pfg-sg",)),
    ("PFG with stop-gradient on x', weight 1000", {"pfg_weight": 1000.0}, ("antipure-pfg-sg",)),
    ("survival term, weight 10", {"pfg_weight": 10.0}, ("antipure-survive",)),
    ("survival term, weight 100", {"pfg_weight": 100.0}, ("antipure-survive",)),
    ("survival term, weight 1000", {"pfg_weight": 1000.0}, ("antipure-survive",)),
    ("survival term, weight 10000", {"pfg_weight": 10000.0}, ("antipure-survive",)),
]
#: variants also carried through customization (chosen from the screen; see README)
FULL: list[str] = ["PFG weight 100", "PFG with stop-gradient on x', weight 1000",
                   "survival term, weight 1000", "eta 16/255"]


def gradient_scales(model, photos, cond, s: tb.Settings, samples: int = 8) -> dict[str, float]:
    """Mean |∂term/∂x| of each AntiPure loss term at the clean photos, over ``samples`` noise draws."""
    kw = tb.protection_kwargs("antipure", s)
    ctx = AttackContext(model, photos, cond, torch.Generator().manual_seed(0), 0, model.num_timesteps - 1,
                        kw["frequency"], kw["timestep"], {})
    sums: dict[str, float] = {}
    for _ in range(samples):
        x = photos.clone().requires_grad_(True)
        with torch.enable_grad():
            terms = get_method("antipure").loss(ctx, x, model.encode(x))
            for name in ("ldm", "pfg", "etg"):
                g, = torch.autograd.grad(terms[name].sum(), x, retain_graph=True)
                sums[name] = sums.get(name, 0.0) + float(g.abs().mean()) / samples
                sums[name + "_value"] = sums.get(name + "_value", 0.0) + float(terms[name].detach().mean()) / samples
    return sums


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--subjects", type=int, nargs="+")
    ap.add_argument("--variants", type=int, nargs="+", help="indices into VARIANTS (default all)")
    ap.add_argument("--full", action="store_true", help="customize and sample for every variant (slow)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    base = tb.Settings(**tb.QUICK) if a.quick else tb.Settings()
    base.purifiers = ("diffpure", "gridpure", "jpeg75")
    if a.subjects:
        base.subjects = tuple(a.subjects)
    out_dir = a.out or (CACHE_DIR / "quick" if a.quick else tb.RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, _ = build_model(base.train, cache_dir=CACHE_DIR)

    photos0 = subject_views(base.subjects[0], base.train.size)
    cond0 = model.tokens("person", identity=model.rare_token(seed=base.subjects[0]))
    scales = gradient_scales(model, photos0, cond0, base)
    print("gradient scales", scales, flush=True)

    rows, table = [], []
    chosen = [VARIANTS[i] for i in a.variants] if a.variants else VARIANTS
    for label, over, methods in chosen:
        full = label in FULL or a.full
        s = replace(base, methods=("none",) + methods, **over)
        vrows = []
        for subject in s.subjects:
            r, _ = tb.run_repeat(model, subject_views(subject, s.train.size), subject, s,
                                 log=lambda m: print(f"[{label}] {m}", flush=True), customize_cells=full)
            vrows += [dict(x, variant=label) for x in r if x["method"] != "none"]
        rows += vrows
        for agg in tb.aggregate(vrows, replace(s, methods=methods)):
            entry = {"variant": label, "method": agg["method"], "purifier": agg["purifier"],
                     "survival": tb._fmt(agg["survival"], agg["survival_sd"])}
            if full:
                entry.update({k: tb._fmt(agg[k], agg[k + "_sd"]) for k in ("sample_gain", "subject_gain")})
            table.append(entry)
    with (out_dir / "study.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    md = ["# Testbed study: AntiPure variants", "",
          f"Subjects {list(base.subjects)}, purifiers {list(base.purifiers)}; mean ± s.d. over subjects. "
          "survival: RMSE in 1/255 levels between purified protected and purified clean photos (same purifier "
          "noise). sample_gain / subject_gain (variants carried through customization only): see run.py. "
          f"Run time {time.perf_counter() - t0:.0f} s.", "",
          "## Gradient scale of each AntiPure term at the clean photos (mean |∂/∂x|)", "",
          markdown_table([{k: f"{v:.3g}" for k, v in scales.items()}]), "",
          "## Variants", "", markdown_table(table), ""]
    path = out_dir / "study.md"
    path.write_text("\n".join(md))
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


if __name__ == "__main__":
    main()

"""One job of the testbed: one subject at one budget, every method, through every purifier, customized and scored.

The threat model is the paper's (DESIGN §1.1–1.3): the protector perturbs
four photos; the attacker purifies them with a *pixel-space* DDPM (the
testbed's ADM, :mod:`.purifier`) and then LoRA-customizes a *separate*
latent model (:class:`~.model.TinyLDM`) on "a photo of sks" and samples.

* AntiPure attacks the pixel purifier (white-box): the published loss on the
  ADM, t ~ U{1..t^p}, every GrIDPure window each PGD step.
* The baselines attack the customization model, as they were designed to:
  AdvDM, Mist, PhotoGuard and SDS on the LDM; ASPL and SimAC with a LoRA
  surrogate of the LDM re-trained between attack steps on four *other* views
  of the subject (Anti-DreamBooth's set A).

Purifiers (the attacker's columns): ``none``; ``gridpure`` (the pack's
GrIDPure on the ADM, t* = 10 of 1000, 32-px windows at stride 16 with the
packed corners, γ = 0.1, 2 rounds × 20 iterations; snapshots after 10/20/30
iterations give the ISM-style curve for free, since round 2 continues round
1); ``diffpure`` (GrIDPure's DiffPure baseline on the ADM: 64 → 32 px,
t* = 100, back); ``sdedit-ldm`` (black-box for AntiPure: SDEdit through the
customization model's own VAE and UNet, t* = 0.1, a purifier the attack never
saw).

The pack's own ``purified_advdm`` (AdvDM's loss on the purifier's output, gradients through the purifier) runs
as ``purified_advdm-<route>`` against the testbed's pixel GrIDPure (its t*, window, stride and γ), and the
columns it was *not* built against are ``jpeg`` (the pack's JPEG, q 75), ``noisy_upscale`` (the pack's
model-free noisy upscaling, bicubic), ``gridpure+jpeg`` (JPEG of the GrIDPure output) and ``gridpure-unknown``
(GrIDPure 2 × 20 on a second pixel purifier trained with another seed, which no method ever attacks).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from antipure_core.customize import customize
from antipure_core.frequency import FrequencyGuidance
from antipure_core.lora import add_lora, remove_lora
from antipure_core.metrics import grid_artifact_score, high_frequency_ratio, psnr
from antipure_core.protect import evaluate_objective, protect
from antipure_core.purified_attack import PurifiedSettings
from antipure_core.purify import diffpure
from antipure_core.purify_filters import jpeg, noisy_upscale
from antipure_core.purify_pixel import pixel_diffpure, pixel_gridpure
from antipure_core.sampling import sample
from antipure_core.surrogate import SurrogateSettings, protect_surrogate
from antipure_core.timestep import TimestepGuidance

#: protection name -> (what it attacks, keyword arguments); ``None``: the clean photos
METHODS: dict[str, Optional[tuple[str, dict]]] = {
    "none": None,
    "random": ("ldm", {"method": "random"}),
    "advdm": ("ldm", {"method": "advdm"}),
    "mist": ("ldm", {"method": "mist"}),
    "photoguard": ("ldm", {"method": "photoguard"}),
    "sds": ("ldm", {"method": "sds"}),
    "aspl": ("ldm", {"method": "aspl"}),
    "simac": ("ldm", {"method": "simac"}),
    "antipure": ("purifier", {"method": "antipure"}),
    "antipure-noPFG": ("purifier", {"method": "antipure", "frequency": None}),
    "antipure-noETG": ("purifier", {"method": "antipure", "timestep": None}),
}
#: testbed v2's methods, the default of :attr:`Settings.methods`
V2_METHODS = tuple(METHODS)
#: the gradient routes of purified_advdm through the testbed's GrIDPure (:mod:`antipure_core.purify_grad`)
PURIFIED_ROUTES = ("one_step", "k_step", "full")
METHODS.update({f"purified_advdm-{r}": ("purified", {"method": "purified_advdm", "route": r})
                for r in PURIFIED_ROUTES})
#: the oracle on the purifier: ‖P(x′) − x′‖² through GrIDPure's full chain on a window (purification_gap)
METHODS["oracle"] = ("purified", {"method": "purification_gap", "route": "full"})
#: the attacker's purifiers; ``gridpure@k`` are the snapshots after k of GrIDPure's 40 iterations
PURIFIERS = ("none", "gridpure", "diffpure", "sdedit-ldm")
#: columns no method attacks (but purified_advdm's GrIDPure): the issue-27 transfer test; run with --purifiers
UNSEEN_PURIFIERS = ("jpeg", "noisy_upscale", "gridpure+jpeg", "gridpure-unknown")
ALL_PURIFIERS = PURIFIERS + UNSEEN_PURIFIERS
CURVE = (10, 20, 30, 40)


@dataclass
class Settings:
    """Everything that determines the numbers; written next to the results."""

    eta: float = 8 / 255
    pgd_steps: int = 50
    #: PGD step = eta * pgd_alpha_ratio (1/255 at 8/255): the budget is reached in an eighth of the steps
    pgd_alpha_ratio: float = 1 / 8
    t_purify: int = 10
    pfg_weight: float = 0.5
    pfg_patch: int = 8
    #: λ₁ set each PGD step so PFG carries this share of the gradient (:class:`FrequencyGuidance`); None: λ₁ fixed
    pfg_share: Optional[float] = None
    etg_weight: float = 0.5
    etg_rule: str = "offset"
    window: int = 32
    stride: int = 16
    window_mode: str = "all"
    gridpure_t_star: int = 10
    gridpure_gamma: float = 0.1
    gridpure_iterations: int = 40
    diffpure_t_star: int = 100
    diffpure_size: int = 32
    sdedit_t_star: float = 0.1
    sdedit_steps: int = 10
    surrogate_train_steps: int = 3
    surrogate_attack_steps: int = 5
    surrogate_lr: float = 1e-3
    surrogate_rank: int = 4
    lora_rank: int = 4
    lora_steps: int = 150
    lora_lr: float = 2e-3
    lora_batch: int = 4
    num_photos: int = 4
    num_samples: int = 12
    sample_steps: int = 20
    #: customize on the GrIDPure snapshots too (the ISM-style curve); else only after all 40 iterations
    curve: bool = True
    #: pixel grid the scores look for: the PFG patch in purified images, the LDM's 8-px cell in samples
    grid_patch: int = 8
    #: common random numbers: every set of ``num_photos`` images gets the same purifier noise, so photo k of a
    #: protected set and of the clean set differ only by the protection (survival's noise floor is 0)
    common_noise: bool = False
    #: purified_advdm: k of the k_step route, its windows ('random': one per PGD step; 'all'), w of the purified term
    purified_k: int = 3
    purified_windows: str = "random"
    purified_weight: float = 0.5
    jpeg_quality: int = 75
    upscale_sigma: float = 0.1
    upscale_scale: float = 0.5
    #: training seed of the ``gridpure-unknown`` column's purifier (the attacked one has seed 0)
    unknown_purifier_seed: int = 1
    seed: int = 0
    methods: tuple = V2_METHODS
    purifiers: tuple = PURIFIERS


def alpha(s: Settings) -> float:
    return s.eta * s.pgd_alpha_ratio


#: a variant: (the entry of :data:`METHODS` it modifies, :class:`Settings` fields it overrides)
Variant = tuple[str, dict]


def purified_settings(route: str, s: Settings) -> PurifiedSettings:
    """purified_advdm's settings: the testbed's own GrIDPure (t*, window, stride, γ) as the attacked purifier."""
    return PurifiedSettings(route=route, k=s.purified_k, purifiers={"gridpure": 1.0}, purified_weight=s.purified_weight,
                            t_star=s.gridpure_t_star, window=s.window, stride=s.stride, gamma=s.gridpure_gamma,
                            windows=s.purified_windows)


def objective_log(log: list, lambdas: Optional[list] = None) -> Callable:
    """A :func:`protect` callback that appends each PGD step's ``objective`` (the method's own loss) to ``log``
    and, with ``lambdas``, the λ₁ a PFG share set (``pfg_lambda``)."""
    def record(info):
        if "objective" in info:
            log.append(float(info["objective"]))
        if lambdas is not None and "pfg_lambda" in info:
            lambdas.append(float(info["pfg_lambda"]))
    return record


def attack_call(name: str, ldm, adm, cond, s: Settings, variants: Optional[dict[str, Variant]] = None
                ) -> Optional[tuple[object, object, dict]]:
    """:func:`protect`'s model, conditioning and keyword arguments (but the budget) for method ``name``.

    ``None`` for ``none`` (the clean photos). ASPL/SimAC get AdvDM's call on the LDM they fine-tune, the
    objective their surrogate loop maximises (:func:`protect_photos` runs their loop)."""
    if variants and name in variants:
        base, overrides = variants[name]
        name, s = base, replace(s, **overrides)
    spec = METHODS[name]
    if spec is None:
        return None
    target, kw = spec[0], dict(spec[1])
    if kw["method"] in ("aspl", "simac"):
        return ldm, cond, {"method": "advdm"}
    if target == "purified":
        kw["options"] = {"purification": purified_settings(kw.pop("route"), s), "pixel_model": adm}
        return ldm, cond, kw
    if target == "purifier":
        # a zero weight means the term is off, as in the noPFG / noETG entries
        kw.setdefault("frequency", FrequencyGuidance(weight=s.pfg_weight, patch_size=s.pfg_patch, share=s.pfg_share)
                      if s.pfg_weight else None)
        kw.setdefault("timestep", TimestepGuidance(weight=s.etg_weight, rule=s.etg_rule) if s.etg_weight else None)
        kw.update(t_purify=s.t_purify, window=s.window, stride=s.stride, window_mode=s.window_mode)
        return adm, None, kw
    return ldm, cond, kw


def protect_photos(name: str, ldm, adm, photos: Tensor, set_a: Tensor, cond, s: Settings, seed: int,
                   variants: Optional[dict[str, Variant]] = None, objectives: Optional[list] = None,
                   lambdas: Optional[list] = None) -> Tensor:
    """The protected ``photos`` for method ``name`` (the clean photos for ``none``), or for a named variant.

    ``objectives``: receives the objective of every PGD step (methods run by :func:`protect`)."""
    call = attack_call(name, ldm, adm, cond, s, variants)
    if call is None:
        return photos.clone()
    if variants and name in variants:
        s = replace(s, **variants[name][1])
    model, c, kw = call
    method = METHODS[variants[name][0] if variants and name in variants else name][1]["method"]
    if method in ("aspl", "simac"):
        params = add_lora(ldm.unet, rank=s.surrogate_rank, generator=torch.Generator().manual_seed(seed))
        try:
            cfg = SurrogateSettings(train_steps=s.surrogate_train_steps, attack_steps=s.surrogate_attack_steps,
                                    lr=s.surrogate_lr, batch_size=s.lora_batch, feature_weight=0.0)
            return protect_surrogate(ldm, photos, cond, params, method=method, eta=s.eta, alpha=alpha(s),
                                     steps=s.pgd_steps, seed=seed, settings=cfg, train_images=set_a)
        finally:
            remove_lora(ldm.unet)
            ldm.requires_grad_(False)
    return protect(model, photos, c, eta=s.eta, alpha=alpha(s), steps=s.pgd_steps, seed=seed,
                   callback=None if objectives is None else objective_log(objectives, lambdas), **kw)


def method_objective(name: str, ldm, adm, photos: Tensor, protected: Tensor, cond, s: Settings, seed: int,
                     samples: int = 4, variants: Optional[dict[str, Variant]] = None) -> dict[str, float]:
    """Each term of ``name``'s own objective on the clean and on the protected photos, at the same seeded draws
    (``<term>_clean`` / ``<term>_protected``); ``{}`` for a method without one (none, random)."""
    call = attack_call(name, ldm, adm, cond, s, variants)
    if call is None or call[2]["method"] == "random":
        return {}
    model, c, kw = call
    out = {}
    for tag, x in (("clean", photos), ("protected", protected)):
        terms = evaluate_objective(model, x, photos, c, seed=seed + 77, samples=samples, **kw)
        out.update({f"{k}_{tag}": v for k, v in terms.items()})
    return out


def _gridpure_2x20(adm, x: Tensor, s: Settings, seed: int, crn: Optional[int] = None) -> Tensor:
    return pixel_gridpure(adm, x, t_star=s.gridpure_t_star, window=s.window, stride=s.stride,
                          iterations=s.gridpure_iterations, gamma=s.gridpure_gamma,
                          generator=torch.Generator().manual_seed(seed), common_noise=crn)


def _per_set(x: Tensor, crn: Optional[int], purify: Callable[[Tensor], Tensor]) -> Tensor:
    """``purify`` (which seeds its own generator) on each set of ``crn`` images, or on the whole batch."""
    return torch.cat([purify(part) for part in x.split(crn)]) if crn else purify(x)


def purify_all(x: Tensor, ldm, adm, s: Settings, seed: int, log: Callable = print,
               unknown=None, curve: tuple = CURVE) -> dict[str, Tensor]:
    """Every purifier on the batch ``x``; ``gridpure@k`` after k iterations (k in ``curve``), ``gridpure`` = all.

    ``unknown``: the second pixel purifier, for the ``gridpure-unknown`` column. With ``s.common_noise``,
    ``x`` is made of sets of ``s.num_photos`` images that all get the same noise (``seed``): image k of
    every set sees the same purifier noise (the pixel purifiers draw it once per batch, the others run per set).
    """
    crn = s.num_photos if s.common_noise else None
    if crn and x.shape[0] % crn:
        raise ValueError(f"common_noise: the batch ({x.shape[0]} images) is not made of sets of "
                         f"num_photos = {crn}")
    out = {"none": x}
    if "gridpure" in s.purifiers or "gridpure+jpeg" in s.purifiers:
        g, y, t0 = torch.Generator().manual_seed(seed), x, time.perf_counter()
        steps = [k for k in curve if k < s.gridpure_iterations] + [s.gridpure_iterations]
        done = 0
        for k in steps:  # GrIDPure's rounds continue from the previous output, so snapshots are exact
            y = pixel_gridpure(adm, y, t_star=s.gridpure_t_star, window=s.window, stride=s.stride,
                               iterations=k - done, gamma=s.gridpure_gamma, generator=g, common_noise=crn)
            out[f"gridpure@{k}"], done = y, k
        out["gridpure"] = y
        log(f"    gridpure x{s.gridpure_iterations} on {x.shape[0]} images: {time.perf_counter() - t0:.0f}s")
    if "diffpure" in s.purifiers:
        out["diffpure"] = pixel_diffpure(adm, x, t_star=s.diffpure_t_star, size=s.diffpure_size,
                                         generator=torch.Generator().manual_seed(seed + 1), common_noise=crn)
    if "sdedit-ldm" in s.purifiers:
        out["sdedit-ldm"] = _per_set(x, crn, lambda p: diffpure(
            ldm, p, ldm.tokens("null"), t_star=s.sdedit_t_star, steps=s.sdedit_steps,
            generator=torch.Generator().manual_seed(seed + 2)))
    if "jpeg" in s.purifiers:
        out["jpeg"] = jpeg(x, s.jpeg_quality)
    if "noisy_upscale" in s.purifiers:
        out["noisy_upscale"] = _per_set(x, crn, lambda p: noisy_upscale(
            p, s.upscale_sigma, s.upscale_scale, generator=torch.Generator().manual_seed(seed + 3)))
    if "gridpure+jpeg" in s.purifiers:
        out["gridpure+jpeg"] = jpeg(out["gridpure"], s.jpeg_quality)
    if "gridpure-unknown" in s.purifiers:
        if unknown is None:
            raise ValueError("gridpure-unknown: pass the second purifier as unknown=")
        t0 = time.perf_counter()
        out["gridpure-unknown"] = _gridpure_2x20(unknown, x, s, seed + 4, crn)
        log(f"    gridpure-unknown x{s.gridpure_iterations} on {x.shape[0]} images: {time.perf_counter() - t0:.0f}s")
    return out


def customize_and_sample(ldm, images: Tensor, cond, s: Settings, seed: int) -> Tensor:
    """LoRA-customize the LDM on ``images`` under ``cond``, sample, remove the LoRA again."""
    params = add_lora(ldm.unet, rank=s.lora_rank, generator=torch.Generator().manual_seed(seed))
    try:
        customize(ldm, images, cond, params, steps=s.lora_steps, lr=s.lora_lr, batch_size=s.lora_batch,
                  generator=seed)
        h = images.shape[-1] // ldm.downsample
        return sample(ldm, cond, (s.num_samples, ldm.latent_channels, h, h), steps=s.sample_steps, generator=seed + 1)
    finally:
        remove_lora(ldm.unet)
        ldm.requires_grad_(False)


def _rmse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).square().flatten(1).mean(1).sqrt()


def subject_similarity(samples: Tensor, photos: Tensor) -> Tensor:
    """ISM proxy ``(N,)``: best cosine similarity of a sample to a subject photo, both 4x-pooled and mean-centred.

    No face model works at 64 px on a cat and a cup; this keeps ISM's form
    (cosine similarity to the subject's clean photos, higher = more alike)
    on coarse colour layout, which is what a small customized model learns.
    """
    def feat(x):
        f = F.avg_pool2d(x, 4).flatten(1)
        return F.normalize(f - f.mean(1, keepdim=True), dim=1)
    return (feat(samples) @ feat(photos).T).max(1).values


def purified_scores(purified: Tensor, purified_clean: Tensor, p: int) -> dict[str, float]:
    residual = (purified - purified_clean).clamp(-0.5, 0.5) + 0.5
    return {"survival": float(_rmse(purified, purified_clean).mean() * 255),
            "grid_purified": float(grid_artifact_score(purified, p).mean()),
            "grid_residual": float(grid_artifact_score(residual, p).mean()),
            "hf_purified": float(high_frequency_ratio(purified, p).mean())}


def sample_scores(samples: Tensor, reference: Tensor, photos: Tensor, p: int) -> dict[str, float]:
    return {"sample_dist": float(_rmse(samples, reference).mean()),
            "subject_sim": float(subject_similarity(samples, photos).mean()),
            "grid_generated": float(grid_artifact_score(samples, p).mean()),
            "hf_generated": float(high_frequency_ratio(samples, p).mean())}


def instance_cond(ldm, subject: int):
    """"a photo of sks": the class token and the subject's own rare identity token."""
    return ldm.tokens("photo", identity=ldm.rare_token(seed=subject))


def job_seed(s: Settings, subject: int) -> int:
    return s.seed + 1000 * subject


def objective_summary(steps: list[float], n: int = 5) -> dict[str, float]:
    """Mean objective over the first and the last ``n`` PGD steps (each step draws its own window, t and noise)."""
    return {"objective_start": sum(steps[:n]) / len(steps[:n]), "objective_end": sum(steps[-n:]) / len(steps[-n:])}


def protect_job(ldm, adm, photos: Tensor, set_a: Tensor, subject: int, s: Settings, log: Callable = print,
                variants: Optional[dict[str, Variant]] = None, objectives: Optional[dict] = None
                ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Every method of ``s.methods`` on one subject's ``photos``: protected images and seconds, by method.

    ``objectives``: filled with :func:`objective_summary` of each purified method's PGD objective."""
    cond, seed = instance_cond(ldm, subject), job_seed(s, subject)
    protected, seconds = {}, {}
    for name in s.methods:
        t0, steps = time.perf_counter(), []
        protected[name] = protect_photos(name, ldm, adm, photos, set_a, cond, s, seed, variants, steps)
        seconds[name] = time.perf_counter() - t0
        extra = ""
        if steps:
            summary = objective_summary(steps)
            extra = f"; objective {summary['objective_start']:.4f} -> {summary['objective_end']:.4f}"
            if objectives is not None:
                objectives[name] = summary
        log(f"  {name:15s} protected in {seconds[name]:5.1f}s{extra}")
    return protected, seconds


def columns(s: Settings) -> list[str]:
    """The purifier columns that get customized: ``s.purifiers`` and, with ``s.curve``, the GrIDPure snapshots."""
    cols = list(s.purifiers)
    if s.curve and "gridpure" in s.purifiers:
        cols += [f"gridpure@{k}" for k in CURVE if k < s.gridpure_iterations]
    return cols


def score_job(ldm, photos: Tensor, subject: int, s: Settings, protected: dict[str, Tensor],
              purified: dict[str, dict[str, Tensor]], seconds: dict[str, float], log: Callable = print,
              customize_cells: bool = True, objectives: Optional[dict] = None) -> tuple[list[dict], dict]:
    """Scores of every method x column for one subject.

    ``purified[column]`` maps ``'clean'`` (the clean photos purified) and every
    method (its protected photos purified; for ``none`` a second purification
    of the clean photos, so ``none``'s survival is the purifier's randomness).
    With ``customize_cells``, LoRA-customizes on every cell, samples from the
    same initial noise, and adds ``sample_gain``/``subject_drop`` against ``none``.
    """
    cond, seed = instance_cond(ldm, subject), job_seed(s, subject)
    reference = customize_and_sample(ldm, photos, cond, s, seed) if customize_cells else None
    rows, examples = [], {}
    for name in s.methods:
        t0 = time.perf_counter()
        for col in columns(s):
            got = purified[col][name]
            row = {"subject": subject, "eta": round(s.eta * 255), "method": name, "purifier": col, "seed": seed,
                   "psnr_protected": float(psnr(protected[name], photos).clamp(max=99).mean()),
                   "protect_s": round(seconds[name], 1), **(objectives or {}).get(name, {})}
            row.update(purified_scores(got, purified[col]["clean"], s.grid_patch))
            if customize_cells:
                samples = reference if (name, col) == ("none", "none") else customize_and_sample(ldm, got, cond, s, seed)
                row.update(sample_scores(samples, reference, photos, s.grid_patch))
                examples[(name, col)] = (protected[name][0], got[0], purified[col]["clean"][0], samples[:3])
            rows.append(row)
        log(f"  {name:15s} customized {len(columns(s))} cells in {time.perf_counter() - t0:5.1f}s")
    if customize_cells:
        for r in rows:  # the protection's own effect beyond what the purifier alone does to the outcome
            base = next(b for b in rows if b["method"] == "none" and b["purifier"] == r["purifier"])
            r["sample_gain"] = r["sample_dist"] - base["sample_dist"]
            r["subject_drop"] = base["subject_sim"] - r["subject_sim"]
    return rows, examples


def run_job(ldm, adm, photos: Tensor, set_a: Tensor, subject: int, s: Settings, log: Callable = print,
            customize_cells: bool = True, variants: Optional[dict[str, Variant]] = None,
            unknown=None) -> tuple[list[dict], dict]:
    """Protect, purify (one batch: the clean photos and every protected set) and score, in one process."""
    objectives = {}
    protected, seconds = protect_job(ldm, adm, photos, set_a, subject, s, log, variants, objectives)
    names = ["clean", *s.methods]
    batch = torch.cat([photos] + [protected[m] for m in s.methods])
    purified = {col: dict(zip(names, v.split(photos.shape[0])))
                for col, v in purify_all(batch, ldm, adm, s, job_seed(s, subject), log, unknown).items()}
    return score_job(ldm, photos, subject, s, protected, purified, seconds, log, customize_cells, objectives)

"""CPU efficacy testbed: protect -> purify -> LoRA-customize -> sample -> score, on a model trained here.

For every repeat (a held-out LFW subject, its own seed) and every protection
method, four "photos" of the subject are protected at the same L∞ budget,
purified by each attacker purifier, used to LoRA-customize the testbed model
under the instance conditioning ("a photo of sks person"), and the
customized model generates a fixed set of samples (same initial noise for
every cell). Scores, per cell:

* ``sample_dist``: RMSE between the samples and those of the model
  customized on the *clean, unpurified* photos, paired by initial noise
  (the attacker's ideal outcome; 0 for none/none by construction). Higher =
  the protection changed what the attacker gets more.
* ``subject_dist``: RMSE of each blurred sample to the nearest blurred
  subject photo (an identity proxy at 32 px). Higher = less like the subject.
* ``grid``, ``hf``: :func:`~antipure_core.metrics.grid_artifact_score` and
  :func:`~antipure_core.metrics.high_frequency_ratio` of the samples, on the
  VAE's 4-px grid (higher = more patch-grid artifacts / high frequencies).
* ``psnr_protected``: PSNR of the protected photos against the clean ones.

Run from the repository root::

    python -m benchmarks.testbed.run            # full run, writes benchmarks/testbed/results/
    python -m benchmarks.testbed.run --quick    # a tiny version (minutes), writes under cache/quick/
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn import functional as F

from antipure_core.customize import customize
from antipure_core.frequency import FrequencyGuidance
from antipure_core.lora import add_lora, remove_lora
from antipure_core.metrics import grid_artifact_score, high_frequency_ratio, markdown_table, psnr
from antipure_core.protect import protect
from antipure_core.purify import diffpure, gridpure, jpeg
from antipure_core.sampling import sample
from antipure_core.timestep import TimestepGuidance

from .train import CACHE_DIR, NUM_SUBJECTS, TrainConfig, build_model, subject_views

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: protection name -> keyword arguments of :func:`antipure_core.protect.protect` (None: unprotected)
PROTECTIONS: dict[str, Optional[dict]] = {
    "none": None,
    "random": {"method": "random"},
    "advdm": {"method": "advdm"},
    "mist": {"method": "mist"},
    "photoguard": {"method": "photoguard"},
    "sds": {"method": "sds"},
    "antipure": {"method": "antipure"},
    "antipure-noPFG": {"method": "antipure", "frequency": None},
    "antipure-noETG": {"method": "antipure", "timestep": None},
}
PURIFIERS = ("none", "diffpure", "gridpure", "jpeg75")
METRIC_DOC = [
    ("sample_gain", "sample_dist minus the unprotected photos' sample_dist under the same purifier (the "
                    "protection's own effect; higher = stronger)"),
    ("subject_gain", "subject_dist minus the unprotected photos' under the same purifier (higher = the "
                     "customized model looks less like the subject)"),
    ("survival", "RMSE (in 1/255 levels) between the purified protected photos and the purified clean photos "
                 "(same purifier noise): how much perturbation survives purification"),
    ("sample_dist", "RMSE of samples to the clean-customized model's samples, same initial noise"),
    ("subject_dist", "RMSE of 4x-blurred samples to the nearest 4x-blurred subject photo"),
    ("grid", "grid-artifact score of the samples on the 4-px VAE grid (higher = more grid)"),
    ("hf", "high-frequency energy ratio of the samples (4-px patches)"),
]
METRICS = ("sample_gain", "subject_gain", "sample_dist", "subject_dist", "grid", "hf", "survival", "psnr_protected")


@dataclass
class Settings:
    """Everything that determines the numbers; written next to the results."""

    eta: float = 8 / 255
    pgd_steps: int = 100
    pgd_alpha: float = 1 / 255
    #: PFG patch = the VAE's latent cell (4 px here, as 8 px is SD's)
    pfg_patch: int = 4
    pfg_weight: float = 0.5
    etg_weight: float = 0.5
    #: AntiPure's t^p: the testbed GrIDPure's t* (0.02 of 1000 steps)
    t_purify: int = 20
    diffpure_t_star: float = 0.1
    diffpure_steps: int = 10
    #: GrIDPure scaled to 32 px (reference: 256/128 windows on 512 px, t = 10 of 1000, 20 iterations);
    #: 5 iterations because every iteration is a round trip through the tiny VAE, which drifts
    gridpure_window: int = 16
    gridpure_stride: int = 8
    gridpure_t_star: float = 0.02
    gridpure_steps: int = 4
    gridpure_iterations: int = 5
    gridpure_gamma: float = 0.1
    jpeg_quality: int = 75
    lora_rank: int = 4
    lora_steps: int = 200
    lora_lr: float = 2e-3
    lora_batch: int = 4
    num_samples: int = 16
    sample_steps: int = 20
    subjects: tuple = (0, 1, 2)
    seed: int = 0
    methods: tuple = tuple(PROTECTIONS)
    purifiers: tuple = PURIFIERS
    train: TrainConfig = field(default_factory=TrainConfig)


QUICK = dict(pgd_steps=10, lora_steps=30, num_samples=4, sample_steps=5, subjects=(0,), gridpure_iterations=2,
             train=TrainConfig(vae_steps=60, unet_steps=60))


def protection_kwargs(name: str, s: Settings) -> Optional[dict]:
    """``protect`` keyword arguments for protection ``name`` under settings ``s``."""
    if name not in PROTECTIONS:
        raise ValueError(f"method: unknown {name!r}; available: {', '.join(PROTECTIONS)}")
    spec = PROTECTIONS[name]
    if spec is None:
        return None
    kw = dict(spec)
    if spec["method"] == "antipure":
        kw = {"frequency": FrequencyGuidance(weight=s.pfg_weight, patch_size=s.pfg_patch),
              "timestep": TimestepGuidance(weight=s.etg_weight), "t_purify": s.t_purify, **spec}
    return kw


def purify(name: str, model, x: torch.Tensor, cond: Any, s: Settings, seed: int) -> torch.Tensor:
    """Apply attacker purifier ``name`` (the core's implementations) to ``x``."""
    g = torch.Generator().manual_seed(seed)
    if name == "none":
        return x
    if name == "diffpure":
        return diffpure(model, x, cond, t_star=s.diffpure_t_star, steps=s.diffpure_steps, generator=g)
    if name == "gridpure":
        window = lambda tile: diffpure(model, tile, cond, t_star=s.gridpure_t_star,  # noqa: E731
                                       steps=s.gridpure_steps, generator=g)
        return gridpure(x, window, window=s.gridpure_window, stride=s.gridpure_stride,
                        iterations=s.gridpure_iterations, gamma=s.gridpure_gamma)
    if name == "jpeg75":
        return jpeg(x, quality=s.jpeg_quality)
    raise ValueError(f"purifier: unknown {name!r}; available: {', '.join(PURIFIERS)}")


def customize_and_sample(model, images: torch.Tensor, cond: Any, s: Settings, seed: int) -> torch.Tensor:
    """LoRA-customize ``model.unet`` on ``images`` under ``cond``, sample, and remove the LoRA again."""
    params = add_lora(model.unet, rank=s.lora_rank, generator=torch.Generator().manual_seed(seed))
    try:
        customize(model, images, cond, params, steps=s.lora_steps, lr=s.lora_lr, batch_size=s.lora_batch,
                  generator=seed)
        h = images.shape[-1] // model.downsample
        return sample(model, cond, (s.num_samples, 4, h, h), steps=s.sample_steps, generator=seed + 1)
    finally:
        remove_lora(model.unet)
        model.requires_grad_(False)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().flatten(1).mean(1).sqrt()


def subject_distance(samples: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
    """``(N,)`` RMSE of each 4x-blurred sample to the nearest 4x-blurred photo (identity proxy, not a face model)."""
    blur = lambda x: F.avg_pool2d(x.mean(1, keepdim=True), 4)  # noqa: E731
    a, b = blur(samples), blur(photos)
    return (a[:, None] - b[None]).square().flatten(2).mean(2).sqrt().min(1).values


def score(samples, reference, photos, patch: int) -> dict[str, float]:
    """Scores of generated ``samples`` against the clean-customized ``reference`` samples and the subject."""
    return {"sample_dist": float(_rmse(samples, reference).mean()),
            "subject_dist": float(subject_distance(samples, photos).mean()),
            "grid": float(grid_artifact_score(samples, patch).mean()),
            "hf": float(high_frequency_ratio(samples, patch).mean())}


def run_repeat(model, photos: torch.Tensor, subject: int, s: Settings, log=print,
               customize_cells: bool = True) -> tuple[list[dict], dict]:
    """All methods x purifiers for one subject's ``photos`` ``(n, 3, H, W)``; rows and example images.

    ``customize_cells=False`` stops after purification (``survival`` and
    ``psnr_protected`` only): a cheap screen for many protection variants.
    """
    seed = s.seed + 1000 * subject
    cond = model.tokens("person", identity=model.rare_token(seed=subject))  # "a photo of sks person"
    null = model.tokens("null")  # the attacker purifies with an empty prompt
    reference = customize_and_sample(model, photos, cond, s, seed) if customize_cells else None
    # the unprotected photos through each purifier, with the same noise: what survives is the difference
    clean_purified = {p: purify(p, model, photos, null, s, seed) for p in s.purifiers}
    rows, examples = [], {}
    for name in s.methods:
        t0 = time.perf_counter()
        kw = protection_kwargs(name, s)
        protected = photos if kw is None else protect(model, photos, cond, eta=s.eta, alpha=s.pgd_alpha,
                                                       steps=s.pgd_steps, seed=seed, **kw)
        t_protect = time.perf_counter() - t0
        for pname in s.purifiers:
            purified = clean_purified[pname] if name == "none" else purify(pname, model, protected, null, s, seed)
            row = {"subject": subject, "seed": seed, "method": name, "purifier": pname,
                   "survival": float(_rmse(purified, clean_purified[pname]).mean() * 255),
                   "psnr_protected": float(psnr(protected, photos).clamp(max=99).mean())}
            if customize_cells:
                samples = reference if (name, pname) == ("none", "none") else \
                    customize_and_sample(model, purified, cond, s, seed)
                row.update(score(samples, reference, photos, model.downsample))
                examples[(name, pname)] = (protected[0], purified[0], samples[:6])
            rows.append(row)
        log(f"  subject {subject} {name:15s} protect {t_protect:5.1f}s, purify+customize "
            f"{time.perf_counter() - t0 - t_protect:5.1f}s  " +
            " ".join(f"{r['purifier']}={r.get('sample_dist', r['survival']):.3f}"
                     for r in rows[-len(s.purifiers):]))
    if customize_cells:
        for r in rows:  # effect of the protection beyond what the purifier alone does to the outcome
            base = next(b for b in rows if b["method"] == "none" and b["purifier"] == r["purifier"])
            r["sample_gain"] = r["sample_dist"] - base["sample_dist"]
            r["subject_gain"] = r["subject_dist"] - base["subject_dist"]
    return rows, examples


def aggregate(rows: list[dict], s: Settings) -> list[dict]:
    """Mean and sample standard deviation over repeats for every (method, purifier)."""
    out = []
    for name in s.methods:
        for pname in s.purifiers:
            cell = [r for r in rows if r["method"] == name and r["purifier"] == pname]
            agg = {"method": name, "purifier": pname, "repeats": len(cell)}
            for m in METRICS:
                if m not in cell[0]:
                    continue
                v = torch.tensor([r[m] for r in cell], dtype=torch.float64)
                agg[m] = float(v.mean())
                agg[m + "_sd"] = float(v.std()) if len(v) > 1 else float("nan")
            out.append(agg)
    return out


def ranking(agg: list[dict], rows: list[dict], s: Settings, metric: str = "sample_gain") -> list[dict]:
    """Per purifier: the best method, AntiPure's rank, and AntiPure minus the best baseline paired over repeats."""
    baselines = [m for m in s.methods if not m.startswith("antipure") and m != "none"]
    out = []
    for pname in s.purifiers:
        cells = sorted((a for a in agg if a["purifier"] == pname and a["method"] != "none"),
                       key=lambda a: -a[metric])
        order = [a["method"] for a in cells]
        entry = {"purifier": pname, "best": order[0] if order else ""}
        if "antipure" in order and baselines:
            best_base = next(m for m in order if m in baselines)
            get = lambda m: {r["subject"]: r[metric] for r in rows if r["method"] == m and r["purifier"] == pname}  # noqa: E731
            a, b = get("antipure"), get(best_base)
            diff = torch.tensor([a[k] - b[k] for k in a if k in b], dtype=torch.float64)
            entry.update({"antipure_rank": order.index("antipure") + 1, "of": len(order),
                          "best_baseline": best_base, "antipure_minus_best_baseline": float(diff.mean()),
                          "diff_sd": float(diff.std()) if len(diff) > 1 else float("nan"),
                          "antipure_wins": f"{int((diff > 0).sum())}/{len(diff)}"})
        out.append(entry)
    return out


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def write_results(out_dir: Path, tag: str, rows, agg, ranks, s: Settings, info: dict,
                  heatmap_png: bool = True) -> list[Path]:
    """Markdown table (with the settings), CSV (one line per repeat and cell) and, optionally, the heatmap PNG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out_dir / f"{tag}.csv", out_dir / f"{tag}.md", out_dir / f"{tag}_heatmap.png"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    settings = asdict(s)
    lines = [f"# Testbed results: {tag}", "",
             f"η = {s.eta * 255:.0f}/255, {s.pgd_steps} PGD steps; repeats = {len(s.subjects)} held-out subjects "
             f"{list(s.subjects)} (seed = {s.seed} + 1000·subject); values are mean ± sample s.d. over repeats.",
             f"Model: {info.get('summary', '')}",
             f"Run time so far (training included unless cached): {info.get('seconds', 0):.0f} s wall, "
             f"{info.get('cpu_seconds', 0):.0f} s CPU, on {info.get('machine', '')}.", ""]
    for metric, what in METRIC_DOC:
        table = {}
        for a in agg:
            table.setdefault(a["method"], {})[a["purifier"]] = _fmt(a[metric], a[metric + "_sd"])
        lines += [f"## {metric}: {what}", "", markdown_table(table, "method"), ""]
    for metric, table in ranks.items():
        lines += [f"## Ranking by {metric} (per purifier; AntiPure vs the best baseline, paired by subject)", "",
                  markdown_table(table), ""]
    psnr_row = {a["method"]: f"{a['psnr_protected']:.1f}" for a in agg if a["purifier"] == s.purifiers[0]}
    lines += ["## PSNR of the protected photos (dB)", "", markdown_table([psnr_row]), ""]
    lines += ["## Settings", "", "```json", json.dumps(settings, indent=1, default=str), "```", ""]
    md_path.write_text("\n".join(lines))
    if not heatmap_png:
        return [md_path, csv_path]
    heatmap(agg, s, png_path, tag)
    return [md_path, csv_path, png_path]


def heatmap(agg: list[dict], s: Settings, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("sample_gain", "sample_gain: change of the samples\nbeyond the purifier's own"),
              ("subject_gain", "subject_gain: less like the subject\nbeyond the purifier's own"),
              ("survival", "survival: perturbation left\nafter purification (1/255)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(s.methods) + 1.6))
    for ax, (metric, label) in zip(axes, panels):
        m = torch.tensor([[next(a[metric] for a in agg if a["method"] == me and a["purifier"] == p)
                           for p in s.purifiers] for me in s.methods]).numpy()
        im = ax.imshow(m, cmap="magma", aspect="auto")
        fmt = "{:.1f}" if metric == "survival" else "{:.3f}"
        ax.set_xticks(range(len(s.purifiers)), s.purifiers, rotation=30)
        ax.set_yticks(range(len(s.methods)), s.methods if ax is axes[0] else [""] * len(s.methods))
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < (m.max() + m.min()) / 2 else "black")
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{title}: mean over {len(s.subjects)} repeats (higher = stronger protection)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def example_figure(examples: dict, s: Settings, path: Path, scale: int = 3) -> None:
    """One row per method: the protected photo, then per purifier the purified photo and 3 samples (labelled)."""
    from PIL import Image, ImageDraw

    rows = []
    for name in s.methods:
        cells = [examples[(name, s.purifiers[0])][0]]
        for p in s.purifiers:
            _, purified, samples = examples[(name, p)]
            cells += [torch.ones_like(purified)[:, :, :4], purified, *samples[:3]]
        rows.append(torch.cat(cells, -1))
    grid = torch.cat(rows, -2).clamp(0, 1)
    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    size = grid.shape[-2] // len(s.methods) * scale
    left, top = 110, 28
    canvas = Image.new("RGB", (img.width + left, img.height + top), "white")
    canvas.paste(img, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((left + 2, 2), "protected", fill="black")
    block = (4 + 4 * grid.shape[-2] // len(s.methods)) * scale
    for j, p in enumerate(s.purifiers):
        draw.text((left + size + j * block + 4 * scale + 2, 2), f"{p}: purified, 3 samples", fill="black")
    for i, name in enumerate(s.methods):
        draw.text((4, top + i * size + size // 2 - 6), name, fill="black")
    canvas.save(path)


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description="AntiPure CPU efficacy testbed (protect -> purify -> customize -> score)")
    ap.add_argument("--quick", action="store_true", help="tiny version: few steps, one subject, tiny training")
    ap.add_argument("--eta", type=float, nargs="+", default=[8.0], help="budgets in 1/255 units (e.g. 8 16)")
    ap.add_argument("--subjects", type=int, nargs="+", help=f"held-out subjects in [0, {NUM_SUBJECTS})")
    ap.add_argument("--methods", nargs="+", choices=list(PROTECTIONS))
    ap.add_argument("--purifiers", nargs="+", choices=list(PURIFIERS))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override a Settings field, e.g. pfg_weight=1 t_purify=10")
    ap.add_argument("--out", type=Path, help="results folder (default: results/, or cache/quick/ with --quick)")
    ap.add_argument("--tag", default="testbed", help="file name stem of the results")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is fastest on a shared 2-core machine (2 threads stall each other)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    base = Settings(**QUICK) if a.quick else Settings()
    if a.subjects:
        base.subjects = tuple(a.subjects)
    if a.methods:
        base.methods = tuple(a.methods)
    if a.purifiers:
        base.purifiers = tuple(a.purifiers)
    for kv in a.set:
        key, value = kv.split("=", 1)
        if not hasattr(base, key):
            raise SystemExit(f"--set: unknown setting {key!r}")
        old = getattr(base, key)
        setattr(base, key, type(old)(value) if not isinstance(old, str) else value)
    out_dir = a.out or (CACHE_DIR / "quick" if a.quick else RESULTS_DIR)

    model, info = build_model(base.train, cache_dir=CACHE_DIR)
    summary = (f"TinyLDM {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
               f"{base.train.size} px, VAE PSNR {info.get('vae_psnr_db', '?')} dB, "
               f"trained in {info.get('vae_seconds', 0) + info.get('unet_seconds', 0):.0f} s"
               + (" (loaded from cache)" if info.get("cached") else ""))
    print(summary, flush=True)
    written = []
    for eta in a.eta:
        s = replace(base, eta=eta / 255)
        tag = f"{a.tag}_eta{eta:g}"
        rows, examples = [], {}
        for subject in s.subjects:
            r, ex = run_repeat(model, subject_views(subject, s.train.size), subject, s)
            rows += r
            if not examples:
                examples = ex
        agg = aggregate(rows, s)
        ranks = {m: ranking(agg, rows, s, m) for m in ("sample_gain", "subject_gain")}
        meta = {"summary": summary, "seconds": time.perf_counter() - t_start,
                "cpu_seconds": time.process_time() - cpu_start,
                "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                           f"{torch.get_num_threads()} thread(s)"}
        written += write_results(out_dir, tag, rows, agg, ranks, s, meta)
        example_figure(examples, s, out_dir / f"{tag}_examples.png")
        written.append(out_dir / f"{tag}_examples.png")
        for m, table in ranks.items():
            print(m, markdown_table(table), sep="\n", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU; wrote {', '.join(str(p) for p in written)}", flush=True)
    return written


if __name__ == "__main__":
    main()

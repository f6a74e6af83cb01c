"""How much purified_advdm's purified term and gradient route change the perturbation itself (testbed v2 models).

Protects one subject's four photos with every route, with the purified term off (``purified_weight = 0``:
AdvDM's loss on x' alone, through the same code) and with plain ``advdm``, and prints, for each pair, the
fraction of pixels whose final δ is identical and the mean |Δδ| in 1/255::

    python -m benchmarks.testbed.purified_check --subject astronaut --eta 16
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace

import torch

from .data import SUBJECTS
from .experiment import PURIFIED_ROUTES, Settings, instance_cond, job_seed, protect_photos
from .purifier import PurifierConfig
from .run import _views, load_models
from .train import MODELS_DIR, TrainConfig


def compare(deltas: dict[str, torch.Tensor]) -> list[dict]:
    """Per pair of names: fraction of equal δ entries and mean |Δδ| (1/255)."""
    return [{"a": a, "b": b, "equal": float((deltas[a] == deltas[b]).float().mean()),
             "mean_abs_diff_255": float((deltas[a] - deltas[b]).abs().mean() * 255)}
            for a, b in itertools.combinations(deltas, 2)]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subject", default="astronaut", choices=list(SUBJECTS))
    ap.add_argument("--eta", type=int, default=16)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ldm, _, adm, _ = load_models(TrainConfig(), PurifierConfig(), MODELS_DIR, verbose=False)
    subject = list(SUBJECTS).index(a.subject)
    s = Settings(eta=a.eta / 255)
    photos, set_a = _views(subject, s)
    cond, seed = instance_cond(ldm, subject), job_seed(s, subject)
    runs = {f"purified_advdm-{r}": s for r in PURIFIED_ROUTES}
    runs["purified_advdm-full w=0"] = replace(s, purified_weight=0.0)
    runs["advdm"] = s
    deltas = {}
    for label, st in runs.items():
        t0 = time.perf_counter()
        x = protect_photos(label.split()[0], ldm, adm, photos, set_a, cond, st, seed)
        deltas[label] = (x - photos).double()
        d = deltas[label]
        print(f"{label}: {time.perf_counter() - t0:.0f} s, |δ| mean {float(d.abs().mean() * 255):.2f}/255, "
              f"at the bound {float((d.abs() > st.eta - 0.6 / 255).float().mean()):.2f}", flush=True)
    out = compare(deltas)
    for r in out:
        print(f"{r['a']:26s} vs {r['b']:26s}: equal {r['equal']:.3f}, mean |Δδ| {r['mean_abs_diff_255']:.2f}/255")
    return out


if __name__ == "__main__":
    main()

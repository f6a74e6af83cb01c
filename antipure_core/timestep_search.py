"""SimAC's greedy per-image timestep-interval search.

SimAC (an ASPL variant) observes that the denoising loss's gradient on the
image is large only on some timestep intervals, and that those intervals differ
per image. Before the alternating loop it therefore searches, per image and on
the model as given, which timesteps to keep: each round draws ``candidates``
timesteps from the kept set, scores each by ``sum |grad_x L_denoise|``, removes
the ``±cut`` steps around the lowest-scoring one and takes one PGD step at the
highest-scoring one (on a working copy of the image; as in the released code,
that copy only steers the search and is then discarded). The search stops when
at most ``keep`` timesteps remain or after ``rounds`` rounds. Later PGD steps
draw each image's ``t`` from its own kept set (:func:`~antipure_core.methods.simac_loss`, registered
with the other losses).

Reference settings (somuchtome/SimAC, ``attacks/time_feature.py``):
5 candidates, cut 20, keep 100, 50 rounds, over timesteps 0...999.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .callbacks import Callback, report
from .diffusion import q_sample, randn_like
from .image import project_linf
# simac_loss is re-exported: it lived here before moving to the registry with the other losses
from .methods import _mse, simac_loss  # noqa: F401


def _positive_int(value, name: str, hint: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum} ({hint}), got {value!r}")


def check_search(candidates: int, rounds: int, keep: int, cut: int) -> None:
    """Raise a ``ValueError`` naming the bad search setting."""
    _positive_int(candidates, "search_candidates", "SimAC: 5")
    _positive_int(rounds, "search_rounds", "SimAC: 50; 0 keeps the whole range", minimum=0)
    _positive_int(keep, "search_keep", "SimAC: 100")
    _positive_int(cut, "search_cut", "SimAC: 20")


def training_loss(model, z: Tensor, t: Tensor, noise: Tensor, cond: Any, prediction: str = "eps") -> Tensor:
    """Per-sample denoising loss ``(B,)`` at latents ``z``, timesteps ``t`` and ``noise``, weighted as the
    model is trained: ε-MSE, or for ``prediction='v'`` the v-MSE, which is ε-MSE / abar_t
    (see :func:`antipure_core.customize.denoising_loss`). Used where losses at different ``t`` are compared."""
    loss = _mse(model.predict_noise(q_sample(model, z, t, noise), t, cond), noise)
    if prediction == "v":
        loss = loss / model.alphas_cumprod.to(loss.device, torch.float32)[t.to(loss.device).long()]
    return loss


def _cut(kept: Tensor, t_del: int, cut: int, lo: int) -> None:
    """Remove the ``2 * cut`` timesteps ``[t_del - cut, t_del + cut)`` from the mask ``kept`` (index 0 = ``lo``),
    with the window shifted to lie inside the range (as the released code clamps it)."""
    n = kept.shape[0]
    start = min(max(t_del - lo - cut, 0), max(n - 2 * cut, 0))
    kept[start: start + 2 * cut] = False


def search_timesteps(model, x: Tensor, cond: Any, eta: float, alpha: float, generator: torch.Generator,
                     candidates: int = 5, rounds: int = 50, keep: int = 100, cut: int = 20,
                     t_range: Optional[tuple[int, int]] = None, prediction: str = "eps",
                     callback: Callback = None, offset: int = 0, total: Optional[int] = None) -> list[Tensor]:
    """SimAC's greedy time-interval search, one image at a time.

    Args:
        model: a :class:`~antipure_core.model.DiffusionModel` (the model as given, before any fine-tuning).
        x: images ``(B, 3, H, W)`` in [0, 1], H and W multiples of ``model.downsample``.
        cond: the instance conditioning.
        eta, alpha: budget and step size (pixel scale) of the search's one PGD step per round.
        generator: CPU generator for candidates and noise.
        candidates: timesteps scored per round (SimAC: 5).
        rounds: at most this many rounds per image (SimAC: 50).
        keep: stop once at most this many timesteps remain (SimAC: 100).
        cut: each round removes the ``2 * cut`` timesteps around the lowest score (SimAC: 20 -> 40 steps).
        t_range: inclusive range searched (default the whole schedule).
        prediction: ``'eps'`` or ``'v'``: scores use the loss the model is trained with (they compare timesteps).
        callback: called after every round with ``i`` (``offset`` + image * rounds + round), ``total``,
            ``phase='search'``, ``image``, ``kept`` (timesteps left), ``score_max``, ``score_min``.

    Returns:
        One sorted integer tensor of kept timesteps per image; each holds at most ``keep`` timesteps
        unless ``rounds`` ran out first, and all lie in ``t_range``.
    """
    check_search(candidates, rounds, keep, cut)
    T = model.num_timesteps
    lo, hi = (0, T - 1) if t_range is None else (int(t_range[0]), int(t_range[1]))
    steps = torch.arange(lo, hi + 1)
    total = x.shape[0] * rounds if total is None else total
    kept_sets = []
    for b in range(x.shape[0]):
        x0 = x[b: b + 1].detach()
        xa = x0.clone()
        kept = torch.ones(steps.shape[0], dtype=torch.bool)
        for r in range(rounds):
            seq = steps[kept]
            if seq.shape[0] <= keep:
                break
            scores, ts = [], []
            with torch.enable_grad():
                xr = xa.detach().requires_grad_(True)
                z = model.encode(xr)
                for _ in range(candidates):
                    t = seq[torch.randint(seq.shape[0], (1,), generator=generator)]
                    loss = training_loss(model, z, t.to(z.device), randn_like(z, generator), cond, prediction)
                    g, = torch.autograd.grad(loss.sum(), xr, retain_graph=True)
                    scores.append(float(g.abs().sum()))
                    ts.append(int(t))
                del z
            low = min(range(candidates), key=lambda k: scores[k])   # first of equal scores, as the released code
            high = max(range(candidates), key=lambda k: scores[k])
            _cut(kept, ts[low], cut, lo)
            with torch.enable_grad():
                xr = xa.detach().requires_grad_(True)
                z = model.encode(xr)
                t = torch.tensor([ts[high]], device=z.device)
                loss = training_loss(model, z, t, randn_like(z, generator), cond, prediction)
                g, = torch.autograd.grad(loss.sum(), xr)
            with torch.no_grad():
                xa = project_linf(xa + alpha * g.sign(), x0, eta)
            report(callback, i=offset + b * rounds + r, total=total, phase="search", image=b,
                   kept=int(kept.sum()), score_max=scores[high], score_min=scores[low])
        kept_sets.append(steps[kept].clone())
    return kept_sets

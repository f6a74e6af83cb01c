"""The PGD skeleton (antipure_core.pgd): one registry filled without import side effects, no import cycle,
method flags instead of name switches, and the start/finish that protect and protect_surrogate share."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from antipure_core import purify, purify_pixel
from antipure_core.image import pad_to_multiple
from antipure_core.lora import add_lora, remove_lora
from antipure_core.methods import METHODS, Method, advdm_loss
from antipure_core.pgd import attack_context, attack_finish, attack_start, start_point
from antipure_core.protect import evaluate_objective, protect
from antipure_core.surrogate import SurrogateSettings, protect_surrogate
from tests.tiny_adm import tiny_pixel_diffusion
from tests.toy import make_toy, smooth_image

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "antipure_core"
#: the node's Combo lists list(METHODS): this order is user-visible
ORDER = ["advdm", "antipure", "mist", "photoguard", "sds", "purified_advdm", "purification_gap", "random", "aspl",
         "fsmg", "simac", "purified_aspl"]
EPS8 = 8 / 255

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    return make_toy(0)


# --- registry and imports -----------------------------------------------------------------------------------

def test_methods_module_alone_registers_every_method_in_order():
    code = ("import sys; from antipure_core.methods import METHODS; print(','.join(METHODS)); "
            "print(','.join(m for m in ('protect', 'surrogate', 'pgd') if 'antipure_core.' + m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    names, loaded = out.stdout.splitlines()
    assert names.split(",") == ORDER
    assert loaded == ""  # nothing above the registry is needed to fill it


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The antipure_core modules that ``path`` imports (relative or absolute, at any depth in the file)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (base + "." + node.module if node.module else base) if node.level else node.module
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from . import x` imports module x
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def core_import_graph() -> dict[str, set[str]]:
    files = [p for p in CORE.rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return []

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_core_modules_import_without_cycles():
    graph = core_import_graph()
    assert {"antipure_core.pgd", "antipure_core.surrogate", "antipure_core.methods"} <= set(graph)
    assert "antipure_core.methods" in graph["antipure_core.pgd"]  # the parser sees relative imports
    assert _find_cycle(graph) == []
    for below in ("pgd", "surrogate", "methods", "timestep_search"):
        assert "antipure_core.protect" not in graph[f"antipure_core.{below}"], below


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) == []


# --- flags ------------------------------------------------------------------------------------------------------

def test_flags_mark_exactly_their_methods():
    assert [n for n, m in METHODS.items() if m.encoder] == ["mist", "photoguard"]
    assert [n for n, m in METHODS.items() if m.guided] == ["antipure"]
    assert [n for n, m in METHODS.items() if m.trains] == ["aspl", "fsmg", "simac", "purified_aspl"]
    assert [n for n, m in METHODS.items() if m.purifies] == ["purified_advdm", "purification_gap", "purified_aspl"]


FLAGGED = {n for n, m in METHODS.items() if m.encoder or m.guided or m.purifies}


def _name_switches(path: Path) -> list[str]:
    """Comparisons of anything with the name of a method that has a flag (``method == "antipure"``)."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            hits += [f"{path.name}:{node.lineno} {c!r}" for c in consts if c in FLAGGED]
    return hits


def test_core_reads_flags_not_method_names():
    assert [h for p in sorted(CORE.rglob("*.py")) for h in _name_switches(p)] == []


def test_context_follows_the_guided_flag_not_the_name():
    model, cond = make_toy(0)
    x = smooth_image(1, 16, 16)
    guided = Method("custom", advdm_loss, "a guided method under another name", guided=True)
    ctx = attack_context(model, x, cond, torch.Generator(), guided)
    assert (ctx.t_lo, ctx.t_hi) == (0, 9)  # t ~ U{1..t^p}, default t^p = 10
    assert (attack_context(model, x, cond, torch.Generator(), guided, t_purify=4).t_hi) == 3
    with pytest.raises(ValueError, match="t_range: custom draws"):
        attack_context(model, x, cond, torch.Generator(), guided, t_range=(0, 5))
    plain = Method("plain", advdm_loss, "a baseline")
    assert (attack_context(model, x, cond, torch.Generator(), plain).t_hi) == model.num_timesteps - 1
    with pytest.raises(ValueError, match="t_purify: only guided methods .antipure. use t\\^p; plain takes t_range"):
        attack_context(model, x, cond, torch.Generator(), plain, t_purify=4)


# --- the shared start and finish --------------------------------------------------------------------------------

def test_start_pads_draws_and_projects():
    x = smooth_image(2, 13, 10)
    xp, x_adv, size = attack_start(x, 4, EPS8, torch.Generator().manual_seed(1), random_start=True)
    assert xp.shape == x_adv.shape == (2, 3, 16, 12) and size == (13, 10)
    assert torch.equal(xp[..., :13, :10], x) and (x_adv - xp).abs().max() <= EPS8
    assert (x_adv - xp).abs().max() > EPS8 / 2  # spread over the budget
    noise = (torch.rand(xp.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * EPS8
    assert torch.equal(x_adv, (xp + noise).clamp(xp - EPS8, xp + EPS8).clamp(0, 1))
    assert torch.equal(attack_start(x, 4, EPS8, None, random_start=False)[1], xp)


def test_finish_crops_quantizes_and_casts():
    x = smooth_image(1, 13, 10)
    x_adv = torch.rand(1, 3, 16, 12, generator=torch.Generator().manual_seed(2))
    out = attack_finish(x_adv, x, EPS8, quantize=True, like=x.double())
    assert out.shape == x.shape and out.dtype == torch.float64
    q = out.float()
    assert torch.equal(torch.round(q * 255) / 255, q) and (q - x).abs().max() <= EPS8 + 1e-7
    assert (q - x).abs().max() > EPS8 / 2  # x_adv was far outside the budget: clamped to its edge, not kept
    raw = attack_finish(x_adv, x, EPS8, quantize=False, like=x)
    assert torch.equal(raw, x_adv[..., :13, :10])


@pytest.mark.parametrize("quantize", [True, False])
def test_protect_and_protect_surrogate_share_start_and_finish(toy, quantize):
    """With a step far below float resolution, one PGD step leaves the start as it is, so each loop's output is
    its start, finished: both must be the skeleton's start and finish on the same seed."""
    model, cond = toy
    x = smooth_image(2, 33, 37)  # padded to 36 x 40 and cropped back
    kw = dict(eta=EPS8, alpha=1e-9, steps=1, seed=3, random_start=True, quantize=quantize)
    xp = pad_to_multiple(x, model.downsample)[0]
    expected = attack_finish(start_point(xp, EPS8, torch.Generator().manual_seed(3), True), x, EPS8, quantize, like=x)
    fixed = protect(model, x, cond, method="advdm", **kw)
    params = add_lora(model.unet, rank=2, generator=torch.Generator().manual_seed(0))
    try:
        trained = protect_surrogate(model, x, cond, params, "fsmg", settings=SurrogateSettings(fsmg_train_steps=1),
                                    **kw)
    finally:
        remove_lora(model.unet)
    assert torch.equal(fixed, expected) and torch.equal(trained, expected)
    assert (expected - x).abs().max() > 2 / 255
    assert torch.equal(torch.round(expected * 255) / 255, expected) == quantize


def test_random_method_is_the_random_start_finished(toy):
    model, cond = toy
    x = smooth_image(1, 33, 37)
    out = protect(model, x, cond, method="random", eta=EPS8, steps=5, seed=4)
    start = start_point(x, EPS8, torch.Generator().manual_seed(4), True)  # unpadded: no model runs
    assert torch.equal(out, attack_finish(start, x, EPS8, True, like=x))


def test_steps_zero_is_a_copy_in_both(toy):
    model, cond = toy
    x = smooth_image(1, 20, 24)
    params = add_lora(model.unet, rank=2, generator=torch.Generator().manual_seed(0))
    try:
        outs = [protect(model, x, cond, steps=0), protect_surrogate(model, x, cond, params, steps=0)]
    finally:
        remove_lora(model.unet)
    assert all(torch.equal(o, x) and o is not x for o in outs)


# --- checks once per boundary -----------------------------------------------------------------------------------

def test_pixel_gridpure_checks_the_image_once(monkeypatch):
    calls = []
    real = purify_pixel.check_image

    def spy(x, name="image", *a):
        calls.append(tuple(x.shape))
        return real(x, name, *a)
    monkeypatch.setattr(purify_pixel, "check_image", spy)
    monkeypatch.setattr(purify, "check_image", spy)
    x = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    y = purify_pixel.pixel_gridpure(tiny_pixel_diffusion(), x, t_star=2, window=16, stride=8, iterations=2,
                                    rounds=2, generator=torch.Generator().manual_seed(1))
    assert calls == [(1, 3, 24, 32)] and y.shape == x.shape


def test_evaluate_objective_checks_its_inputs(toy):
    model, cond = toy
    x = smooth_image(1, 16, 16)
    with pytest.raises(ValueError, match="x_adv: expected the shape of x"):
        evaluate_objective(model, smooth_image(1, 16, 20), x, cond, "advdm")
    with pytest.raises(ValueError, match="x_adv: values must lie in"):
        evaluate_objective(model, x * 2, x, cond, "advdm")
    with pytest.raises(ValueError, match="samples"):
        evaluate_objective(model, x, x, cond, "advdm", samples=0)
    with pytest.raises(TypeError, match="DiffusionModel"):
        evaluate_objective(object(), x, x, cond, "advdm")


def test_inside_inference_mode_the_attack_refuses_instead_of_returning_the_start(toy):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    params = add_lora(model.unet, rank=2, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            with pytest.raises(RuntimeError, match="inference_mode.*call it outside"):
                protect(model, x, cond, "advdm", eta=8 / 255, alpha=1 / 255, steps=1)
            with pytest.raises(RuntimeError, match="inference_mode"):
                protect_surrogate(model, x, cond, params, "aspl", steps=1, settings=SurrogateSettings())
    finally:
        remove_lora(model.unet)
    assert not torch.equal(protect(model, x, cond, "advdm", eta=8 / 255, alpha=1 / 255, steps=1, seed=0), x)

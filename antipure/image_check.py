"""Every input image is fully decoded before a workflow sees it.

The host's image loader retries a file it cannot read with Pillow's
``LOAD_TRUNCATED_IMAGES`` switched on, so a cut-off PNG loads with its missing
rows black and the run would report it ``ok``. Here the file is decoded with
that switch off, every frame, and the result is either a one-line description
(format, mode, size, bit depth) or :class:`BadImage` with the reason and what
to do about it.

Plain Python and Pillow: no ComfyUI.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageFile, ImageSequence, UnidentifiedImageError

__all__ = ["BadImage", "check_image", "check_images", "SUPPORTED_MODES"]

#: modes the host's LoadImage turns into RGB faithfully; 16-bit grey (``I;16``) and float (``F``)
#: are clipped to white by its ``convert("RGB")``
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I")
_BITS = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
            ".tif": "TIFF", ".tiff": "TIFF"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadImage(ValueError):
    """An input image that cannot be used; the message names the file, the reason and the fix."""


def _bit_depth(path: Path, im: Image.Image) -> int:
    if im.format == "PNG":  # Pillow reads 16-bit RGB PNGs as 8-bit RGB: the file's IHDR says what it holds
        with open(path, "rb") as f:
            head = f.read(25)
        if head.startswith(_PNG_SIGNATURE) and len(head) == 25:
            return head[24]
    return _BITS.get(im.mode, 8)


def check_image(path: str | Path) -> str:
    """Decode ``path`` completely (truncated data refused) and describe it.

    Returns:
        e.g. ``"PNG RGB 128x96 8-bit"`` (bit depth per channel as stored).

    Raises:
        BadImage: empty file, not an image, extension that does not match the content,
            truncated or corrupt data, or a mode the host does not convert to RGB faithfully.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImage(f"{path.name}: empty file (0 bytes); copy the image again")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # the host may have switched it on for its own loader
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                expected = _FORMATS.get(path.suffix.lower())
                if expected and im.format != expected:
                    raise BadImage(f"{path.name}: the file holds {im.format} data but is named "
                                   f"{path.suffix}; rename it (or convert it) so name and content agree")
                frames = 0
                for frame in ImageSequence.Iterator(im):
                    frame.load()
                    frames += 1
                mode, (w, h), fmt = im.mode, im.size, im.format
                bits = _bit_depth(path, im)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(f"{path.name}: not an image Pillow can read; replace or remove the file") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's errors for truncated or corrupt data
        raise BadImage(f"{path.name}: truncated or corrupt image data ({e}); "
                       "re-export or copy the image again") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    if mode not in SUPPORTED_MODES:
        raise BadImage(f"{path.name}: unsupported mode {mode} ({bits}-bit); the image loader would clip it. "
                       "Convert it to 8-bit RGB first (e.g. Image.open(f).convert('RGB') after scaling to 0..255)")
    return f"{fmt} {mode} {w}x{h} {bits}-bit" + (f" {frames} frames" if frames > 1 else "")


def check_images(images: Iterable[Path]) -> tuple[dict[Path, str], dict[Path, str]]:
    """Check every image: ``({usable path: description}, {refused path: reason})``, in input order."""
    good, bad = {}, {}
    for path in images:
        try:
            good[path] = check_image(path)
        except BadImage as e:
            bad[path] = str(e)
    return good, bad

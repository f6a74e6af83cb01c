"""Window geometry of GrIDPure: overlapping grid windows plus the four corners packed into one window.

One place for the layout that GrIDPure purifies through (and that an attack on
GrIDPure must see the same way). A layout is computed once per image size;
:meth:`Windows.crops` cuts an image into the windows (differentiable: slicing
and concatenation only) and :meth:`Windows.merge` puts purified windows back,
averaging overlaps.

Layout (ZhengyueZhao/GrIDPure, ``get_crop_box``/``get_corner_box``): windows of
``window x window`` at multiples of ``stride`` plus one flush with the
bottom/right border; the four ``window/2`` corner squares, covered by a
single grid window each, are packed 2 x 2 into one extra window.

Example:
    >>> w = grid_windows((512, 512), 256, 128)
    >>> len(w.boxes), w.count                      # 3 x 3 grid + the packed corners
    (9, 10)
    >>> tiles = w.crops(x)                         # 10 tensors (B, 3, 256, 256)
    >>> y = w.merge([purify(t) for t in tiles])    # (B, 3, 512, 512), overlaps averaged
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: ``(top, left, height, width)`` in pixels
Box = tuple[int, int, int, int]
#: which windows an attack sees per step: every one, or one drawn at random
WINDOW_MODES = ("all", "random")


def window_starts(n: int, window: int, stride: int) -> list[int]:
    """Window offsets along a side of ``n`` pixels: ``0, stride, 2 stride, ...`` and one flush with the end."""
    s = list(range(0, n - window + 1, stride))
    return s if s[-1] == n - window else s + [n - window]


def window_boxes(size: tuple[int, int], window: int, stride: int) -> list[Box]:
    """Overlapping windows ``(top, left, height, width)`` covering an image of ``size = (H, W)``, row by row.

    Windows are ``min(window, H) x min(window, W)`` (the whole side where the
    image is shorter than ``window``; :func:`check_window_fits` refuses that
    where a fixed window is required) at multiples of ``stride``, plus one
    flush with the bottom/right border.
    """
    h, w = size
    wh, ww = min(window, h), min(window, w)
    return [(y, x, wh, ww) for y in window_starts(h, wh, stride) for x in window_starts(w, ww, stride)]


def check_window_fits(size: tuple[int, int], window: int, name: str = "window") -> None:
    """Raise a ``ValueError`` naming ``name`` when a ``window`` square does not fit in an image of ``size``."""
    h, w = size
    if window > h or window > w:
        raise ValueError(f"{name}: {window} px is larger than the image ({h}x{w}); lower {name} to at most "
                         f"{min(h, w)} or give a larger image (GrIDPure's 256 px windows are meant for "
                         f"images of 512 px)")


@dataclass(frozen=True)
class Windows:
    """The windows of one image size.

    Attributes:
        size: image ``(H, W)``.
        boxes: grid windows, row by row.
        corners: the four corner squares ``(top, left, h, w)`` in the image, in the order top-left,
            top-right, bottom-left, bottom-right (empty when corners are not packed).
    """

    size: tuple[int, int]
    boxes: tuple[Box, ...]
    corners: tuple[Box, ...]

    @property
    def count(self) -> int:
        """Windows per pass: the grid plus one for the packed corners."""
        return len(self.boxes) + bool(self.corners)

    def packed_offsets(self) -> list[tuple[int, int]]:
        """Where each corner square sits inside the packed window: ``(top, left)`` in the 2 x 2 arrangement."""
        if not self.corners:
            return []
        ch, cw = self.corners[0][2:]
        return [(0, 0), (0, cw), (ch, 0), (ch, cw)]

    def crops(self, x: Tensor) -> list[Tensor]:
        """Cut ``x (B, C, H, W)`` into the grid windows, then the packed corner window (if any)."""
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"image: expected size {self.size} for these windows, got {tuple(x.shape[-2:])}")
        tiles = [x[..., y:y + h, l:l + w] for y, l, h, w in self.boxes]
        if self.corners:
            q = [x[..., y:y + h, l:l + w] for y, l, h, w in self.corners]
            tiles.append(torch.cat([torch.cat(q[:2], -1), torch.cat(q[2:], -1)], -2))
        return tiles

    def paste(self, x: Tensor, j: int, tile: Tensor) -> Tensor:
        """``x (B, C, H, W)`` with window ``j`` (an index into :meth:`crops`) replaced by ``tile``, out of place
        (differentiable in both)."""
        out = x.clone()
        if j < len(self.boxes):
            y, l, h, w = self.boxes[j]
            out[..., y:y + h, l:l + w] = tile
            return out
        for (y, l, h, w), (py, px) in zip(self.corners, self.packed_offsets()):
            out[..., y:y + h, l:l + w] = tile[..., py:py + h, px:px + w]
        return out

    def merge(self, tiles: list[Tensor]) -> Tensor:
        """Put ``tiles`` (as from :meth:`crops`) back into an image ``(B, C, H, W)``, averaging overlaps."""
        if len(tiles) != self.count:
            raise ValueError(f"tiles: expected {self.count} windows, got {len(tiles)}")
        ref = tiles[0]
        acc = ref.new_zeros((*ref.shape[:-2], *self.size))
        cnt = ref.new_zeros((1, 1, *self.size))
        for (y, l, h, w), tile in zip(self.boxes, tiles):
            acc[..., y:y + h, l:l + w] += tile
            cnt[..., y:y + h, l:l + w] += 1
        for (y, l, h, w), (py, px) in zip(self.corners, self.packed_offsets()):
            acc[..., y:y + h, l:l + w] += tiles[-1][..., py:py + h, px:px + w]
            cnt[..., y:y + h, l:l + w] += 1
        return acc / cnt


def pick_windows(count: int, mode: str, generator: torch.Generator) -> list[int]:
    """Indices of the windows an attack sees this step: all ``count`` (``mode = 'all'``), or one drawn from
    ``generator`` (``'random'``)."""
    if mode == "random":
        return [int(torch.randint(count, (1,), generator=generator))]
    return list(range(count))


def grid_windows(size: tuple[int, int], window: int, stride: int, pack_corners: bool = True) -> Windows:
    """The GrIDPure layout for an image of ``size = (H, W)``.

    Args:
        size: image ``(H, W)`` in pixels.
        window: window side in pixels (clipped to the image side, see :func:`window_boxes`).
        stride: grid stride in pixels, ``1 <= stride <= window`` so every pixel is covered.
        pack_corners: add the window of the four packed corner squares (GrIDPure does).

    Returns:
        :class:`Windows`; the packed window is ``2 (min(window, H) // 2) x 2 (min(window, W) // 2)``.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window: must be an integer >= 1, got {window!r}")
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride: must be an integer in [1, window = {window}] so the windows cover the image, "
                         f"got {stride!r}")
    h, w = (int(s) for s in size)
    ch, cw = min(window, h) // 2, min(window, w) // 2  # disjoint corner squares since 2 ch <= H
    corners = ((0, 0, ch, cw), (0, w - cw, ch, cw), (h - ch, 0, ch, cw), (h - ch, w - cw, ch, cw))
    return Windows((h, w), tuple(window_boxes((h, w), window, stride)), corners if pack_corners and ch and cw else ())

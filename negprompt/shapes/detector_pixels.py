"""Pixel operations of the detectors: colour in HSV, the background correction, and masks.

Colour: hue, chroma (max − min channel) and value of each pixel, the palette's hues and chromas;
the image corrected onto the world's gray background; masks: connected components, growing, hole
filling, erosion, dilation and a 2 × 2 opening (``scipy.ndimage``). All on (32, 32) images.
Used by :mod:`negprompt.shapes.detector_measures` and :mod:`negprompt.shapes.detectors`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from negprompt.shapes.detector_thresholds import (
    BACKGROUND_SHIFT_LIMIT,
)
from negprompt.shapes.scene import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    STRIPE_PERIOD,
    SUN_COLOR,
)

# ------------------------------------------------------------------ helpers


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), chroma (max − min) and value (max) of an (..., 3) float image."""
    mx = image.max(axis=-1)
    chroma = mx - image.min(axis=-1)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        mx == r,
        ((g - b) / safe) % 6.0,
        np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return hue * 60.0, chroma, mx


def _hue_distance(hue: np.ndarray, ref: float) -> np.ndarray:
    """Angular distance in degrees, [0, 180]."""
    d = np.abs(hue - ref) % 360.0
    return np.minimum(d, 360.0 - d)


def _hue_of(rgb: tuple[int, int, int]) -> float:
    return float(_hsv(np.asarray(rgb, dtype=np.float64))[0])


_COLOR_HUES = {name: _hue_of(rgb) for name, rgb in COLORS.items()}
_PALETTE_CHROMA = {name: float(max(rgb) - min(rgb)) for name, rgb in COLORS.items()}  # max − min
_COLOR_CHROMAS = {  # norm of each palette color's deviation from gray, mean removed
    name: float(np.linalg.norm(np.subtract(rgb, np.mean(rgb)))) for name, rgb in COLORS.items()
}
_SUN_HUE = _hue_of(SUN_COLOR)
_GRAY = float(np.mean(BACKGROUND))
# The stripe phase (row mod 6) of every pixel, (32, 32).
_ROW_PHASE = np.repeat(np.arange(IMAGE_SIZE) % STRIPE_PERIOD, IMAGE_SIZE).reshape(IMAGE_SIZE, IMAGE_SIZE)
_ROW_PHASE.flags.writeable = False


def _empty_mask() -> np.ndarray:
    """A fresh all-False (32, 32) mask (regions never share memory)."""
    return np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)


def _border(a: np.ndarray) -> np.ndarray:
    """The outermost pixels of an (H, W, ...) array, (2H + 2W − 4, ...)."""
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _background_corrections(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image with the border's median color moved onto the world's gray, two ways.

    Returns float (H, W, 3) images corrected by a per-channel offset (undoes a global color
    shift exactly) and by a per-channel gain (undoes a global color scaling exactly, and keeps
    black black); both clipped to BACKGROUND_SHIFT_LIMIT.
    """
    seen = np.median(_border(image), axis=0)
    gray = np.asarray(BACKGROUND, dtype=np.float64)
    shift = np.clip(seen - gray, -BACKGROUND_SHIFT_LIMIT, BACKGROUND_SHIFT_LIMIT)
    gain = gray / np.clip(seen, gray - BACKGROUND_SHIFT_LIMIT, gray + BACKGROUND_SHIFT_LIMIT)
    return image - shift, image * gain


_EDGES = ndimage.generate_binary_structure(2, 1)  # 4-neighbourhood: pixels touch through edges
_SQUARE = np.ones((3, 3), dtype=bool)  # 8-neighbourhood: also through corners
_STRIPE_BRIDGE = np.ones((STRIPE_PERIOD // 2 + 2, 1), dtype=bool)  # a column of 5 pixels


def _label(mask: np.ndarray, diagonal: bool = False) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D boolean mask: (H, W) labels 1…n (0 outside), in raster order
    of their first pixel, and n. Pixels touch through edges, and also through corners if ``diagonal``."""
    labels, count = ndimage.label(mask, structure=_SQUARE if diagonal else _EDGES)
    return labels, int(count)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest edge-connected component of the mask (the mask itself if empty; ties: the first)."""
    labels, count = _label(mask)
    if count == 0:
        return mask
    return labels == (1 + int(np.argmax(np.bincount(labels.ravel())[1:])))


def _grow(core: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The core plus the pixels of ``allowed`` 8-connected to it."""
    labels, _ = _label(core | allowed, diagonal=True)
    keep = np.unique(labels[core])
    return np.isin(labels, keep[keep > 0])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus the outside pixels not edge-connected to the image border."""
    return ndimage.binary_fill_holes(mask, structure=_EDGES)


def _erode(mask: np.ndarray) -> np.ndarray:
    """3 × 3 binary erosion (beyond the border counts as outside)."""
    return ndimage.binary_erosion(mask, structure=_SQUARE, border_value=0)


def _dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """3 × 3 binary dilation, repeated ``iterations`` (≥ 1) times."""
    return ndimage.binary_dilation(mask, structure=_SQUARE, iterations=iterations)


def _open2(mask: np.ndarray) -> np.ndarray:
    """2 × 2 binary opening: the union of the 2 × 2 blocks that lie wholly inside the mask."""
    return ndimage.binary_opening(mask, structure=np.ones((2, 2), dtype=bool))

"""Image comparison measures for edits: changed pixels, PSNR and SSIM outside a region.

Images are float arrays (H, W, 3) in [0, 1]; regions are boolean (H, W) masks of the edited area.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CHANGE_THRESHOLD = 8 / 255  # a pixel changed when some channel moved by more than this
SSIM_SIGMA = 1.5  # Gaussian window of SSIM (Wang et al. 2004), truncated at 3σ
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # stabilisers for a dynamic range of 1


def changed_pixels(a: np.ndarray, b: np.ndarray, threshold: float = CHANGE_THRESHOLD) -> np.ndarray:
    """(H, W) bool: where any channel differs by more than ``threshold``."""
    return (np.abs(a - b) > threshold).any(axis=-1)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB over the pixels of ``mask`` (all if None); inf if identical."""
    select = np.ones(a.shape[:2], bool) if mask is None else mask
    if not select.any():
        return float("nan")
    mse = float(np.mean((a[select] - b[select]) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(x, radius, mode="reflect")
    rows = sum(t * padded[i : i + x.shape[0], :] for i, t in enumerate(taps))
    return sum(t * rows[:, i : i + x.shape[1]] for i, t in enumerate(taps))


def ssim_map(a: np.ndarray, b: np.ndarray, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Per-pixel SSIM of the luminance of two RGB images, (H, W)."""
    weights = np.array([0.299, 0.587, 0.114])
    x, y = a @ weights, b @ weights
    mx, my = _blur(x, sigma), _blur(y, sigma)
    vx = _blur(x * x, sigma) - mx**2
    vy = _blur(y * y, sigma) - my**2
    cov = _blur(x * y, sigma) - mx * my
    return ((2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mx**2 + my**2 + SSIM_C1) * (vx + vy + SSIM_C2))


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM over the pixels of ``mask`` (all if None)."""
    values = ssim_map(a, b)
    select = np.ones(values.shape, bool) if mask is None else mask
    return float(values[select].mean()) if select.any() else float("nan")


def dilate(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Grows a boolean mask by ``pixels`` (≥ 0) in the 8-neighbourhood."""
    if pixels < 1:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), dtype=bool), iterations=pixels)


def locality(original: np.ndarray, edited: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """How much an edit kept: PSNR and SSIM outside ``region``, and the share of pixels changed."""
    outside = ~region
    changed = changed_pixels(original, edited)
    return {
        "psnr_outside": psnr(original, edited, outside),
        "ssim_outside": ssim(original, edited, outside),
        "changed_fraction": float(changed.mean()),
        "changed_outside_fraction": float(changed[outside].mean()) if outside.any() else float("nan"),
        "region_fraction": float(region.mean()),
    }

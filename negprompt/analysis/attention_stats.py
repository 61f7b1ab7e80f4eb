"""Statistics of cross-attention maps: pure functions on tensors, and the capture's default reducer.

The capture instrument (:mod:`negprompt.attention.capture`) only records: it hands each layer's
attention probabilities to a reducer and stores what the reducer returns. :func:`reduce_layer` is
the reducer every capture of the toolkit uses; it computes, per branch and layer,

- ``maps``: the head-averaged word maps (:func:`word_maps`), upsampled and clamped (:func:`upsample_maps`);
- ``mass``: Σ of the native-resolution word map (:func:`attention_mass`);
- ``frobenius``: ‖map‖_F of the upsampled map (:func:`frobenius_norm`), the F of the article's eq. (10);
- ``energy``: Σ_heads mean over tokens and pixels of A², each head's token maps upsampled bicubically to
  S×S and clamped ≥ 0 first (:func:`attention_energy`), the per-layer quantity of Ban et al.'s released
  ``compute_activation_ratio``.

:func:`summarize` turns a finished capture into rows with the maps' centroid and spread
(:func:`centroid`, :func:`spread`); a video's, into rows per latent frame and of the whole video.

The operations, their order and dtypes are those the goldens (``tests/golden``) were recorded with;
changing them changes the recorded numbers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from negprompt.attention.result import AttentionCapture

# ---------------------------------------------------------------- per layer


def word_maps(probabilities: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """Native-resolution word maps, (B, words, Q).

    ``probabilities``: (B, heads, Q, L) softmax over the L text tokens; ``selection``: (B, words, L)
    0/1, the tokens of each word. The map of a word is the head mean of the probabilities, summed
    over the word's tokens.
    """
    mean_heads = probabilities.mean(dim=1)  # (B, Q, L)
    return torch.einsum("bql,bwl->bwq", mean_heads, selection)


def attention_mass(maps: torch.Tensor) -> torch.Tensor:
    """Attention mass, (B, words): Σ over the Q pixels of native-resolution maps (B, words, Q)."""
    return maps.sum(dim=-1)


def upsample_maps(maps: torch.Tensor, hw: tuple[int, int], size: int) -> torch.Tensor:
    """(B, words, S, S): native maps (B, words, Q = h·w) upsampled bicubically to S×S, clamped ≥ 0."""
    batch, n_words = maps.shape[0], maps.shape[1]
    up = F.interpolate(
        maps.reshape(batch * n_words, 1, hw[0], hw[1]),
        size=(size, size),
        mode="bicubic",
        align_corners=False,
    ).clamp_min(0.0)
    return up.reshape(batch, n_words, size, size)


def frobenius_norm(maps: torch.Tensor) -> torch.Tensor:
    """‖map‖_F, (B, words), of maps (B, words, S, S): the F of the article's eq. (10)."""
    return maps.flatten(2).norm(dim=-1)


ENERGY_CHUNK_ELEMENTS = 2**24  # upsampled values held at once by attention_energy (64 MiB in float32)


@functools.lru_cache(maxsize=32)
def bicubic_matrix(n: int, size: int) -> torch.Tensor:
    """(size, n) float64: 1-D bicubic upsampling from n to size samples, exactly as
    ``F.interpolate(..., mode="bicubic", align_corners=False)`` weighs them (found by upsampling the
    identity). A 2-D bicubic upsampling is separable: up(M) = U_h M U_wᵀ."""
    identity = torch.eye(n, dtype=torch.float64).reshape(n, 1, n, 1)
    return F.interpolate(identity, size=(size, 1), mode="bicubic", align_corners=False).reshape(n, size).T.contiguous()


def attention_energy(probabilities: torch.Tensor, hw: tuple[int, int], size: int) -> torch.Tensor:
    """(B,): Σ_heads mean over the S×S pixels and all L token maps of A², for probabilities (B, heads, Q, L).

    As Ban et al.'s released ``compute_activation_ratio`` (not the article's eq. (10)): each head's
    map of each token, (h, w) = ``hw``, is upsampled bicubically to S×S (their S: the latent side)
    and clamped ≥ 0 before it is squared. The upsampling is done as two matrix products
    (:func:`bicubic_matrix`; equal to ``F.interpolate`` up to float rounding, 8× faster), a few
    thousand maps at a time to bound memory.
    """
    batch, heads, _, length = probabilities.shape
    h, w = hw
    if (h, w) == (size, size):  # upsampling to its own size is the identity, and probabilities are ≥ 0
        return probabilities.pow(2).mean(dim=(2, 3)).sum(dim=1)
    rows = bicubic_matrix(h, size).to(probabilities)  # (S, h)
    cols = bicubic_matrix(w, size).to(probabilities)  # (S, w)
    maps = probabilities.transpose(2, 3).reshape(batch * heads * length, h, w)
    sums = []
    chunk = max(1, ENERGY_CHUNK_ELEMENTS // (size * size))
    for part in maps.split(chunk):
        n = part.shape[0]
        wide = (part.reshape(n * h, w) @ cols.T).reshape(n, h, size)  # columns upsampled
        up = (wide.transpose(1, 2).reshape(n * size, h) @ rows.T).reshape(n, size, size)  # then rows
        up.clamp_(min=0.0)
        sums.append((up * up).sum(dim=(1, 2)))
    per_map = torch.cat(sums).reshape(batch, heads, length)
    return per_map.sum(dim=(1, 2)) / (length * size * size)


def reduce_layer(
    probabilities: torch.Tensor, selection: torch.Tensor, hw: tuple[int, int], size: int
) -> dict[str, torch.Tensor]:
    """The default reducer (:class:`negprompt.attention.capture.Reducer`): every stored statistic.

    ``probabilities``: (B, heads, Q, L) float32 of one branch in one layer; ``selection``: (B, words, L);
    ``hw``: the layer's map side (h, w), Q = h·w; ``size``: side S of the stored maps. Returns
    ``energy`` (B,) and, when there are words, ``mass`` and ``frobenius`` (B, words) and ``maps``
    (B, words, S, S) float32, on the probabilities' device.
    """
    reduced = {"energy": attention_energy(probabilities, hw, size)}
    if selection.shape[1] == 0:
        return reduced
    native = word_maps(probabilities, selection)
    reduced["mass"] = attention_mass(native)
    up = upsample_maps(native, hw, size)
    reduced["frobenius"] = frobenius_norm(up)
    reduced["maps"] = up
    return reduced


# ---------------------------------------------------------------- per map


def map_coordinates(size: int) -> torch.Tensor:
    """(S,) float32: the centres of S pixels in [0, 1]."""
    return (torch.arange(size, dtype=torch.float32) + 0.5) / size


def centroid(attention_map: torch.Tensor) -> tuple[float, float]:
    """(x, y) in [0, 1]: the centre of mass of one map (S, S) (rows are y); NaN for a map summing to ≤ 0."""
    coords = map_coordinates(attention_map.shape[-1])
    total = float(attention_map.sum())
    if not total > 0:
        return float("nan"), float("nan")
    cy = float((attention_map.sum(dim=1) * coords).sum() / total)
    cx = float((attention_map.sum(dim=0) * coords).sum() / total)
    return cx, cy


def spread(attention_map: torch.Tensor, center: tuple[float, float]) -> float:
    """√(mass-weighted mean squared distance to ``center`` (x, y)) of one map (S, S), in map widths.

    NaN for a map summing to ≤ 0.
    """
    coords = map_coordinates(attention_map.shape[-1])
    total = float(attention_map.sum())
    if not total > 0:
        return float("nan")
    cx, cy = center
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return float((((yy - cy) ** 2 + (xx - cx) ** 2) * attention_map).sum() / total) ** 0.5


# ---------------------------------------------------------------- per capture


def summarize(capture: AttentionCapture) -> list[dict]:
    """Per branch, word, kept step (where the branch ran) and image: mass and Σ_k‖F_k‖_F summed over
    layers, the per-layer norms, and the centroid and spread of the stored (layer-mean) map.

    A video's capture (statistics per latent frame) gives, per image, one row per latent frame (``"frame"``:
    its index, the frame's own map and statistics) and then one row of the whole video (``"frame"``: None): mass
    summed over frames, ‖F_k‖_F of the layer's map over all frames, √(Σ_f ‖F_k,f‖²_F) (as
    :func:`negprompt.analysis.strength.strength_curves` takes it), centroid and spread of the frames' summed map,
    and ``centroid_frame``, the mass-weighted mean latent frame. An image's rows have no ``"frame"``."""
    rows = []
    for branch, words in capture.index["words"].items():
        present = capture.present(branch)
        for word in words:
            maps = capture.maps(branch, word)  # (steps, B, S, S); a video's (steps, B, F′, S, S)
            frob = capture.frobenius(branch, word)  # (steps, layers, B[, F′])
            mass = capture.mass(branch, word)
            for s, step in enumerate(capture.index["steps"]):
                if not bool(present[s]):
                    continue
                for b in range(maps.shape[1]):
                    key = {"branch": branch, "word": word, "step": step, "image": b}
                    if capture.frames is None:
                        rows.append(key | map_row(maps[s, b], mass[s, :, b], frob[s, :, b]))
                    else:
                        rows += video_rows(key, maps[s, b], mass[s, :, b], frob[s, :, b])
    return rows


def map_row(attention_map: torch.Tensor, mass: torch.Tensor, frobenius: torch.Tensor) -> dict:
    """The numbers of one summary row: ``attention_map`` (S, S), ``mass`` and ``frobenius`` (layers,)."""
    cx, cy = centroid(attention_map)
    return {
        "mass": float(mass.sum()),
        "frobenius_sum": float(frobenius.sum()),
        "frobenius_per_layer": [round(float(x), 6) for x in frobenius],
        "centroid_x": cx,
        "centroid_y": cy,
        "spread": spread(attention_map, (cx, cy)),
    }


def video_rows(key: dict, maps: torch.Tensor, mass: torch.Tensor, frobenius: torch.Tensor) -> list[dict]:
    """One video's rows at one step: each latent frame's, then the whole video's (``"frame"``: None).

    ``maps`` (F′, S, S), ``mass`` and ``frobenius`` (layers, F′)."""
    rows = [key | {"frame": f} | map_row(maps[f], mass[:, f], frobenius[:, f]) for f in range(maps.shape[0])]
    per_frame_mass = mass.sum(dim=0)  # (F′,)
    total = float(per_frame_mass.sum())
    frame_centre = float((per_frame_mass * torch.arange(maps.shape[0])).sum() / total) if total > 0 else float("nan")
    whole = map_row(maps.sum(dim=0), mass, frobenius.square().sum(dim=1).sqrt())
    rows.append(key | {"frame": None} | whole | {"centroid_frame": frame_centre})
    return rows

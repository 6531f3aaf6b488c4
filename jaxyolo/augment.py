"""On-device training augmentation of the reference (yolov5 / ScaledYOLOv4 `utils/datasets.py`, docs/reference.md §9).

Everything here is a pure function over fixed shapes, so it jits, vmaps over a population of
hyper-parameter sets (every `hyp` value is an array leaf, never a Python constant) and needs no
host callback. Randomness comes from an explicit `jax.random` key, split once per purpose.

The per-sample building blocks take one image (H, W, 3) and its padded boxes (M, 4) xyxy in
pixels with a bool validity mask (M,):

- `random_perspective`  the reference's affine/perspective warp plus box transform and filtering
- `mixup`               blend with a partner sample, labels concatenated
- `hsv_augment`         the reference's random HSV gains
- `flip`                flipud / fliplr

`augment_batch` composes them in the reference's order for a batch: (mosaic or letterbox, on the
host) → random_perspective → mixup → hsv → flipud / fliplr. (It runs the flips before HSV: HSV is
a per-pixel map with per-sample gains and flips only permute pixels, so the two orders give the
same result, and this one is ~1.5× faster on CPU.)

What is exact and what is approximated, against the OpenCV reference:

- The transform matrix M = T @ S @ R @ P @ C and the box transform / clipping / `box_candidates`
  filter follow the reference formula for formula.
- The warp is bilinear with a constant 114/255 border, and follows cv2's pixel convention: output
  pixel at *integer* coordinates (x, y) reads the source at M^-1 @ (x, y, 1) (no half-pixel
  shift), a neighbour outside the source contributes the border value. cv2 quantises the source
  coordinate to 1/32 pixel and the weights to 15 bits; here the coordinate is float32 and the
  weights are float32 for float images, 15-bit fixed point for uint8 ones (blended in integers,
  as cv2 does), so values differ from cv2 by at most about 1/32 of a neighbour difference.
- HSV is done in float on [0, 1] RGB (hue in [0, 1) = cv2's H / 180), not through cv2's uint8
  HSV round trip and look-up tables, so there is no 8-bit rounding.
- mixup's partner is the batch rolled by one (its perspective-warped image and boxes), where the
  reference loads a fresh random mosaic; as in the reference, mixup is only applied to samples
  that took the mosaic branch. r ~ Beta(alpha, alpha), alpha = 32 (yolov5; ScaledYOLOv4 used 8:
  `mixup_alpha`), sampled exactly for integer alpha as a ratio of Gamma sums.
- The random numbers are the same distributions as the reference's but not its stream (`random`
  / `np.random` vs `jax.random`), so no sample is bit-for-bit the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

HYP_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
            "flipud", "fliplr", "mosaic", "mixup")
BORDER_VALUE = 114.0 / 255.0  # the reference's grey (114, 114, 114)


# ---------------------------------------------------------------------------------------------
# random_perspective


def perspective_matrix(in_hw, out_hw, *, angle=0.0, scale=1.0, shear_x=0.0, shear_y=0.0, persp_x=0.0,
                       persp_y=0.0, trans_x=0.5, trans_y=0.5):
    """The reference's M = T @ S @ R @ P @ C and its inverse, from explicit parameters.

    `in_hw`/`out_hw` are static (height, width); `angle`, `shear_x`, `shear_y` in degrees; `scale`
    the isotropic scale of cv2.getRotationMatrix2D(center=(0, 0), angle, scale); `persp_x/y` are
    P[2, 0] and P[2, 1]; `trans_x/y` fractions of the output size (0.5 = centred). The inverse is
    built from the inverses of the factors, so an affine M has an exact (0, 0, 1) last row.
    """
    f32 = jnp.float32
    hi, wi = in_hw
    ho, wo = out_hw
    one, zero = jnp.ones((), f32), jnp.zeros((), f32)

    def mat(rows):
        return jnp.stack([jnp.stack([jnp.asarray(v, f32) for v in row]) for row in rows])

    a = jnp.asarray(angle, f32) * (math.pi / 180)
    s = jnp.asarray(scale, f32)
    alpha, beta = s * jnp.cos(a), s * jnp.sin(a)
    shx = jnp.tan(jnp.asarray(shear_x, f32) * (math.pi / 180))
    shy = jnp.tan(jnp.asarray(shear_y, f32) * (math.pi / 180))
    px, py = jnp.asarray(persp_x, f32), jnp.asarray(persp_y, f32)
    tx, ty = jnp.asarray(trans_x, f32) * wo, jnp.asarray(trans_y, f32) * ho

    c = mat([[one, zero, -wi / 2], [zero, one, -hi / 2], [zero, zero, one]])
    p = mat([[one, zero, zero], [zero, one, zero], [px, py, one]])
    r = mat([[alpha, beta, zero], [-beta, alpha, zero], [zero, zero, one]])  # cv2 rotation, centre (0, 0)
    sh = mat([[one, shx, zero], [shy, one, zero], [zero, zero, one]])
    t = mat([[one, zero, tx], [zero, one, ty], [zero, zero, one]])

    c_inv = mat([[one, zero, wi / 2], [zero, one, hi / 2], [zero, zero, one]])
    p_inv = mat([[one, zero, zero], [zero, one, zero], [-px, -py, one]])
    ca, sa = jnp.cos(a) / s, jnp.sin(a) / s
    r_inv = mat([[ca, -sa, zero], [sa, ca, zero], [zero, zero, one]])  # R^-1 = rot^T / s
    det = 1 - shx * shy
    sh_inv = mat([[one / det, -shx / det, zero], [-shy / det, one / det, zero], [zero, zero, one]])
    t_inv = mat([[one, zero, -tx], [zero, one, -ty], [zero, zero, one]])

    def chain(*ms):  # 3×3 products as exact float32 multiply-adds (no dot: no TF32 on GPUs, fuses on CPU)
        out = ms[0]
        for m in ms[1:]:
            out = (out[:, :, None] * m[None, :, :]).sum(1)
        return out

    return chain(t, sh, r, p, c), chain(c_inv, p_inv, r_inv, sh_inv, t_inv)


def sample_perspective_params(key, *, degrees, translate, scale, shear, perspective):
    """Draw the reference's random parameters (keyword arguments of `perspective_matrix`).

    a ~ U(-degrees, degrees), s ~ U(1 - scale, 1 + scale), shears ~ U(-shear, shear) deg,
    P[2, :2] ~ U(-perspective, perspective), T fractions ~ U(0.5 - translate, 0.5 + translate).
    Each is `gain * u` with u ~ U(-1, 1), so a zero gain gives exactly the identity value.
    """
    u = jax.random.uniform(key, (8,), jnp.float32, -1.0, 1.0)
    return {"angle": degrees * u[0], "scale": 1 + scale * u[1], "shear_x": shear * u[2], "shear_y": shear * u[3],
            "persp_x": perspective * u[4], "persp_y": perspective * u[5], "trans_x": 0.5 + translate * u[6],
            "trans_y": 0.5 + translate * u[7]}


def to_unit(image):
    """An image as float32 in [0, 1]: uint8 → value / 255; float stays as is (taken as already
    in [0, 1]). The one conversion of the library (training, validation, prediction)."""
    if image.dtype == jnp.uint8:
        return image.astype(jnp.float32) / 255.0
    return image.astype(jnp.float32)


def _axis_weights(c0, frac, start, n):
    """Bilinear weights along one axis onto the 2-wide patch [start, start + 1]: the taps c0 (weight
    1 - frac) and c0 + 1 (frac) that lie inside [0, n) land on patch slot c - start; outside taps
    get no slot (their weight goes to the border value)."""
    w0 = jnp.where((c0 >= 0) & (c0 < n), 1 - frac, 0.0)
    w1 = jnp.where((c0 + 1 >= 0) & (c0 + 1 < n), frac, 0.0)
    return _onto_patch(c0, start, w0, w1)


def _axis_weights_fixed(c0, frac, start, n):
    """`_axis_weights` in fixed point: int32, 1.0 = `_ONE`."""
    f = jnp.round(frac * _ONE).astype(jnp.int32)
    w0 = jnp.where((c0 >= 0) & (c0 < n), _ONE - f, 0)
    w1 = jnp.where((c0 + 1 >= 0) & (c0 + 1 < n), f, 0)
    return _onto_patch(c0, start, w0, w1)


def _onto_patch(c0, start, w0, w1):
    p0 = jnp.where(c0 == start, w0, 0) + jnp.where(c0 + 1 == start, w1, 0)
    p1 = jnp.where(c0 == start + 1, w0, 0) + jnp.where(c0 + 1 == start + 1, w1, 0)
    return p0[..., None], p1[..., None]


# uint8 images are blended in integers, as cv2 does: weights in 15-bit fixed point, the vertical
# pass rounded to 7 fractional bits, so the horizontal pass stays below 255 * 2^22 < 2^31. The
# result is within 0.012 of a grey level of the float blend. On the CPU this is not only exact
# enough but fast: XLA's integer loops run the warp of a 32 x 128 px batch in 2-3 ms, where its
# float32 elementwise kernels (YNNPACK, `jaxyolo.xla_cpu`) took 15 ms for the same blend.
_FRACTION_BITS = 15
_ONE = 1 << _FRACTION_BITS
_SHIFT = 8  # vertical-pass bits dropped before the horizontal pass


def _vertical(wy0, wy1, top, bottom, grey: int):
    """Fixed-point blend of two source rows (or patch rows) with the border weight; `_SHIFT` bits
    rounded off."""
    i32 = jnp.int32
    v = wy0 * top.astype(i32) + wy1 * bottom.astype(i32) + (_ONE - wy0 - wy1) * grey
    return (v + (1 << (_SHIFT - 1))) >> _SHIFT


def _horizontal(wx0, wx1, left, right, grey: int):
    """The second pass of `_vertical`'s blend, to float32 in [0, 1]."""
    v = wx0 * left + wx1 * right + (_ONE - wx0 - wx1) * (grey << (_FRACTION_BITS - _SHIFT))
    return v.astype(jnp.float32) * jnp.float32(1 / (255 * (1 << (2 * _FRACTION_BITS - _SHIFT))))


def _grey_level(border_value: float) -> int:
    return int(round(float(border_value) * 255))


def _source_coords(m_inv, out_hw, hw):
    """(sx, sy): where each output pixel reads the source, clipped to [-2, size + 1]."""
    h, w = hw
    ho, wo = out_hw
    m = m_inv.astype(jnp.float32)
    ys, xs = jnp.meshgrid(jnp.arange(ho, dtype=jnp.float32), jnp.arange(wo, dtype=jnp.float32), indexing="ij")
    den = m[2, 0] * xs + m[2, 1] * ys + m[2, 2]
    den = jnp.where(jnp.abs(den) > 1e-12, den, 1e-12)
    # clip far-away coordinates (also inf from a tiny divisor) before the int cast: anything beyond
    # [-2, size + 1] has all 4 neighbours outside, so the result is unchanged
    sx = jnp.clip(jnp.nan_to_num((m[0, 0] * xs + m[0, 1] * ys + m[0, 2]) / den, nan=-2.0), -2.0, w + 1.0)
    sy = jnp.clip(jnp.nan_to_num((m[1, 0] * xs + m[1, 1] * ys + m[1, 2]) / den, nan=-2.0), -2.0, h + 1.0)
    return sx, sy


def warp_image(image, m_inv, out_hw, border_value=BORDER_VALUE):
    """Bilinear warp of (H, W, C) into (Ho, Wo, C) float32 in [0, 1] with a constant border.

    Output pixel (x, y), integer coordinates, reads the source at (u, v) = M^-1 @ (x, y, 1) after
    the perspective divide (cv2's warpAffine/warpPerspective convention: no half-pixel shift). Of
    the 4 neighbours floor/ceil(u, v), each one outside the source contributes `border_value`
    (cv2 BORDER_CONSTANT). A uint8 image is gathered as uint8 and blended in fixed point (see
    `_FRACTION_BITS`) with the border at the nearest grey level; a float one is read as already in
    [0, 1].

    One gather per output pixel fetches the 2×2 patch starting at (clip(floor(v), 0, H - 2),
    clip(floor(u), 0, W - 2)), which holds every neighbour that is inside the image; the weights
    are moved onto the patch slots (several times faster on CPU than 4 single-pixel gathers).
    """
    h, w, ch = image.shape
    if h < 2 or w < 2:
        raise ValueError(f"warp_image needs an image of at least 2×2 pixels, got {image.shape}")
    ho, wo = out_hw
    sx, sy = _source_coords(m_inv, out_hw, (h, w))
    x0f, y0f = jnp.floor(sx), jnp.floor(sy)
    x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
    px, py = jnp.clip(x0, 0, w - 2), jnp.clip(y0, 0, h - 2)  # patch origin
    starts = jnp.stack([py.reshape(-1), (px * ch).reshape(-1)], -1)
    dnums = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2), collapsed_slice_dims=(), start_index_map=(0, 1))
    patch = jax.lax.gather(image.reshape(h, w * ch), starts, dnums, slice_sizes=(2, 2 * ch), mode="clip")
    patch = patch.reshape(ho, wo, 2, 2, ch)
    if image.dtype == jnp.uint8:
        grey = _grey_level(border_value)
        wx0, wx1 = _axis_weights_fixed(x0, sx - x0f, px, w)
        wy0, wy1 = _axis_weights_fixed(y0, sy - y0f, py, h)
        left = _vertical(wy0, wy1, patch[:, :, 0, 0], patch[:, :, 1, 0], grey)
        right = _vertical(wy0, wy1, patch[:, :, 0, 1], patch[:, :, 1, 1], grey)
        return _horizontal(wx0, wx1, left, right, grey)
    wx0, wx1 = _axis_weights(x0, sx - x0f, px, w)
    wy0, wy1 = _axis_weights(y0, sy - y0f, py, h)
    patch = to_unit(patch)
    out = wy0 * (wx0 * patch[:, :, 0, 0] + wx1 * patch[:, :, 0, 1]) + wy1 * (wx0 * patch[:, :, 1, 0] + wx1 * patch[:, :, 1, 1])
    return out + (1 - (wy0 + wy1) * (wx0 + wx1)) * jnp.float32(border_value)


def warp_image_axis_aligned(image, m_inv, out_hw, border_value=BORDER_VALUE):
    """`warp_image` for a transform without rotation, shear or perspective: only M^-1's diagonal
    scale and its translation column are read (the caller guarantees the rest is 0, 0, 1).

    The source coordinates are then separable (u depends on x only, v on y only), so the warp
    gathers two source rows per output row, blends them, then two columns per output column:
    2·(Ho + Wo) gathers of whole rows and columns instead of Ho·Wo patch gathers (on the CPU
    about 10× faster than `warp_image` for a 128 px batch). Same pixel convention, border and
    uint8 fixed-point blend as `warp_image`, so the same values (float32 images: to rounding).
    """
    h, w, ch = image.shape
    if h < 2 or w < 2:
        raise ValueError(f"warp_image needs an image of at least 2×2 pixels, got {image.shape}")
    ho, wo = out_hw
    m = m_inv.astype(jnp.float32)
    sx = jnp.clip(m[0, 0] * jnp.arange(wo, dtype=jnp.float32) + m[0, 2], -2.0, w + 1.0)
    sy = jnp.clip(m[1, 1] * jnp.arange(ho, dtype=jnp.float32) + m[1, 2], -2.0, h + 1.0)
    x0f, y0f = jnp.floor(sx), jnp.floor(sy)
    x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
    px, py = jnp.clip(x0, 0, w - 2), jnp.clip(y0, 0, h - 2)
    if image.dtype == jnp.uint8:
        grey = _grey_level(border_value)
        wx0, wx1 = _axis_weights_fixed(x0, sx - x0f, px, w)  # (Wo, 1)
        wy0, wy1 = _axis_weights_fixed(y0, sy - y0f, py, h)  # (Ho, 1)
        rows = _vertical(wy0[:, None], wy1[:, None], image[py], image[py + 1], grey)  # (Ho, W, C)
        return _horizontal(wx0[None], wx1[None], rows[:, px], rows[:, px + 1], grey)
    wx0, wx1 = _axis_weights(x0, sx - x0f, px, w)  # (Wo, 1)
    wy0, wy1 = _axis_weights(y0, sy - y0f, py, h)  # (Ho, 1)
    rows = wy0[:, None] * to_unit(image[py]) + wy1[:, None] * to_unit(image[py + 1])  # (Ho, W, C)
    out = wx0[None] * rows[:, px] + wx1[None] * rows[:, px + 1]
    inside = (wy0 + wy1)[:, None] * (wx0 + wx1)[None]
    return out + (1 - inside) * jnp.float32(border_value)


def box_candidates(box1, box2, wh_thr=2.0, ar_thr=20.0, area_thr=0.1, eps=1e-16):
    """The reference's filter: box2 (new, (..., 4) xyxy) is kept when w, h > wh_thr pixels,
    area / area(box1) > area_thr and aspect max(w/h, h/w) < ar_thr. box1 is the old box × s."""
    w1, h1 = box1[..., 2] - box1[..., 0], box1[..., 3] - box1[..., 1]
    w2, h2 = box2[..., 2] - box2[..., 0], box2[..., 3] - box2[..., 1]
    ar = jnp.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def warp_boxes(boxes, mask, m, out_hw, scale):
    """Transform xyxy boxes by M (4 corners, perspective divide, min/max), clip to the output and
    keep the `box_candidates` (old box × `scale` vs new). Returns (boxes, mask); dropped rows are 0."""
    ho, wo = out_hw
    m = m.astype(jnp.float32)
    x1, y1, x2, y2 = (boxes[..., i].astype(jnp.float32) for i in range(4))
    cx = jnp.stack([x1, x2, x1, x2], -1)  # corners x1y1, x2y2, x1y2, x2y1
    cy = jnp.stack([y1, y2, y2, y1], -1)
    den = m[2, 0] * cx + m[2, 1] * cy + m[2, 2]
    px = (m[0, 0] * cx + m[0, 1] * cy + m[0, 2]) / den
    py = (m[1, 0] * cx + m[1, 1] * cy + m[1, 2]) / den
    new = jnp.stack([jnp.clip(px.min(-1), 0, wo), jnp.clip(py.min(-1), 0, ho),
                     jnp.clip(px.max(-1), 0, wo), jnp.clip(py.max(-1), 0, ho)], -1)
    keep = mask & box_candidates(boxes.astype(jnp.float32) * scale, new)
    return jnp.where(keep[..., None], new, 0.0), keep


def _border_hw(border):
    return tuple(int(b) for b in border) if isinstance(border, (tuple, list)) else (int(border), int(border))


def random_perspective(key, image, boxes, mask, *, degrees, translate, scale, shear, perspective, border=0,
                       axis_aligned: bool = False):
    """The reference's random_perspective for one image (H, W, 3) and its boxes (M, 4) + mask (M,).

    The output is (H + 2·border_h, W + 2·border_w): `border` (static int or (h, w) pair) is
    -s/2 for the 2s×2s mosaic canvas (giving s×s) and 0 for a single image. Returns
    (image float32 in [0, 1], boxes, mask) with dropped boxes masked out and zeroed.
    `axis_aligned=True` (static) draws no rotation, shear or perspective, whatever `degrees`,
    `shear` and `perspective` say, and warps with `warp_image_axis_aligned`; the caller sets it
    when those three are 0, where it gives the general path's result.
    """
    bh, bw = _border_hw(border)
    in_hw = image.shape[:2]
    out_hw = (in_hw[0] + 2 * bh, in_hw[1] + 2 * bw)
    if axis_aligned:
        degrees = shear = perspective = 0.0
    params = sample_perspective_params(key, degrees=degrees, translate=translate, scale=scale, shear=shear,
                                       perspective=perspective)
    m, m_inv = perspective_matrix(in_hw, out_hw, **params)
    out = (warp_image_axis_aligned if axis_aligned else warp_image)(image, m_inv, out_hw)
    boxes, mask = warp_boxes(boxes, mask, m, out_hw, params["scale"])
    return out, boxes, mask


# ---------------------------------------------------------------------------------------------
# HSV


def apply_hsv_gains(image, gains):
    """The reference's augment_hsv with given gains r = (r_h, r_s, r_v), in float:
    h' = (h · r_h) mod 1 (cv2: (H · r_h) mod 180), s' = clip(s · r_s, 0, 1), v' = clip(v · r_v, 0, 1).

    HSV follows colorsys' conventions (hue 0 for greys); back to RGB, channel n ∈ (5, 3, 1) is
    v - v·s·clip(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6. Written on the three (…, H, W)
    colour planes, and without float `mod`: an image's last axis of 3 leaves XLA's CPU kernels
    mostly idle vector lanes, and `mod` is a library call per element (32 images of 128² took
    10.1 ms with both, 2.8 ms without)."""
    gains = jnp.asarray(gains, jnp.float32)
    x = to_unit(image)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx = jnp.maximum(jnp.maximum(r, g), b)
    c = mx - jnp.minimum(jnp.minimum(r, g), b)
    inv_c = 1.0 / jnp.where(c > 0, c, 1.0)
    h6 = jnp.where(r == mx, (g - b) * inv_c, jnp.where(g == mx, 2.0 + (b - r) * inv_c, 4.0 + (r - g) * inv_c))
    h = jnp.where(c > 0, jnp.where(h6 < 0, h6 + 6.0, h6) * (1.0 / 6.0), 0.0)  # h6 ∈ [-1, 5]
    s = jnp.where(mx > 0, c / jnp.where(mx > 0, mx, 1.0), 0.0)
    h = h * gains[0]
    h = h - jnp.floor(h)
    s = jnp.clip(s * gains[1], 0.0, 1.0)
    v = jnp.clip(mx * gains[2], 0.0, 1.0)
    vs = v * s

    def channel(n):  # n + 6h ∈ [n, n + 6): one subtraction is mod 6
        k = n + 6.0 * h
        k = jnp.where(k >= 6.0, k - 6.0, k)
        return jnp.clip(v - vs * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0), 0.0, 1.0)

    return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], -1)


def hsv_augment(key, image, hsv_h, hsv_s, hsv_v):
    """Random HSV gains r = U(-1, 1)^3 · (hsv_h, hsv_s, hsv_v) + 1 applied by `apply_hsv_gains`."""
    gains = jax.random.uniform(key, (3,), jnp.float32, -1.0, 1.0) * jnp.stack(
        [jnp.asarray(hsv_h, jnp.float32), jnp.asarray(hsv_s, jnp.float32), jnp.asarray(hsv_v, jnp.float32)]) + 1
    return apply_hsv_gains(image, gains)


# ---------------------------------------------------------------------------------------------
# flips and mixup


def flip(key, image, boxes, flipud, fliplr):
    """Flip up-down with probability `flipud`, then left-right with probability `fliplr`; boxes
    (M, 4) xyxy are mirrored (x1, x2) → (W - x2, W - x1)."""
    h, w = image.shape[:2]
    u = jax.random.uniform(key, (2,))
    do_ud, do_lr = u[0] < flipud, u[1] < fliplr
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    # one gather with flipped indices: each pixel of the producer is read once (a select between
    # image and image[::-1] would make XLA recompute a fused producer, e.g. the HSV, per branch)
    rows = jnp.where(do_ud, h - 1 - jnp.arange(h), jnp.arange(h))
    cols = jnp.where(do_lr, w - 1 - jnp.arange(w), jnp.arange(w))
    image = image[rows[:, None], cols[None, :]]
    y1, y2 = jnp.where(do_ud, h - y2, y1), jnp.where(do_ud, h - y1, y2)
    x1, x2 = jnp.where(do_lr, w - x2, x1), jnp.where(do_lr, w - x1, x2)
    return image, jnp.stack([x1, y1, x2, y2], -1)


def _apply_and_beta(key, prob, alpha):
    """(u < prob, r ~ Beta(alpha, alpha)). For an integer alpha (32 in yolov5, 8 in ScaledYOLOv4)
    exactly, as X / (X + Y) with X, Y ~ Gamma(alpha) = sums of alpha Exp(1) = -log(1 - U) draws,
    all from one uniform draw (loop-free and cheap to compile); other alphas use the rejection
    sampler of `jax.random.beta`."""
    if float(alpha).is_integer() and 0 < alpha <= 256:
        u = jax.random.uniform(key, (1 + 2 * int(alpha),))
        e = -jnp.log1p(-u[1:].reshape(2, int(alpha))).sum(-1)
        return u[0] < prob, e[0] / (e[0] + e[1])
    k_p, k_r = jax.random.split(key)
    return jax.random.uniform(k_p) < prob, jax.random.beta(k_r, alpha, alpha, dtype=jnp.float32)


def mixup(key, prob, image, boxes, classes, mask, image2, boxes2, classes2, mask2, *, alpha=32.0):
    """With probability `prob`: image = r·image + (1 - r)·image2, r ~ Beta(alpha, alpha) (`alpha`
    static). Labels are always concatenated to (2M, ...) so the shape is fixed; the partner's rows are masked out
    when mixup is not applied."""
    apply, r = _apply_and_beta(key, prob, alpha)
    image = jnp.where(apply, r * image + (1 - r) * image2, image)
    return (image, jnp.concatenate([boxes, boxes2], 0), jnp.concatenate([classes, classes2], 0),
            jnp.concatenate([mask, mask2 & apply], 0))


# ---------------------------------------------------------------------------------------------
# the batch


def _pad_rows(x, n):
    """Pad axis 1 (the box axis) with zeros / False to n rows."""
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def augment_batch(key, hyp: Mapping[str, jax.Array], mosaic_canvas, mosaic_boxes, mosaic_classes, mosaic_mask,
                  single_image, single_boxes, single_classes, single_mask, *, out_size: int, mixup_alpha=32.0,
                  mixup_rows: bool = True, axis_aligned: bool = False):
    """Augment a batch the reference's way, one compiled program whatever the hyper-parameters.

    mosaic_canvas (B, 2s, 2s, 3) and single_image (B, s, s, 3, letterboxed) are uint8 or float in
    [0, 1]; their boxes (B, Mm, 4) and (B, M, 4) xyxy pixels in their own canvas, classes int,
    masks bool (the batch keys of `jaxyolo.data.loader.train_batches`). The four mosaic inputs may
    be None (a pipeline built without canvases): every sample then takes the single branch. `hyp`
    maps every name in `HYP_KEYS` to a scalar (array); vmap over it for a population.

    Per sample, the mosaic branch is taken with probability hyp['mosaic']; otherwise the single
    image is embedded in the centre of a grey 2s×2s canvas, which, warped with border -s/2, gives
    exactly the single image warped with border 0 (C shifts by the embedding offset), so both
    branches share one warp. Then mixup (mosaic samples only, partner = batch rolled by one),
    HSV, flipud, fliplr (flips computed before HSV, which commutes with them).

    Returns images (B, s, s, 3) float32 in [0, 1], boxes (B, 2N, 4), classes (B, 2N) int32, mask
    (B, 2N), N = max(M, Mm): rows [N:] are the mixup partner's, masked out where mixup was not
    applied; masked rows are 0. `mixup_rows=False` (every member's mixup probability is 0) skips
    mixup and returns N rows: the loss's cost grows with the rows. `axis_aligned=True` (every
    member's degrees, shear and perspective are 0) takes the separable warp of
    `random_perspective`, with the same result and several times faster on the CPU.
    """
    s = int(out_size)
    b = single_image.shape[0]
    if s % 2 or single_image.shape[1:] != (s, s, 3):
        raise ValueError(f"expected single_image (B, {s}, {s}, 3) with an even out_size, got {single_image.shape}")
    if mosaic_canvas is not None and mosaic_canvas.shape != (b, 2 * s, 2 * s, 3):
        raise ValueError(f"expected mosaic_canvas ({b}, {2 * s}, {2 * s}, 3), got {mosaic_canvas.shape}")
    missing = [k for k in HYP_KEYS if k not in hyp]
    if missing:
        raise KeyError(f"augment_batch: hyp lacks {missing}")
    hp = {k: jnp.asarray(hyp[k], jnp.float32) for k in HYP_KEYS}

    off = s // 2
    uint8 = single_image.dtype == jnp.uint8 and (mosaic_canvas is None or mosaic_canvas.dtype == jnp.uint8)
    if uint8:
        single, grey = single_image, 114
    else:  # gather float; the warp reads float as already in [0, 1]
        single, grey = to_unit(single_image), BORDER_VALUE
    canvas_s = jnp.pad(single, ((0, 0), (off, off), (off, off), (0, 0)), constant_values=grey)
    single_boxes = single_boxes.astype(jnp.float32) + off
    if mosaic_canvas is None:
        canvas_m, mosaic_boxes, mosaic_classes, mosaic_mask = canvas_s, single_boxes, single_classes, single_mask
    else:
        canvas_m = mosaic_canvas if uint8 else to_unit(mosaic_canvas)
    n = max(single_boxes.shape[1], mosaic_boxes.shape[1])

    keys = jax.random.split(key, (b, 5))  # per sample, per purpose
    k_branch, k_persp, k_mix, k_hsv, k_flip = (keys[:, i] for i in range(5))

    use_mosaic = jax.vmap(jax.random.uniform)(k_branch) < hp["mosaic"]  # (B,)
    if mosaic_canvas is None:
        use_mosaic = jnp.zeros_like(use_mosaic)
    sel = use_mosaic[:, None]
    canvas = jnp.where(use_mosaic[:, None, None, None], canvas_m, canvas_s)
    boxes = jnp.where(sel[..., None], _pad_rows(mosaic_boxes.astype(jnp.float32), n), _pad_rows(single_boxes, n))
    classes = jnp.where(sel, _pad_rows(mosaic_classes, n), _pad_rows(single_classes, n)).astype(jnp.int32)
    mask = jnp.where(sel, _pad_rows(mosaic_mask, n), _pad_rows(single_mask, n)).astype(bool)

    def persp(k, im, bx, mk):
        return random_perspective(k, im, bx, mk, degrees=hp["degrees"], translate=hp["translate"],
                                  scale=hp["scale"], shear=hp["shear"], perspective=hp["perspective"], border=-off,
                                  axis_aligned=axis_aligned)

    images, boxes, mask = jax.vmap(persp)(k_persp, canvas, boxes, mask)

    if mixup_rows:
        partner = [jnp.roll(x, 1, axis=0) for x in (images, boxes, classes, mask)]
        mix_prob = jnp.where(use_mosaic, hp["mixup"], 0.0)
        images, boxes, classes, mask = jax.vmap(lambda *a: mixup(*a, alpha=mixup_alpha))(
            k_mix, mix_prob, images, boxes, classes, mask, *partner)

    images, boxes = jax.vmap(lambda k, im, bx: flip(k, im, bx, hp["flipud"], hp["fliplr"]))(k_flip, images, boxes)
    images = jax.vmap(lambda k, im: hsv_augment(k, im, hp["hsv_h"], hp["hsv_s"], hp["hsv_v"]))(k_hsv, images)

    boxes = jnp.where(mask[..., None], boxes, 0.0)
    classes = jnp.where(mask, classes, 0)
    return images, boxes, classes, mask


def augment_host_batch(key, hyp: Mapping[str, jax.Array], batch: Mapping, out_size: int, *,
                       mixup_rows: bool = True, axis_aligned: bool = False):
    """`augment_batch` on a host batch dict as `jaxyolo.data.loader.train_batches` builds it
    (``image``, ``boxes``, ``classes``, ``mask`` and, with mosaic, ``mosaic*``): the signature the
    training steps call (`StepCore`'s default ``augment_fn``)."""
    return augment_batch(key, hyp, batch.get("mosaic"), batch.get("mosaic_boxes"), batch.get("mosaic_classes"),
                         batch.get("mosaic_mask"), batch["image"], batch["boxes"], batch["classes"], batch["mask"],
                         out_size=out_size, mixup_rows=mixup_rows, axis_aligned=axis_aligned)

"""On-device augmentation against hand-computed transforms and NumPy / colorsys re-derivations."""

from __future__ import annotations

import colorsys
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxyolo.augment import (
    BORDER_VALUE,
    HYP_KEYS,
    apply_hsv_gains,
    augment_batch,
    box_candidates,
    flip,
    hsv_augment,
    mixup,
    perspective_matrix,
    random_perspective,
    warp_boxes,
    warp_image,
    warp_image_axis_aligned,
)

S = 32  # output size; the mosaic canvas is 2S
B = 3
OFF = S // 2

# jitted once per shape: op-by-op dispatch would compile every small op on its own
_augment = jax.jit(functools.partial(augment_batch, out_size=S))
_matrix = jax.jit(perspective_matrix, static_argnums=(0, 1))
_warp = jax.jit(warp_image, static_argnums=2)
_warp_axis = jax.jit(warp_image_axis_aligned, static_argnums=2)
_warp_boxes = jax.jit(warp_boxes, static_argnums=3)
_flip = jax.jit(flip)


def hyp(**kw):
    return {k: jnp.float32(kw.get(k, 0.0)) for k in HYP_KEYS}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 256, (B, 2 * S, 2 * S, 3), dtype=np.uint8)
    single = rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8)
    # 3 valid boxes + 1 padded row; mosaic boxes inside the centre crop [OFF, OFF + S)
    sb = np.array([[2, 3, 12, 20], [10, 8, 30, 16], [0, 0, 32, 32], [0, 0, 0, 0]], np.float32)
    single_boxes = np.stack([sb + i for i in range(B)]).clip(0, S)
    mosaic_boxes = np.stack([sb + OFF + i for i in range(B)]).clip(OFF, OFF + S)
    mosaic_boxes[:, 3] = 0
    classes = np.tile(np.array([1, 2, 0, 0], np.int32), (B, 1))
    mask = np.tile(np.array([True, True, True, False]), (B, 1))
    return {"canvas": canvas, "mosaic_boxes": mosaic_boxes, "single": single, "single_boxes": single_boxes,
            "classes": classes, "mask": mask}


def run(batch, h, key=0):
    return _augment(jax.random.key(key), h, batch["canvas"], batch["mosaic_boxes"], batch["classes"], batch["mask"],
                    batch["single"], batch["single_boxes"], batch["classes"], batch["mask"])


# ------------------------------------------------------------------------------------------- identity


def test_identity_single_branch(batch):
    img, boxes, classes, mask = run(batch, hyp(mosaic=0.0))
    assert img.shape == (B, S, S, 3) and img.dtype == jnp.float32
    assert boxes.shape == (B, 8, 4) and classes.shape == (B, 8) and mask.shape == (B, 8)
    np.testing.assert_allclose(np.asarray(img), batch["single"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask[:, :4]), batch["mask"])
    assert not np.asarray(mask[:, 4:]).any()
    np.testing.assert_array_equal(np.asarray(boxes[:, :4]), batch["single_boxes"] * batch["mask"][..., None])
    np.testing.assert_array_equal(np.asarray(classes[:, :4]), batch["classes"] * batch["mask"])
    assert not np.asarray(boxes[:, 4:]).any()


def test_identity_mosaic_branch_is_centre_crop(batch):
    img, boxes, _, mask = run(batch, hyp(mosaic=1.0))
    np.testing.assert_allclose(np.asarray(img), batch["canvas"][:, OFF:OFF + S, OFF:OFF + S] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask[:, :4]), batch["mask"])
    np.testing.assert_array_equal(np.asarray(boxes[:, :4]), (batch["mosaic_boxes"] - OFF) * batch["mask"][..., None])


def test_single_embedded_in_grey_canvas_equals_border_zero_warp(batch):
    kw = {"degrees": 10.0, "translate": 0.1, "scale": 0.5, "shear": 5.0, "perspective": 1e-3}
    single = jnp.asarray(batch["single"][:2])
    embedded = jnp.pad(single, ((0, 0), (OFF, OFF), (OFF, OFF), (0, 0)), constant_values=114)
    bx, mk = jnp.asarray(batch["single_boxes"][:2]), jnp.asarray(batch["mask"][:2])

    @functools.partial(jax.jit, static_argnames="border")
    def warp(keys, img, boxes, mask, border):
        return jax.vmap(lambda *a: random_perspective(*a, border=border, **kw))(keys, img, boxes, mask)

    keys = jax.random.split(jax.random.key(0), 2)
    a_img, a_box, a_mask = warp(keys, single, bx, mk, 0)
    b_img, b_box, b_mask = warp(keys, embedded, bx + OFF, mk, -OFF)
    assert a_img.shape == b_img.shape == (2, S, S, 3)
    np.testing.assert_allclose(np.asarray(a_img), np.asarray(b_img), atol=1e-4)
    np.testing.assert_allclose(np.asarray(a_box), np.asarray(b_box), atol=1e-3)
    np.testing.assert_array_equal(np.asarray(a_mask), np.asarray(b_mask))
    assert np.asarray(a_mask).any() and not np.allclose(np.asarray(a_img), np.asarray(single) / 255, atol=0.05)


# ------------------------------------------------------------------------------------------- geometry


def _np_matrix(in_hw, out_hw, angle, scale, shx, shy, px, py, tx, ty):
    """The reference's M written with NumPy in float64 (cv2.getRotationMatrix2D at centre (0, 0))."""
    c = np.eye(3)
    c[0, 2], c[1, 2] = -in_hw[1] / 2, -in_hw[0] / 2
    p = np.eye(3)
    p[2, 0], p[2, 1] = px, py
    a = math.radians(angle)
    r = np.eye(3)
    r[:2, :2] = [[scale * math.cos(a), scale * math.sin(a)], [-scale * math.sin(a), scale * math.cos(a)]]
    sh = np.eye(3)
    sh[0, 1], sh[1, 0] = math.tan(math.radians(shx)), math.tan(math.radians(shy))
    t = np.eye(3)
    t[0, 2], t[1, 2] = tx * out_hw[1], ty * out_hw[0]
    return t @ sh @ r @ p @ c


def _np_warp(img, m, out_hw, border):
    """Per-pixel loop: bilinear, source = M^-1 (x, y, 1) at integer output coordinates, constant border."""
    mi = np.linalg.inv(m)
    h, w = img.shape[:2]
    out = np.empty((*out_hw, img.shape[2]))
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            u, v, z = mi @ (x, y, 1.0)
            u, v = u / z, v / z
            x0, y0 = math.floor(u), math.floor(v)
            acc = 0.0
            for yy, wy in ((y0, 1 - (v - y0)), (y0 + 1, v - y0)):
                for xx, wx in ((x0, 1 - (u - x0)), (x0 + 1, u - x0)):
                    val = img[yy, xx] if 0 <= yy < h and 0 <= xx < w else border
                    acc = acc + wy * wx * val
            out[y, x] = acc
    return out


def test_matrix_matches_numpy_and_inverse():
    args = {"angle": 30.0, "scale": 0.8, "shear_x": 5.0, "shear_y": -3.0, "persp_x": 1e-3, "persp_y": -5e-4,
            "trans_x": 0.6, "trans_y": 0.45}
    m, m_inv = _matrix((64, 48), (32, 40), **args)
    ref = _np_matrix((64, 48), (32, 40), *args.values())
    np.testing.assert_allclose(np.asarray(m), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(m_inv), np.linalg.inv(ref), rtol=1e-4, atol=1e-4)


def test_translation_exact():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 1, (S, S, 3)).astype(np.float32)
    m, m_inv = _matrix((S, S), (S, S), trans_x=0.5 + 3 / S, trans_y=0.5 - 2 / S)  # dx = +3, dy = -2
    out = np.asarray(_warp(jnp.asarray(img), m_inv, (S, S)))
    np.testing.assert_allclose(out[:S - 2, 3:], img[2:, :S - 3], atol=1e-6)
    np.testing.assert_allclose(out[:, :3], BORDER_VALUE, atol=1e-6)
    np.testing.assert_allclose(out[S - 2:], BORDER_VALUE, atol=1e-6)
    boxes, keep = _warp_boxes(jnp.array([[4.0, 6, 20, 30]]), jnp.array([True]), m, (S, S), 1.0)
    np.testing.assert_allclose(np.asarray(boxes), [[7, 4, 23, 28]], atol=1e-5)
    assert bool(keep[0])


def test_rotation_90_with_scale_moves_box_by_hand():
    # 64×64, C = -32, R(90°, s = 0.5): x' = 0.5·yc, y' = -0.5·xc, then T = +32.
    # box x ∈ [8, 24], y ∈ [16, 48] → xc ∈ [-24, -8], yc ∈ [-16, 16] → x' ∈ [24, 40], y' ∈ [36, 44]
    m, _ = _matrix((64, 64), (64, 64), angle=90.0, scale=0.5)
    boxes, keep = _warp_boxes(jnp.array([[8.0, 16, 24, 48]]), jnp.array([True]), m, (64, 64), 0.5)
    np.testing.assert_allclose(np.asarray(boxes), [[24, 36, 40, 44]], atol=1e-4)
    assert bool(keep[0])  # area 128 = 512 · 0.5²


def test_rotation_90_image_is_rot90():
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, (S, S, 3)).astype(np.float32)
    _, m_inv = _matrix((S, S), (S, S), angle=90.0)
    out = np.asarray(_warp(jnp.asarray(img), m_inv, (S, S)))
    # out[y, x] = img[row = x, col = S - y]; row y = 0 reads column S, outside → grey
    np.testing.assert_allclose(out[1:], img.transpose(1, 0, 2)[::-1][:S - 1], atol=1e-4)
    np.testing.assert_allclose(out[0], BORDER_VALUE, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_general_warp_matches_numpy_bilinear(dtype):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (24, 20, 3)).astype(np.uint8)
    src = img if dtype == np.uint8 else (img / 255.0).astype(np.float32)
    args = (27.0, 0.7, 6.0, -4.0, 2e-3, -1e-3, 0.55, 0.42)
    _, m_inv = _matrix((24, 20), (18, 26), angle=args[0], scale=args[1], shear_x=args[2],
                                  shear_y=args[3], persp_x=args[4], persp_y=args[5], trans_x=args[6],
                                  trans_y=args[7])
    out = np.asarray(_warp(jnp.asarray(src), m_inv, (18, 26)))
    ref = _np_warp(img / 255.0, _np_matrix((24, 20), (18, 26), *args), (18, 26), BORDER_VALUE)
    np.testing.assert_allclose(out, ref, atol=2e-4)
    assert 0.1 < (np.abs(ref - BORDER_VALUE).max(-1) < 1e-9).mean() < 0.9  # the test sees both image and border


@pytest.mark.parametrize("dx,dy", [(0.5, -0.25), (-0.5, 0.25), (1.75, -2.5)])
def test_subpixel_shift_at_the_edges_matches_numpy(dx, dy):
    # the outermost output pixels read half inside, half outside the source (x0 = -1 or x0 = W - 1)
    img = np.random.default_rng(6).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    m, m_inv = _matrix((7, 9), (7, 9), trans_x=0.5 + dx / 9, trans_y=0.5 + dy / 7)
    out = np.asarray(_warp(jnp.asarray(img), m_inv, (7, 9)))
    ref = _np_warp(img / 255.0, np.asarray(m, np.float64), (7, 9), BORDER_VALUE)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("scale,tx,ty", [(0.7, 0.55, 0.42), (1.6, 0.31, 0.66), (1.0, 0.5 + 0.5 / 20, 0.5 - 1.75 / 24)])
def test_axis_aligned_warp_matches_numpy_bilinear(dtype, scale, tx, ty):
    # scale + translation only: the separable warp against the per-pixel NumPy loop, on a
    # non-square image whose output shows both image and border (shrunk), or crops it (enlarged)
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (24, 20, 3)).astype(np.uint8)
    src = img if dtype == np.uint8 else (img / 255.0).astype(np.float32)
    _, m_inv = _matrix((24, 20), (18, 26), scale=scale, trans_x=tx, trans_y=ty)
    out = np.asarray(_warp_axis(jnp.asarray(src), m_inv, (18, 26)))
    ref = _np_warp(img / 255.0, _np_matrix((24, 20), (18, 26), 0, scale, 0, 0, 0, 0, tx, ty), (18, 26), BORDER_VALUE)
    np.testing.assert_allclose(out, ref, atol=2e-4)
    np.testing.assert_allclose(out, np.asarray(_warp(jnp.asarray(src), m_inv, (18, 26))), atol=1e-6)


def test_axis_aligned_batch_equals_the_general_path_without_rotation(batch):
    """axis_aligned=True gives the general warp's images and boxes when degrees, shear and
    perspective are 0, and ignores them (no rotation drawn) when they are not."""
    fast = jax.jit(functools.partial(augment_batch, out_size=S, axis_aligned=True))
    args = (batch["canvas"], batch["mosaic_boxes"], batch["classes"], batch["mask"], batch["single"],
            batch["single_boxes"], batch["classes"], batch["mask"])
    h = hyp(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, translate=0.2, scale=0.5, fliplr=0.5, mosaic=0.5)
    for key in range(3):
        want = _augment(jax.random.key(key), h, *args)
        got = fast(jax.random.key(key), h, *args)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-5)
        for g, w in zip(got[1:], want[1:]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)
    rotated = {**h, "degrees": jnp.float32(45.0), "shear": jnp.float32(10.0)}
    np.testing.assert_allclose(np.asarray(fast(jax.random.key(0), rotated, *args)[0]),
                               np.asarray(_augment(jax.random.key(0), h, *args)[0]), atol=1e-5)


# ------------------------------------------------------------------------------------------- filtering


def test_box_candidates_thresholds():
    old = jnp.array([[0.0, 0, 10, 10]] * 5)
    new = jnp.array([[0.0, 0, 10, 10],  # same: kept
                     [0.0, 0, 1.9, 10],  # w < 2 px
                     [0.0, 0, 3, 3],  # area 9 / 100 < 0.1
                     [0.0, 0, 4, 3],  # area 12 / 100 > 0.1, w, h > 2: kept
                     [0.0, 0, 2.5, 60]])  # aspect 24 >= 20
    np.testing.assert_array_equal(np.asarray(jax.jit(box_candidates)(old, new)), [True, False, False, True, False])


def test_shrunk_and_clipped_boxes_dropped():
    boxes = jnp.array([[20.0, 20, 30, 30], [0.0, 0, 64, 64]])
    mask = jnp.array([True, True])
    m, _ = _matrix((64, 64), (64, 64), scale=0.1)  # 10 px → 1 px (dropped), 64 → 6.4 (kept)
    _, keep = _warp_boxes(boxes, mask, m, (64, 64), 0.1)
    np.testing.assert_array_equal(np.asarray(keep), [False, True])
    # translation left by 37 px clips (0, 0, 40, 40) to width 3: area 120 / 1600 < 0.1; by 30 px: 400 / 1600
    box = jnp.array([[0.0, 0, 40, 40]])
    for shift, kept in ((37, False), (30, True)):
        m, _ = _matrix((64, 64), (64, 64), trans_x=0.5 - shift / 64)
        out, keep = _warp_boxes(box, jnp.array([True]), m, (64, 64), 1.0)
        assert bool(keep[0]) is kept
        if kept:
            np.testing.assert_allclose(np.asarray(out), [[0, 0, 40 - shift, 40]], atol=1e-5)
    _, keep = _warp_boxes(box, jnp.array([False]), m, (64, 64), 1.0)  # padding rows stay masked
    assert not bool(keep[0])


# ------------------------------------------------------------------------------------------- flips


@pytest.mark.parametrize("ud,lr", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_flips_exact(ud, lr):
    rng = np.random.default_rng(4)
    img = rng.uniform(0, 1, (S, 20, 3)).astype(np.float32)  # H ≠ W to catch swapped axes
    boxes = np.array([[1.0, 2, 5, 9], [3, 4, 20, 32]], np.float32)
    out, ob = _flip(jax.random.key(0), jnp.asarray(img), jnp.asarray(boxes), ud, lr)
    exp, eb = img, boxes.copy()
    if ud:
        exp = exp[::-1]
        eb[:, [1, 3]] = S - boxes[:, [3, 1]]
    if lr:
        exp = exp[:, ::-1]
        eb[:, [0, 2]] = 20 - boxes[:, [2, 0]]
    np.testing.assert_array_equal(np.asarray(out), exp)
    np.testing.assert_array_equal(np.asarray(ob), eb)


# ------------------------------------------------------------------------------------------- HSV


def _hsv_image():
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 1, (16, 16, 3)).astype(np.float32)
    img[0, :8] = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [0.5, 0.5, 0.5], [0, 0, 0]]
    return img


def test_hsv_zero_gains_identity():
    img = _hsv_image()
    out = jax.jit(hsv_augment)(jax.random.key(0), jnp.asarray(img), 0.0, 0.0, 0.0)
    np.testing.assert_allclose(np.asarray(out), img, atol=2e-6)


@pytest.mark.parametrize("gains", [(1.3, 0.7, 1.2), (0.985, 1.5, 0.6), (1.0, 1.0, 1.0)])
def test_hsv_known_gains_match_colorsys(gains):
    img = _hsv_image()
    out = np.asarray(jax.jit(apply_hsv_gains)(jnp.asarray(img), jnp.asarray(gains)))
    ref = np.empty_like(img, dtype=np.float64)
    for idx in np.ndindex(img.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*img[idx].astype(np.float64))
        ref[idx] = colorsys.hsv_to_rgb((h * gains[0]) % 1.0, min(s * gains[1], 1.0), min(v * gains[2], 1.0))
    np.testing.assert_allclose(out, ref, atol=2e-5)


# ------------------------------------------------------------------------------------------- mixup


def test_mixup_ratio_and_masks():
    ones, zeros = jnp.ones((4, 4, 3)), jnp.zeros((4, 4, 3))
    b1, b2 = jnp.ones((2, 4)), 2 * jnp.ones((2, 4))
    c1, c2 = jnp.array([1, 2]), jnp.array([3, 4])
    m1, m2 = jnp.array([True, False]), jnp.array([True, True])
    keys = jax.random.split(jax.random.key(0), 256)
    mix = jax.jit(jax.vmap(lambda k, p: mixup(k, p, ones, b1, c1, m1, zeros, b2, c2, m2), in_axes=(0, None)))
    img, boxes, classes, mask = mix(keys, 1.0)
    r = np.asarray(img[:, 0, 0, 0])
    np.testing.assert_allclose(np.asarray(img), np.broadcast_to(r[:, None, None, None], img.shape), atol=1e-6)
    assert 0.25 < r.min() and r.max() < 0.75 and abs(r.mean() - 0.5) < 0.02 and 0.04 < r.std() < 0.09  # Beta(32, 32)
    np.testing.assert_array_equal(np.asarray(mask[0]), [True, False, True, True])
    np.testing.assert_array_equal(np.asarray(classes[0]), [1, 2, 3, 4])
    np.testing.assert_array_equal(np.asarray(boxes[0]), np.concatenate([b1, b2]))
    img, _, _, mask = mix(keys, 0.0)
    np.testing.assert_array_equal(np.asarray(img), 1.0)
    np.testing.assert_array_equal(np.asarray(mask), np.tile([True, False, False, False], (256, 1)))


def test_batch_mixup_partner_is_rolled_batch(batch):
    _, boxes, _, mask = run(batch, hyp(mosaic=1.0, mixup=1.0, scale=0.3, translate=0.1))
    mask, boxes = np.asarray(mask), np.asarray(boxes)
    np.testing.assert_array_equal(mask[:, 4:], np.roll(mask[:, :4], 1, axis=0))
    np.testing.assert_array_equal(boxes[:, 4:], np.roll(boxes[:, :4], 1, axis=0))  # no flips: same boxes
    assert mask[:, 4:].any()
    _, _, _, mask = run(batch, hyp(mosaic=0.0, mixup=1.0))  # reference: mixup only in the mosaic branch
    assert not np.asarray(mask[:, 4:]).any()


# ------------------------------------------------------------------------------------------- batch


def test_full_hyps_ranges_and_determinism(batch):
    h = hyp(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=10, translate=0.1, scale=0.5, shear=2, perspective=1e-4,
            flipud=0.5, fliplr=0.5, mosaic=0.5, mixup=0.5)
    a = run(batch, h, key=1)
    b = run(batch, h, key=1)
    c = run(batch, h, key=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    img, boxes, _, mask = (np.asarray(x) for x in a)
    assert img.min() >= 0 and img.max() <= 1
    assert (boxes >= 0).all() and (boxes <= S).all() and (boxes[~mask] == 0).all()


def test_population_vmap_per_member(batch):
    base = {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 5, "translate": 0.1, "scale": 0.5, "mosaic": 0.5,
            "mixup": 0.5}
    h0, h1 = hyp(**base, fliplr=0.0), hyp(**base, fliplr=1.0, flipud=1.0, shear=3.0)
    pop = jax.tree.map(lambda a, b: jnp.stack([a, b]), h0, h1)
    args = (batch["canvas"], batch["mosaic_boxes"], batch["classes"], batch["mask"], batch["single"],
            batch["single_boxes"], batch["classes"], batch["mask"])
    key = jax.random.key(7)
    out = jax.jit(jax.vmap(functools.partial(augment_batch, out_size=S), in_axes=(None, 0) + (None,) * 8))(
        key, pop, *args)
    for i, hi in enumerate((h0, h1)):
        ref = _augment(key, hi, *args)
        for x, y in zip(out, ref):
            np.testing.assert_allclose(np.asarray(x[i]), np.asarray(y), atol=1e-5)
    assert not np.allclose(np.asarray(out[0][0]), np.asarray(out[0][1]))


def test_without_canvases_and_with_more_mosaic_rows(batch):
    # pipeline batches built with mosaic=False carry no canvases; mosaic_max_boxes may exceed max_boxes
    h = hyp(mosaic=1.0, mixup=1.0, scale=0.5, degrees=5, fliplr=0.5, hsv_v=0.4)
    key = jax.random.key(3)
    single_only = jax.jit(lambda k, hh, *a: augment_batch(k, hh, None, None, None, None, *a, out_size=S))
    img, boxes, classes, mask = single_only(key, h, batch["single"], batch["single_boxes"], batch["classes"],
                                            batch["mask"])
    ref = run(batch, {**h, "mosaic": jnp.float32(0.0)}, key=3)  # the same draws, every sample single
    for x, y in zip((img, boxes, classes, mask), ref):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert not np.asarray(mask[:, 4:]).any()  # no mixup outside the mosaic branch

    mb = np.concatenate([batch["mosaic_boxes"], np.zeros((B, 2, 4), np.float32)], 1)  # Mm = 6 > M = 4
    mc = np.concatenate([batch["classes"], np.zeros((B, 2), np.int32)], 1)
    mm = np.concatenate([batch["mask"], np.zeros((B, 2), bool)], 1)
    out = _augment(key, hyp(mosaic=1.0), batch["canvas"], mb, mc, mm, batch["single"], batch["single_boxes"],
                   batch["classes"], batch["mask"])
    assert out[1].shape == (B, 12, 4) and out[3].shape == (B, 12)
    np.testing.assert_array_equal(np.asarray(out[1][:, :4]), (batch["mosaic_boxes"] - OFF) * batch["mask"][..., None])
    assert not np.asarray(out[3][:, 4:]).any()


def test_shape_errors(batch):
    with pytest.raises(ValueError):
        augment_batch(jax.random.key(0), hyp(), batch["canvas"], batch["mosaic_boxes"], batch["classes"],
                      batch["mask"], batch["single"], batch["single_boxes"], batch["classes"], batch["mask"],
                      out_size=2 * S)
    with pytest.raises(KeyError):
        augment_batch(jax.random.key(0), {"mosaic": 1.0}, batch["canvas"], batch["mosaic_boxes"], batch["classes"],
                      batch["mask"], batch["single"], batch["single_boxes"], batch["classes"], batch["mask"],
                      out_size=S)


def test_without_mixup_rows_the_output_is_the_first_half(batch):
    """mixup_rows=False (no member mixes) returns N rows, equal to the first N of the full output
    whenever mixup's probability is 0: same images, boxes, classes and mask."""
    h = hyp(mosaic=0.5, degrees=10.0, translate=0.1, scale=0.3, hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, fliplr=0.5)
    args = (jax.random.key(3), h, batch["canvas"], batch["mosaic_boxes"], batch["classes"], batch["mask"],
            batch["single"], batch["single_boxes"], batch["classes"], batch["mask"])
    full = _augment(*args)
    half = jax.jit(functools.partial(augment_batch, out_size=S, mixup_rows=False))(*args)
    assert half[1].shape == (B, 4, 4) and full[1].shape == (B, 8, 4)
    np.testing.assert_array_equal(np.asarray(half[0]), np.asarray(full[0]))
    for got, want in zip(half[1:], full[1:]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[:, :4])

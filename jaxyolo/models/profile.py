"""Parameter counts, FLOPs and a per-layer table, read off the model itself.

FLOPs follow the spec's convention: 2 x the multiply-accumulates of every convolution (BN,
activations, pooling and the decode are not counted). They are counted on the traced program
(`jax.make_jaxpr` on abstract inputs: nothing is computed or compiled), so they describe exactly
what runs, whatever the table. The program is traced with the plain convolutions
(`conv.grad_mode("xla")`): on the CPU a depthwise convolution otherwise runs as shifted views
(`conv.shifted_depthwise`), which would drop it from the count on one backend only.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import jax
import jax.numpy as jnp
from flax import nnx

from jaxyolo.models.conv import grad_mode


def count_params(module) -> int:
    return int(sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(module, nnx.Param))))


def _conv_macs(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    # rhs_spec = (out-feature dim, in-feature dim, spatial dims...)
    k_in = rhs[dn.rhs_spec[1]]
    k_spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    return math.prod(out) * k_in * k_spatial


def layer_flops(model, img_size: int | tuple[int, int], batch: int = 1) -> tuple[dict[int, int], list]:
    """FLOPs per layer index at `img_size` (2 x conv MACs) and the abstract raw outputs."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    graphdef, state = nnx.split(model)

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
    with grad_mode("xla"):
        closed = jax.make_jaxpr(fwd)(state, x)
    per_layer: dict[int, int] = defaultdict(int)
    for eqn, scope in _all_eqns(closed.jaxpr):
        if eqn.primitive.name == "conv_general_dilated":
            m = re.search(r"layer(\d+)", scope)
            per_layer[int(m.group(1)) if m else -1] += 2 * _conv_macs(eqn)
    outs = jax.eval_shape(fwd, state, x)
    return dict(per_layer), outs


def _all_eqns(jaxpr, scope: str = ""):
    """Every equation, nested ones included, with its name scope (an inner jaxpr, e.g. of a
    custom-gradient convolution, only knows the scope inside it, so the caller's is prepended)."""
    for eqn in jaxpr.eqns:
        here = f"{scope}/{eqn.source_info.name_stack}"
        yield eqn, here
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None:
                yield from _all_eqns(getattr(inner, "jaxpr", inner), here)


def layer_table(model, img_size: int = 640) -> list[dict]:
    """One row per layer: index, from, n, params, module, args, output shape, GFLOPs."""
    flops, _ = layer_flops(model, img_size)
    size = img_size
    rows = []
    for ls, layer in zip(model.spec.layers, model.model):
        if ls.module in ("Detect", "IDetect"):
            shape = [[model.spec.num_anchors, size // s, size // s, model.spec.num_outputs] for s in model.spec.strides]
            module = "IDetect" if layer.kst else "Detect"
            args = f"nc={model.spec.nc}, na={model.spec.num_anchors}" + (f", kst={layer.kst}" if layer.kst else "")
        else:
            shape = [size // ls.stride, size // ls.stride, ls.c_out]
            module = ls.module
            args = _describe(ls)
        rows.append(
            dict(index=ls.index, source=list(ls.yaml_from) if isinstance(ls.yaml_from, tuple) else ls.yaml_from, n=ls.n, params=count_params(layer), module=module,
                 args=args, output=shape, gflops=flops.get(ls.index, 0) / 1e9)
        )
    return rows


def _describe(ls) -> str:
    if ls.module == "Conv":
        return f"{ls.c_in}->{ls.c_out}, k={ls.kernel}, s={ls.conv_stride}"
    if ls.module in ("Upsample", "Concat"):
        return "x2 nearest" if ls.module == "Upsample" else "channels"
    return f"{ls.c_in}->{ls.c_out}"


def gflops(model, img_size: int | tuple[int, int] = 640) -> float:
    flops, _ = layer_flops(model, img_size)
    return sum(flops.values()) / 1e9


def _traced(module, call, *args) -> tuple[int, object]:
    """(FLOPs, abstract outputs) of ``call(module, *args)`` on abstract `args`, counted as
    `layer_flops` counts them."""
    graphdef, state = nnx.split(module)
    with grad_mode("xla"):
        closed, shapes = jax.make_jaxpr(lambda s, *a: call(nnx.merge(graphdef, s), *a), return_shape=True)(state, *args)
    flops = sum(2 * _conv_macs(e) for e, _ in _all_eqns(closed.jaxpr) if e.primitive.name == "conv_general_dilated")
    return flops, shapes


def gfl_layer_table(model, img_size: int | tuple[int, int] = 640) -> list[dict]:
    """The gfl family's table, with YOLOv4's row fields plus `name` (the NNX paths of the row's
    weights, the prefixes of their state_dict keys; * for every tower or level): one row per
    backbone block (stem, each MBConv), per PAN lateral, the PAN's fusion, per head tower
    convolution, the predictions and GFLv2's quality branch. A head row spans the levels: its
    output is one shape per level, its FLOPs the sum over them, its parameters the shared
    convolutions once plus every level's BatchNorms.

    Rows are traced block by block; the PAN fusion and quality rows take what the whole neck and
    head count beyond their convolution rows, so the rows always add up to `gflops`."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    spec, bb, neck, head = model.spec, model.backbone, model.neck, model.head
    rows: list[dict] = []

    def row(name, module, args, source, params, flops, output):
        rows.append(dict(index=len(rows), source=source, n=1, params=int(params), module=module, args=args,
                         output=output, gflops=flops / 1e9, name=name))
        return len(rows) - 1

    def shape(v):
        return list(v.shape[1:])

    call = lambda m, v: m(v)  # noqa: E731
    f, x = _traced(bb.stem, call, jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
    last = row("backbone.stem", "Conv", f"3->{spec.backbone.stem}, k=3, s=2", -1, count_params(bb.stem), f, shape(x))
    feats, c = [], spec.backbone.stem
    for i, (st, stage) in enumerate(zip(spec.backbone.stages, bb.stages)):
        for j, block in enumerate(stage):
            f, x = _traced(block, call, x)
            s = st.stride if j == 0 else 1
            last = row(f"backbone.stages.{i}.{j}", "FusedMBConv" if st.fused else "MBConv",
                       f"{c}->{st.c_out}, e={st.expand}, k={st.kernel}, s={s}", last, count_params(block), f, shape(x))
            c = st.c_out
        if i in spec.backbone.out_stages:
            feats.append((last, x))

    lateral = []
    for i, (conv, (src, fx)) in enumerate(zip(neck.lateral, feats)):
        f, y = _traced(conv, call, fx)
        lateral.append(row(f"neck.lateral.{i}", "Conv2d", f"{fx.shape[-1]}->{spec.neck_width}, k=1", src,
                           count_params(conv), f, shape(y)))
    f, levels = _traced(neck, call, [fx for _, fx in feats])
    f -= sum(_traced(conv, call, fx)[0] for conv, (_, fx) in zip(neck.lateral, feats))
    last = row("neck", "PAN", "top-down x2 bilinear, bottom-up 2x2 mean, add", lateral, 0, f,
               [shape(v) for v in levels])

    def tower(lvl):
        return 0 if spec.share_levels else lvl

    xs, counted = list(levels), 0
    for j in range(spec.stacked_convs):
        f, outs = 0, []
        for lvl, v in enumerate(xs):
            fl, y = _traced(head.convs[tower(lvl)][j], call, v)
            f, counted = f + fl, counted + fl
            outs.append(y)
        params = sum(count_params(t[j]) for t in head.convs) + sum(count_params(n[j]) for n in head.norms)
        share = "shared by the levels" if spec.share_levels else "one per level"
        last = row(f"head.convs.*.{j}, head.norms.*.{j}", "Conv",
                   f"{xs[0].shape[-1]}->{spec.head_width}, k=3, {share}, BN per level", last, params, f,
                   [shape(v) for v in outs])
        xs = outs
    f, outs = 0, []
    for lvl, v in enumerate(xs):
        fl, y = _traced(head.preds[tower(lvl)], call, v)
        f, counted = f + fl, counted + fl
        outs.append(y)
    last = row("head.preds, head.scales", "GFLPred",
               f"{xs[0].shape[-1]}->{spec.nc}+4x{spec.bins}, k=3, scale per level", last,
               count_params(head.preds) + math.prod(head.scales.shape), f, [shape(v) for v in outs])
    f, raw = _traced(head, call, list(levels))
    if head.dgqp:
        row("head.quality", "DGQP", f"top-{spec.dgqp_topk} of {spec.bins} bins + mean, 4 sides -> "
            f"{spec.dgqp_width} -> 1", last, count_params(head.quality), f - counted, [shape(v) for v in raw])
    elif f != counted:  # a head convolution no row accounts for: the rows would no longer add up
        raise AssertionError(f"gfl_layer_table: {f - counted} head FLOPs outside the tower and prediction rows")
    return rows

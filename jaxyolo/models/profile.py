"""Parameter counts, FLOPs and a per-layer table, read off the model itself.

FLOPs follow the spec's convention: 2 x the multiply-accumulates of every convolution (BN,
activations, pooling and the decode are not counted). They are counted on the traced program
(`jax.make_jaxpr` on abstract inputs: nothing is computed or compiled), so they describe exactly
what runs, whatever the table.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import jax
import jax.numpy as jnp
from flax import nnx


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

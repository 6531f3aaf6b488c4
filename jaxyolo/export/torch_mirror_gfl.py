"""A plain PyTorch mirror of jaxyolo's gfl detectors (exported as ``jaxyolo_torch.py``).

This single file imports only ``torch``, ``math`` and the standard library. ``export_torch`` ships it
next to the weights under the same name as the YOLOv4 mirror, so a receiver loads either family the
same way, without JAX or jaxyolo::

    import sys; sys.path.insert(0, "exported_folder")
    import jaxyolo_torch
    model = jaxyolo_torch.load("exported_folder")          # eval mode, float32, on the CPU
    out = model(images)   # images (B, 3, H, W) float32 in [0, 1] -> (B, N, 4 + nc)

The detector: an EfficientNet-Lite backbone (MBConv or fused MBConv blocks, no squeeze-excite), a
PAN neck (1x1 laterals, top-down ×2 bilinear upsampling with half-pixel centres, bottom-up 2×2
mean downsampling, additions only) and the GFL head (a tower of 3x3 Conv-BN-act per level, its
convolutions shared across levels when ``share_levels``, BatchNorm per level; one 3x3 convolution
to nc class logits and 4 × (reg_max + 1) box logits; a learnt scale per level on the box logits;
with ``dgqp`` GFLv2's quality branch).

Names. Every module has the attribute name of jaxyolo's NNX module, so ``state_dict()`` keys are
jaxyolo's dotted NNX paths (``backbone.stages.3.1.dw.conv.weight``, ``head.norms.2.0.running_var``,
``head.scales``, ...), exactly the keys of ``Detector.state_dict()`` for this family. Convolution
weights are torch's (out, in / groups, kh, kw); jaxyolo holds them (kh, kw, in / groups, out), and
`from_jaxyolo` converts a jaxyolo state_dict. BatchNorms have no ``num_batches_tracked`` buffer
(jaxyolo keeps none, and a fixed momentum makes it unused), eps 1e-3, momentum 0.03 (torch's
convention), as jaxyolo's.

Config (``config.json``, written by ``jaxyolo.export.torch_export.torch_config``):

- ``format``: ``"jaxyolo-torch-gfl/1"``; ``name``; ``nc``; ``act``: relu6, silu, mish, relu or leaky;
  ``dgqp``: true for GFLv2's quality branch; ``reg_max``; ``strides`` (one per level);
- ``backbone``: ``stem`` (channels), ``stages`` (rows [expand, kernel, stride, channels, repeats,
  fused 0|1] as resolved, i.e. after the width and depth multipliers), ``out_stages``;
- ``neck``: ``width``; ``head``: ``width``, ``stacked_convs``, ``share_levels``, ``dgqp_topk``,
  ``dgqp_width``;
- optional ``names`` (class names), ``img_size``.

Outputs. ``forward_raw``: per level (B, H/s, W/s, nc + 4·(reg_max + 1) [+ 1 quality logit]),
channels last like jaxyolo's raw outputs (box logits already times the level's scale). Eval mode
``forward``: the decode in the ``xyxy-scores`` layout, (B, N, 4 + nc): each point is the centre of
a cell, ((j + ½)s, (i + ½)s); each side's distance is the expectation of its softmax over the bins,
in strides; boxes x1, y1, x2, y2 in pixels of the input, then the class scores σ(class) (times
σ(quality) with dgqp); rows ordered level -> y -> x. Train mode returns the raw outputs and
BatchNorms use (and update) batch statistics.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

FORMAT = "jaxyolo-torch-gfl/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"

BN_EPS = 1e-3
BN_MOMENTUM = 0.03  # torch convention: running <- (1 - m) * running + m * batch
ACTS = ("relu6", "silu", "mish", "relu", "leaky")
PRIOR_PROB = 0.01  # initial class probability, as jaxyolo's head starts

__all__ = ["ConfigError", "Model", "build_model", "from_jaxyolo", "load", "FORMAT", "CONFIG_FILE", "WEIGHTS_FILE"]


class ConfigError(ValueError):
    """The config (or the weights) of an exported model is missing, malformed or does not fit."""


def _act(name: str) -> nn.Module:
    if name == "relu6":
        return nn.ReLU6()
    if name == "silu":
        return nn.SiLU()
    if name == "mish":
        return nn.Mish()
    if name == "relu":
        return nn.ReLU()
    if name == "leaky":
        return nn.LeakyReLU(0.1)
    if name == "linear":
        return nn.Identity()
    raise ConfigError(f"act: unknown activation {name!r} (expected one of {', '.join(ACTS)})")


class BatchNorm2d(nn.Module):
    """torch's batch normalisation without a ``num_batches_tracked`` buffer: jaxyolo's state_dict
    has none, and torch's own BatchNorm2d would inject that key on loading and refuse it under
    ``strict=True``. Training normalises with the biased batch variance and updates the running
    variance with the unbiased one (`F.batch_norm`), as jaxyolo does."""

    def __init__(self, c: int, eps: float = BN_EPS, momentum: float = BN_MOMENTUM):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


def _conv2d(c1, c2, k=1, s=1, *, bias=False, groups=1) -> nn.Conv2d:
    return nn.Conv2d(c1, c2, k, s, k // 2, groups=groups, bias=bias)


class Conv(nn.Module):
    """conv (no bias, zero padding k//2, `groups`) -> BatchNorm -> activation."""

    def __init__(self, c1, c2, k=1, s=1, *, act="relu6", groups=1):
        super().__init__()
        self.conv = _conv2d(c1, c2, k, s, groups=groups)
        self.bn = BatchNorm2d(c2)
        self.act = _act(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: [1x1 expand] -> kxk depthwise -> 1x1 project
    (no activation). Fused: kxk convolution (expansion and stride) -> 1x1 project; with expand 1
    the kxk convolution alone, to c2 with its activation. A residual when the shape is kept."""

    def __init__(self, c1, c2, expand, k, s, *, act, fused=False):
        super().__init__()
        hidden = c1 * expand
        if fused:
            self.expand = None
            self.dw = Conv(c1, hidden if expand != 1 else c2, k, s, act=act)
            self.project = Conv(hidden, c2, 1, 1, act="linear") if expand != 1 else None
        else:
            self.expand = Conv(c1, hidden, 1, 1, act=act) if expand != 1 else None
            self.dw = Conv(hidden, hidden, k, s, act=act, groups=hidden)
            self.project = Conv(hidden, c2, 1, 1, act="linear")
        self.residual = s == 1 and c1 == c2

    def forward(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.dw(y)
        if self.project is not None:
            y = self.project(y)
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """Stem conv (3x3, stride 2), then the stages; returns the feature maps of `out_stages`."""

    def __init__(self, stem, stages, out_stages, *, act):
        super().__init__()
        self.stem = Conv(3, stem, 3, 2, act=act)
        blocks, c = [], stem
        for expand, k, s, c_out, repeats, fused in stages:
            stage = []
            for j in range(repeats):
                stage.append(MBConv(c, c_out, expand, k, s if j == 0 else 1, act=act, fused=bool(fused)))
                c = c_out
            blocks.append(nn.ModuleList(stage))
        self.stages = nn.ModuleList(blocks)
        self.out_stages = tuple(out_stages)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            if i in self.out_stages:
                outs.append(x)
        return outs


def upsample2(x):
    """×2 bilinear with half-pixel centres and clamped edges (jaxyolo's `models.gfl.upsample2`)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def downsample2(x):
    """×½ bilinear with half-pixel centres: the mean of each 2×2 block (`models.gfl.downsample2`)."""
    return F.avg_pool2d(x, 2)


class PAN(nn.Module):
    def __init__(self, c_ins, width):
        super().__init__()
        self.lateral = nn.ModuleList(_conv2d(c, width, 1, bias=True) for c in c_ins)

    def forward(self, feats):
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + upsample2(lat[i])
        for i in range(len(lat) - 1):  # bottom-up
            lat[i + 1] = lat[i + 1] + downsample2(lat[i])
        return lat


class GFLHead(nn.Module):
    def __init__(self, *, nc, levels, neck_width, width, stacked_convs, share_levels, reg_max, act, dgqp,
                 dgqp_topk, dgqp_width):
        super().__init__()
        self.nc, self.bins, self.share_levels = nc, reg_max + 1, share_levels
        self.topk = dgqp_topk
        towers = 1 if share_levels else levels
        self.convs = nn.ModuleList(nn.ModuleList(_conv2d(neck_width if j == 0 else width, width, 3)
                                                 for j in range(stacked_convs)) for _ in range(towers))
        self.norms = nn.ModuleList(nn.ModuleList(BatchNorm2d(width) for _ in range(stacked_convs))
                                   for _ in range(levels))
        c_in = width if stacked_convs else neck_width
        self.preds = nn.ModuleList(_conv2d(c_in, nc + 4 * self.bins, 3, bias=True) for _ in range(towers))
        self.scales = nn.Parameter(torch.ones(levels))
        self.act = _act(act)
        self.quality = None
        if dgqp:
            d = 4 * (dgqp_topk + 1)
            self.quality = nn.ModuleList([_conv2d(d, dgqp_width, 1, bias=True), _conv2d(dgqp_width, 1, 1, bias=True)])
        self.initialize()

    def initialize(self):
        """jaxyolo's initialisation of what PyTorch's defaults do not give: small prediction and
        quality weights and a low class prior."""
        with torch.no_grad():
            for p in self.preds:
                nn.init.normal_(p.weight, 0.0, 0.01)
                p.bias.zero_()
                p.bias[:self.nc] = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
            if self.quality is not None:
                for q in self.quality:
                    nn.init.normal_(q.weight, 0.0, 0.01)
                    q.bias.zero_()

    def forward(self, feats):
        """Raw outputs per level, channels last: (B, H, W, nc + 4·bins [+ 1])."""
        outs = []
        for lvl, x in enumerate(feats):
            t = 0 if self.share_levels else lvl
            for conv, bn in zip(self.convs[t], self.norms[lvl]):
                x = self.act(bn(conv(x)))
            y = self.preds[t](x).permute(0, 2, 3, 1).float()
            y = torch.cat([y[..., :self.nc], y[..., self.nc:] * self.scales[lvl]], -1)
            if self.quality is not None:
                y = torch.cat([y, self._quality(y[..., self.nc:])], -1)
            outs.append(y)
        return outs

    def _quality(self, box_logits):
        """GFLv2: per side the top-k bin probabilities and their mean, through a two-layer MLP."""
        *lead, _ = box_logits.shape
        prob = box_logits.reshape(*lead, 4, self.bins).softmax(-1)
        top = prob.topk(self.topk, dim=-1).values
        stat = torch.cat([top, top.mean(-1, keepdim=True)], -1).reshape(*lead, -1)
        h = F.relu(self.quality[0](stat.permute(0, 3, 1, 2)))
        return self.quality[1](h).permute(0, 2, 3, 1)


class Model(nn.Module):
    """The detector; its attribute names are jaxyolo's, so the state_dict keys are too."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = validate_config(config)
        self.config = cfg
        self.nc = cfg["nc"]
        self.names = list(cfg.get("names") or [str(i) for i in range(self.nc)])
        bb, head = cfg["backbone"], cfg["head"]
        self.backbone = EfficientNetLite(bb["stem"], bb["stages"], bb["out_stages"], act=cfg["act"])
        c_ins = [bb["stages"][i][3] for i in bb["out_stages"]]
        self.neck = PAN(c_ins, cfg["neck"]["width"])
        self.head = GFLHead(nc=self.nc, levels=len(c_ins), neck_width=cfg["neck"]["width"], width=head["width"],
                            stacked_convs=head["stacked_convs"], share_levels=head["share_levels"],
                            reg_max=cfg["reg_max"], act=cfg["act"], dgqp=cfg["dgqp"], dgqp_topk=head["dgqp_topk"],
                            dgqp_width=head["dgqp_width"])
        self.stride = [int(s) for s in cfg["strides"]]
        self.max_stride = max(self.stride)
        self.reg_max = cfg["reg_max"]

    def _check(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images: expected a (batch, 3, height, width) NCHW tensor, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"images: expected float values in [0, 1], got dtype {x.dtype}")
        if x.shape[2] % self.max_stride or x.shape[3] % self.max_stride:
            raise ValueError(f"images: height and width must be multiples of {self.max_stride}, "
                             f"got {tuple(x.shape[2:])}")

    def forward_raw(self, x):
        """Images (B, 3, H, W) in [0, 1] -> raw outputs per level, (B, H/s, W/s, C), channels last."""
        self._check(x)
        return self.head(self.neck(self.backbone(x)))

    def decode(self, raw):
        """Raw outputs per level -> (B, N, 4 + nc): boxes x1, y1, x2, y2 in pixels, class scores."""
        nc, bins = self.nc, self.reg_max + 1
        flat, pts, st = [], [], []
        for r, s in zip(raw, self.stride):
            b, h, w, c = r.shape
            flat.append(r.float().reshape(b, h * w, c))
            gy, gx = torch.meshgrid(torch.arange(h, device=r.device, dtype=torch.float32),
                                    torch.arange(w, device=r.device, dtype=torch.float32), indexing="ij")
            pts.append((torch.stack([gx, gy], -1).reshape(-1, 2) + 0.5) * s)
            st.append(torch.full((h * w, 1), float(s), device=r.device))
        flat, pts, st = torch.cat(flat, 1), torch.cat(pts), torch.cat(st)
        scores = flat[..., :nc].sigmoid()
        if flat.shape[-1] > nc + 4 * bins:  # the quality logit of GFLv2
            scores = scores * flat[..., -1:].sigmoid()
        prob = flat[..., nc:nc + 4 * bins].reshape(*flat.shape[:2], 4, bins).softmax(-1)
        dist = (prob @ torch.arange(bins, device=flat.device, dtype=prob.dtype)) * st
        boxes = torch.cat([pts - dist[..., :2], pts + dist[..., 2:]], -1)
        return torch.cat([boxes, scores], -1)

    def forward(self, x):
        """Eval mode: decoded (B, N, 4 + nc); train mode: the raw per-level outputs."""
        raw = self.forward_raw(x)
        return raw if self.training else self.decode(raw)


def _require(cond, msg):
    if not cond:
        raise ConfigError(msg)


def _is_int(v, low=1):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def validate_config(config) -> dict:
    """Check a config dict and return a normalised copy; errors name the field at fault."""
    _require(isinstance(config, dict), f"config: expected a JSON object, got {type(config).__name__}")
    fmt = config.get("format")
    _require(fmt == FORMAT, f"config: format {fmt!r} is not supported (expected {FORMAT!r})")
    for key in ("nc", "act", "reg_max", "strides", "backbone", "neck", "head"):
        _require(key in config, f"config: missing field {key!r}")
    cfg = dict(config)
    cfg.setdefault("dgqp", False)
    _require(_is_int(cfg["nc"]), f"config: nc must be an integer >= 1, got {cfg['nc']!r}")
    _require(cfg["act"] in ACTS, f"config: act must be one of {', '.join(ACTS)}, got {cfg['act']!r}")
    _require(isinstance(cfg["dgqp"], bool), f"config: dgqp must be true or false, got {cfg['dgqp']!r}")
    _require(_is_int(cfg["reg_max"]), f"config: reg_max must be an integer >= 1, got {cfg['reg_max']!r}")

    bb = cfg["backbone"]
    _require(isinstance(bb, dict), f"config: backbone must be an object, got {bb!r}")
    for key in ("stem", "stages", "out_stages"):
        _require(key in bb, f"config: backbone: missing field {key!r}")
    _require(_is_int(bb["stem"]), f"config: backbone.stem must be an integer >= 1, got {bb['stem']!r}")
    stages = bb["stages"]
    _require(isinstance(stages, list) and stages, f"config: backbone.stages must be a list of rows, got {stages!r}")
    for i, row in enumerate(stages):
        ok = (isinstance(row, list) and len(row) == 6 and all(_is_int(v, 0) for v in row) and row[0] >= 1
              and row[1] % 2 == 1 and row[2] in (1, 2) and row[3] >= 1 and row[4] >= 1 and row[5] in (0, 1))
        _require(ok, f"config: backbone.stages[{i}] must be [expand >= 1, odd kernel, stride 1|2, channels >= 1, "
                     f"repeats >= 1, fused 0|1], got {row!r}")
    out = bb["out_stages"]
    _require(isinstance(out, list) and out and all(_is_int(i, 0) and i < len(stages) for i in out)
             and out == sorted(set(out)),
             f"config: backbone.out_stages must be increasing stage indices in 0..{len(stages) - 1}, got {out!r}")

    strides = cfg["strides"]
    _require(isinstance(strides, list) and len(strides) == len(out) and all(_is_int(s) for s in strides),
             f"config: strides must be {len(out)} positive integers (one per output stage), got {strides!r}")
    s, want = 2, []
    for i, row in enumerate(stages):
        s *= row[2]
        if i in out:
            want.append(s)
    _require(strides == want, f"config: strides {strides} do not match the backbone's output strides {want}")

    neck = cfg["neck"]
    _require(isinstance(neck, dict) and _is_int(neck.get("width")),
             f"config: neck.width must be an integer >= 1, got {neck!r}")
    head = dict(cfg["head"]) if isinstance(cfg["head"], dict) else None
    _require(head is not None, f"config: head must be an object, got {cfg['head']!r}")
    head.setdefault("dgqp_topk", 4)
    head.setdefault("dgqp_width", 64)
    for key, low in (("width", 1), ("stacked_convs", 0), ("dgqp_topk", 1), ("dgqp_width", 1)):
        _require(_is_int(head.get(key), low), f"config: head.{key} must be an integer >= {low}, got {head.get(key)!r}")
    _require(isinstance(head.get("share_levels"), bool),
             f"config: head.share_levels must be true or false, got {head.get('share_levels')!r}")
    _require(head["dgqp_topk"] <= cfg["reg_max"] + 1,
             f"config: head.dgqp_topk {head['dgqp_topk']} exceeds the reg_max + 1 = {cfg['reg_max'] + 1} bins")
    cfg["head"] = head
    return cfg


def build_model(config: dict) -> Model:
    """A `Model` from a config dict, initialised as jaxyolo initialises the family (PyTorch's
    default convolution init, BN γ=1 β=0, small prediction weights, class prior 0.01), in train
    mode like any new nn.Module (call ``.eval()`` for decoded outputs). Build under
    ``torch.device("meta")`` for shapes only."""
    return Model(config)


def from_jaxyolo(state) -> dict:
    """A jaxyolo state_dict of this family (``Detector.state_dict()``: the same keys, numpy arrays,
    convolution weights (kh, kw, in, out)) as tensors this module loads with ``strict=True``."""
    out = {}
    for k, v in state.items():
        t = v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v)  # numpy arrays may be read-only
        out[k] = t.permute(3, 2, 0, 1).contiguous() if t.dim() == 4 else t
    return out


def read_config(folder) -> dict:
    path = os.path.join(os.fspath(folder), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (an exported folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        validate_config(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config


def load(folder, map_location="cpu") -> Model:
    """The exported model in `folder` (``config.json`` + ``model.pt``), in eval mode."""
    config = read_config(folder)
    path = os.path.join(os.fspath(folder), WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (an exported folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    with torch.device("meta"):
        model = Model(config)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for an unreadable file
        raise ConfigError(f"{path}: not a readable torch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
           if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad:
        parts = [f"{name}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                 for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatch", bad)) if items]
        raise ConfigError(f"{path}: does not fit {CONFIG_FILE}: " + "; ".join(parts))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()

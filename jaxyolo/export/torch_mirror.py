"""A plain PyTorch mirror of jaxyolo's YOLOv4 detectors (exported as ``jaxyolo_torch.py``).

This single file imports only ``torch``, ``math`` and the standard library. ``export_torch`` ships it
next to the weights, so a receiver needs neither JAX nor jaxyolo::

    import sys; sys.path.insert(0, "exported_folder")
    import jaxyolo_torch
    model = jaxyolo_torch.load("exported_folder")          # eval mode, float32, on the CPU
    boxes = model(images)   # images (B, 3, H, W) float32 in [0, 1] -> (B, N, 5 + nc)

The modules reproduce the reference PyTorch code (Scaled-YOLOv4 ``models/common.py`` / YOLOR
``models/yolo.py``) with the same attribute names and registration order, so ``state_dict()`` has
exactly the reference keys and shapes: a plain ``Detect`` head, or YOLOR's ``IDetect`` whose
``ia.<i>.implicit`` / ``im.<i>.implicit`` tensors carry the K KST candidates on their leading axis
(shape (K, C, 1, 1); K = 1 is YOLOR's own layout).

Building blocks (see the spec): Conv = conv (no bias, zero padding k//2) -> BatchNorm2d(eps=1e-3,
momentum=0.03) -> activation; with ``fused`` the BN is folded into a conv with bias, and the BN over
a CSP concatenation becomes its affine map (``bn.weight`` = scale, ``bn.bias`` = shift).

Config (``config.json``, a plain JSON dict, written by ``jaxyolo.export.torch_export.torch_config``):

- ``format``: ``"jaxyolo-torch/1"``; ``name``; ``nc``; ``act``: ``"silu"``, ``"mish"`` or ``"leaky"``;
- ``head``: ``"implicit"`` or ``"detect"``; ``kst``: K (>= 1, used by the implicit head);
  ``kst_draw``: what shares a training draw (``"step"``, ``"level"``, ``"image"``);
- ``fused``: whether BatchNorms are folded; ``anchors``: pixels, per level a list of [w, h];
  ``strides``: per level;
- ``layers``: per layer ``index``, ``from`` (absolute indices of the input layers, -1 = the image),
  ``module`` (Conv, Bottleneck, BottleneckCSP, BottleneckCSP2, SPPCSP, Upsample, Concat; the last
  layer Detect/IDetect), ``n`` (inner bottlenecks of CSP blocks), ``c_in``, ``c_out``, ``kernel``,
  ``stride`` (the conv stride);
- optional ``names`` (class names), ``img_size``.

Forward, eval mode: decoded detections (B, N, 5 + nc) like the reference's eval output and
``jaxyolo.Detector.__call__``: sigmoid on every channel, centre xy = (2σ - 0.5 + cell) * stride and
size wh = (2σ)² * anchor in pixels, objectness and class scores; rows ordered level -> anchor -> y -> x.
The implicit head uses the mean of its K candidates unless ``kst_index=(shift, scale)`` picks a pair.
Train mode (``model.train()``): the list of raw per-level logits (B, na, H/s, W/s, 5 + nc) like the
reference, BatchNorms use batch statistics, and a K > 1 head draws a random candidate pair
(``kst_draw``) unless ``kst_index`` is given. ``forward_raw`` always returns the raw logits.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

FORMAT = "jaxyolo-torch/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"

BN_EPS = 1e-3
BN_MOMENTUM = 0.03  # torch convention: running <- (1 - m) * running + m * batch
BLOCKS = ("Conv", "Bottleneck", "BottleneckCSP", "BottleneckCSP2", "SPPCSP", "Upsample", "Concat")
HEADS = ("Detect", "IDetect")
KST_DRAWS = ("step", "level", "image")

__all__ = ["ConfigError", "Model", "build_model", "load", "FORMAT", "CONFIG_FILE", "WEIGHTS_FILE"]


class ConfigError(ValueError):
    """The config (or the weights) of an exported model is missing, malformed or does not fit."""


def _act(name: str) -> nn.Module:
    if name == "silu":
        return nn.SiLU()
    if name == "mish":
        return nn.Mish()
    if name == "leaky":
        return nn.LeakyReLU(0.1)
    raise ConfigError(f"act: unknown activation {name!r} (expected silu, mish or leaky)")


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class Affine(nn.Module):
    """Per-channel scale and shift: a BatchNorm in inference form (fused CSP blocks)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _csp_bn(c: int, fused: bool) -> nn.Module:
    return Affine(c) if fused else _bn(c)


class Conv(nn.Module):
    """conv (no bias, zero padding k//2) -> BatchNorm -> activation; fused: conv with bias -> act."""

    def __init__(self, c1, c2, k=1, s=1, *, act="silu", fused=False):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=fused)
        self.bn = None if fused else _bn(c2)
        self.act = _act(act)

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return self.act(y)


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, e=0.5, **kw):
        super().__init__()
        h = int(c2 * e)
        self.cv1 = Conv(c1, h, 1, 1, **kw)
        self.cv2 = Conv(h, c2, 3, 1, **kw)
        self.add = bool(shortcut and c1 == c2)

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class BottleneckCSP(nn.Module):
    """Backbone CSP block: cat(cv3(m(cv1(x))), cv2(x)) -> bn -> act -> cv4."""

    def __init__(self, c1, c2, n=1, shortcut=True, *, act="silu", fused=False):
        super().__init__()
        kw = dict(act=act, fused=fused)
        c = int(c2 * 0.5)
        self.cv1 = Conv(c1, c, 1, 1, **kw)
        self.cv2 = nn.Conv2d(c1, c, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(c, c, 1, 1, bias=False)
        self.cv4 = Conv(2 * c, c2, 1, 1, **kw)
        self.bn = _csp_bn(2 * c, fused)
        self.act = _act(act)
        self.m = nn.Sequential(*[Bottleneck(c, c, shortcut, 1.0, **kw) for _ in range(n)])

    def forward(self, x):
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class BottleneckCSP2(nn.Module):
    """Neck CSP block ("rCSP"): x1 = cv1(x); cat(m(x1), cv2(x1)) -> bn -> act -> cv3."""

    def __init__(self, c1, c2, n=1, shortcut=False, *, act="silu", fused=False):
        super().__init__()
        kw = dict(act=act, fused=fused)
        c = int(c2)
        self.cv1 = Conv(c1, c, 1, 1, **kw)
        self.cv2 = nn.Conv2d(c, c, 1, 1, bias=False)
        self.cv3 = Conv(2 * c, c2, 1, 1, **kw)
        self.bn = _csp_bn(2 * c, fused)
        self.act = _act(act)
        self.m = nn.Sequential(*[Bottleneck(c, c, shortcut, 1.0, **kw) for _ in range(n)])

    def forward(self, x):
        x1 = self.cv1(x)
        y1 = self.m(x1)
        y2 = self.cv2(x1)
        return self.cv3(self.act(self.bn(torch.cat((y1, y2), 1))))


class SPPCSP(nn.Module):
    """CSP spatial pyramid pooling (max-pools 5, 9, 13, stride 1, same size)."""

    def __init__(self, c1, c2, k=(5, 9, 13), *, act="silu", fused=False):
        super().__init__()
        kw = dict(act=act, fused=fused)
        c = int(c2)
        self.cv1 = Conv(c1, c, 1, 1, **kw)
        self.cv2 = nn.Conv2d(c1, c, 1, 1, bias=False)
        self.cv3 = Conv(c, c, 3, 1, **kw)
        self.cv4 = Conv(c, c, 1, 1, **kw)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])
        self.cv5 = Conv(4 * c, c, 1, 1, **kw)
        self.cv6 = Conv(c, c, 3, 1, **kw)
        self.bn = _csp_bn(2 * c, fused)
        self.act = _act(act)
        self.cv7 = Conv(2 * c, c2, 1, 1, **kw)

    def forward(self, x):
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [m(x1) for m in self.m], 1)))
        y2 = self.cv2(x)
        return self.cv7(self.act(self.bn(torch.cat((y1, y2), 1))))


class Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class ImplicitA(nn.Module):
    """K additive ("shift") candidates, (K, C, 1, 1), init N(0, 0.02)."""

    def __init__(self, k: int, c: int, mean: float = 0.0, std: float = 0.02):
        super().__init__()
        self.implicit = nn.Parameter(torch.zeros(k, c, 1, 1))
        nn.init.normal_(self.implicit, mean=mean, std=std)


class ImplicitM(ImplicitA):
    """K multiplicative ("scale") candidates, (K, C, 1, 1), init N(1, 0.02)."""

    def __init__(self, k: int, c: int, mean: float = 1.0, std: float = 0.02):
        super().__init__(k, c, mean, std)


class Detect(nn.Module):
    """Per-level 1x1 conv with bias to na*(nc+5) channels; with `implicit` YOLOR's IDetect with K
    candidates: out = scale ⊙ conv(x + shift)."""

    def __init__(self, nc, anchors, strides, c_ins, *, implicit=False, kst=1, kst_draw="step"):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = len(anchors), len(anchors[0])
        self.stride = [float(s) for s in strides]
        px = torch.tensor(anchors, dtype=torch.float32).view(self.nl, self.na, 2)
        self.register_buffer("anchors", px / torch.tensor(self.stride).view(-1, 1, 1))  # grid units
        self.register_buffer("anchor_grid", px.clone().view(self.nl, 1, self.na, 1, 1, 2))  # pixels
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in c_ins)
        self.kst = int(kst) if implicit else 0
        self.kst_draw = kst_draw
        if implicit:
            self.ia = nn.ModuleList(ImplicitA(self.kst, c) for c in c_ins)
            self.im = nn.ModuleList(ImplicitM(self.kst, self.no * self.na) for _ in c_ins)

    def initialize_biases(self):
        """The reference's priors: 8 objects per 640² image, class prior 0.6 / (nc - 0.99)."""
        with torch.no_grad():
            for conv, s in zip(self.m, self.stride):
                b = conv.bias.view(self.na, -1)
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:] += math.log(0.6 / (self.nc - 0.99))

    def _pick(self, cands, level, which, batch, kst_index, draws):
        """The shift (which=0) or scale (which=1) vector of one level, (1 or B, C, 1, 1)."""
        if kst_index is not None:
            i = int(kst_index[which])
            return cands[i:i + 1]
        if draws is not None:
            return cands[draws[which][level]]
        return cands.mean(0, keepdim=True)

    def _draws(self, batch, device):
        """Random candidate indices per level and image (training), shared per `kst_draw`."""
        k, nl = self.kst, self.nl
        shape = {"step": (2, 1, 1), "level": (2, nl, 1), "image": (2, nl, batch)}[self.kst_draw]
        return torch.randint(0, k, shape, device=device).expand(2, nl, batch)

    def forward(self, xs, kst_index=None):
        """Raw logits per level, (B, na, H, W, no)."""
        out = []
        draws = None
        if self.kst and kst_index is None and self.training and self.kst > 1:
            draws = self._draws(xs[0].shape[0], xs[0].device)
        for i, (x, conv) in enumerate(zip(xs, self.m)):
            if self.kst:
                x = x + self._pick(self.ia[i].implicit, i, 0, x.shape[0], kst_index, draws)
            y = conv(x)
            if self.kst:
                y = y * self._pick(self.im[i].implicit, i, 1, x.shape[0], kst_index, draws)
            b, _, h, w = y.shape
            out.append(y.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def decode(self, raw):
        """Raw logits per level -> (B, N, no): boxes in pixels, scores after sigmoid."""
        z = []
        for i, p in enumerate(raw):
            b, na, h, w, no = p.shape
            y = p.float().sigmoid()
            gy, gx = torch.meshgrid(torch.arange(h, device=p.device, dtype=torch.float32),
                                    torch.arange(w, device=p.device, dtype=torch.float32), indexing="ij")
            grid = torch.stack((gx, gy), -1).view(1, 1, h, w, 2)
            xy = (y[..., 0:2] * 2.0 - 0.5 + grid) * self.stride[i]
            wh = (y[..., 2:4] * 2.0) ** 2 * self.anchor_grid[i].to(y.dtype)
            z.append(torch.cat((xy, wh, y[..., 4:]), -1).view(b, na * h * w, no))
        return torch.cat(z, 1)


class Model(nn.Module):
    """The detector: `model.<i>` is layer i of the table, as in the reference."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = validate_config(config)
        self.config = cfg
        self.nc = cfg["nc"]
        self.names = list(cfg.get("names") or [str(i) for i in range(self.nc)])
        kw = dict(act=cfg["act"], fused=cfg["fused"])
        layers = cfg["layers"]
        built = []
        self._from = []
        for row in layers:
            mod, c1, c2 = row["module"], row["c_in"], row["c_out"]
            if mod == "Conv":
                built.append(Conv(c1, c2, row["kernel"], row["stride"], **kw))
            elif mod == "Bottleneck":
                built.append(Bottleneck(c1, c2, True, 0.5, **kw))
            elif mod == "BottleneckCSP":
                built.append(BottleneckCSP(c1, c2, row["n"], **kw))
            elif mod == "BottleneckCSP2":
                built.append(BottleneckCSP2(c1, c2, row["n"], **kw))
            elif mod == "SPPCSP":
                built.append(SPPCSP(c1, c2, **kw))
            elif mod == "Upsample":
                built.append(nn.Upsample(scale_factor=2, mode="nearest"))
            elif mod == "Concat":
                built.append(Concat())
            else:
                c_ins = [layers[j]["c_out"] for j in row["from"]]
                built.append(Detect(cfg["nc"], cfg["anchors"], cfg["strides"], c_ins,
                                    implicit=cfg["head"] == "implicit", kst=cfg["kst"], kst_draw=cfg["kst_draw"]))
            self._from.append(list(row["from"]))
        self.model = nn.Sequential(*built)
        self.stride = [float(s) for s in cfg["strides"]]
        self.max_stride = int(max(cfg["strides"]))
        self.detect.initialize_biases()

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    def _check(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images: expected a (batch, 3, height, width) NCHW tensor, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"images: expected float values in [0, 1], got dtype {x.dtype}")
        if x.shape[2] % self.max_stride or x.shape[3] % self.max_stride:
            raise ValueError(f"images: height and width must be multiples of {self.max_stride}, "
                             f"got {tuple(x.shape[2:])}")

    def _check_kst_index(self, kst_index):
        if kst_index is None:
            return
        k = self.detect.kst
        if not k:
            raise ValueError("kst_index: this model has a plain Detect head (no KST candidates)")
        if len(kst_index) != 2 or not all(0 <= int(i) < k for i in kst_index):
            raise ValueError(f"kst_index: expected (shift, scale) with each in [0, {k}), got {kst_index!r}")

    def forward_raw(self, x, kst_index=None):
        """Images (B, 3, H, W) in [0, 1] -> raw logits per level, (B, na, H/s, W/s, 5 + nc)."""
        self._check(x)
        self._check_kst_index(kst_index)
        outputs = []
        y = x
        last = len(self.model) - 1
        for i, (layer, f) in enumerate(zip(self.model, self._from)):
            ins = [x if j == -1 else outputs[j] for j in f]
            if i == last:
                y = layer(ins, kst_index=kst_index)
            elif isinstance(layer, Concat):
                y = layer(ins)
            else:
                y = layer(ins[0])
            outputs.append(y)
        return y

    def decode(self, raw):
        return self.detect.decode(raw)

    def forward(self, x, kst_index=None):
        """Eval mode: decoded (B, N, 5 + nc); train mode: the raw per-level logits."""
        raw = self.forward_raw(x, kst_index=kst_index)
        return raw if self.training else self.decode(raw)


def _require(cond, msg):
    if not cond:
        raise ConfigError(msg)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(config) -> dict:
    """Check a config dict and return a normalised copy; errors name the field at fault."""
    _require(isinstance(config, dict), f"config: expected a JSON object, got {type(config).__name__}")
    fmt = config.get("format", FORMAT)
    _require(fmt == FORMAT, f"config: format {fmt!r} is not supported (expected {FORMAT!r})")
    for key in ("nc", "anchors", "strides", "layers"):
        _require(key in config, f"config: missing field {key!r}")
    cfg = dict(config)
    cfg.setdefault("act", "silu")
    cfg.setdefault("head", "detect")
    cfg.setdefault("kst", 1)
    cfg.setdefault("kst_draw", "step")
    cfg.setdefault("fused", False)
    _require(_is_int(cfg["nc"]) and cfg["nc"] >= 1, f"config: nc must be an integer >= 1, got {cfg['nc']!r}")
    _require(cfg["head"] in ("implicit", "detect"), f"config: head must be 'implicit' or 'detect', got {cfg['head']!r}")
    _require(_is_int(cfg["kst"]) and cfg["kst"] >= 1, f"config: kst must be an integer >= 1, got {cfg['kst']!r}")
    _require(cfg["kst_draw"] in KST_DRAWS, f"config: kst_draw must be one of {KST_DRAWS}, got {cfg['kst_draw']!r}")
    _require(isinstance(cfg["fused"], bool), f"config: fused must be true or false, got {cfg['fused']!r}")
    _require(cfg["act"] in ("silu", "mish", "leaky"), f"config: act must be silu, mish or leaky, got {cfg['act']!r}")
    anchors = cfg["anchors"]
    try:
        anchors = [[[float(v) for v in wh] for wh in level] for level in anchors]
        ok = bool(anchors) and all(len(wh) == 2 for lv in anchors for wh in lv)
        ok = ok and len({len(lv) for lv in anchors}) == 1 and len(anchors[0]) > 0
    except (TypeError, ValueError):
        ok = False
    _require(ok, f"config: anchors must be per level a list of [w, h] pairs, got {cfg['anchors']!r}")
    cfg["anchors"] = anchors
    strides = cfg["strides"]
    _require(isinstance(strides, list) and len(strides) == len(anchors) and all(_is_int(s) and s > 0 for s in strides),
             f"config: strides must be {len(anchors)} positive integers (one per anchor level), got {strides!r}")
    layers = cfg["layers"]
    _require(isinstance(layers, list) and len(layers) >= 2, "config: layers must be a list of layer objects")
    rows, c_outs = [], []
    for i, row in enumerate(layers):
        where = f"config: layers[{i}]"
        _require(isinstance(row, dict), f"{where}: expected an object, got {type(row).__name__}")
        mod = row.get("module")
        last = i == len(layers) - 1
        _require(mod in (HEADS if last else BLOCKS),
                 f"{where}: module must be one of {HEADS if last else BLOCKS}, got {mod!r}")
        f = row.get("from", [-1])
        f = f if isinstance(f, list) else [f]
        _require(f and all(_is_int(j) and (j == -1 or 0 <= j < i) for j in f),
                 f"{where}: 'from' must list earlier layer indices (-1 = the image), got {row.get('from')!r}")
        r = {"index": i, "from": f, "module": mod}
        c_ins = [3 if j == -1 else c_outs[j] for j in f]
        if last:
            _require(len(f) == len(anchors), f"{where}: the head reads {len(f)} levels but anchors has {len(anchors)}")
            r.update(n=1, c_in=sum(c_ins), c_out=0, kernel=1, stride=1)
        else:
            for key, default in (("n", 1), ("kernel", 1), ("stride", 1)):
                v = row.get(key, default)
                _require(_is_int(v) and v >= 1, f"{where}: {key} must be an integer >= 1, got {v!r}")
                r[key] = v
            if mod == "Concat":
                r["c_in"] = r["c_out"] = sum(c_ins)
            elif mod == "Upsample":
                _require(len(f) == 1, f"{where}: Upsample takes one input, got from={f!r}")
                r["c_in"] = r["c_out"] = c_ins[0]
            else:
                _require(len(f) == 1, f"{where}: {mod} takes one input, got from={f!r}")
                c2 = row.get("c_out")
                _require(_is_int(c2) and c2 >= 1, f"{where}: c_out must be a positive integer, got {c2!r}")
                r["c_in"], r["c_out"] = c_ins[0], c2
            if "c_in" in row:
                _require(row["c_in"] == r["c_in"],
                         f"{where}: c_in {row['c_in']!r} does not match its inputs' channels {r['c_in']}")
        rows.append(r)
        c_outs.append(r["c_out"])
    cfg["layers"] = rows
    return cfg


def build_model(config: dict) -> Model:
    """A `Model` from a config dict, initialised as the reference does (default conv init, BN
    γ=1 β=0, implicit N(0 | 1, 0.02), detection-bias priors), in train mode like any new
    nn.Module (call ``.eval()`` for decoded outputs). Build under ``torch.device("meta")`` for
    shapes only."""
    return Model(config)


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

"""The PyTorch side of the train-step benchmark: the reference's loss and optimiser step in eager
PyTorch, on the PyTorch mirror (`jaxyolo.export.torch_mirror`) loaded with a jaxyolo detector's
weights.

The loss is written the reference's way (docs/reference.md §8), not as a port of `jaxyolo.loss`: targets are a
ragged list of rows (image, class, x, y, w, h), `build_targets` filters them per level by the anchor
shape test and fans each one out to its own and neighbouring cells with boolean indexing, and the
terms are computed on the gathered predictions only. jaxyolo's loss evaluates every candidate at a
fixed shape instead; the tests check that both give the same value, which makes this the baseline
the benchmark compares against (the same model, weights and loss, each framework's natural form).

The step (`TorchTrainer.step`) does what `jaxyolo.train_step`'s step does every iteration: uint8 images
to float, forward in train mode (batch statistics, a random KST candidate pair), loss, backward,
grouped Nesterov SGD (docs/reference.md §9: BN weights and implicit vectors without decay, other weights with
decay, biases without), and the EMA of parameters and BN statistics.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# docs/reference.md §8: own cell, then left, up, right, down neighbours
_OFFSETS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 0.5


def ragged_targets(boxes, classes, mask, img_size: int) -> torch.Tensor:
    """Padded targets (boxes (B, M, 4) xyxy pixels, classes (B, M), mask (B, M)) -> the reference's
    rows (n, 6): image index, class, centre x, centre y, w, h normalised by the input size."""
    boxes, classes, mask = np.asarray(boxes, np.float32), np.asarray(classes), np.asarray(mask, bool)
    b, m = np.nonzero(mask)
    xyxy = boxes[b, m]
    xywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / img_size
    rows = np.concatenate([b[:, None].astype(np.float32), classes[b, m][:, None].astype(np.float32), xywh], 1)
    return torch.from_numpy(rows.astype(np.float32))


def ciou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """CIoU of centre-xywh boxes (n, 4) (docs/reference.md §8; the aspect weight alpha without gradient)."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = b1.unbind(-1), b2.unbind(-1)
    l1, r1, t1, d1 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    l2, r2, t2, d2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.min(r1, r2) - torch.max(l1, l2)).clamp(0) * (torch.min(d1, d2) - torch.max(t1, t2)).clamp(0)
    w1, h1 = r1 - l1, d1 - t1 + eps
    w2, h2 = r2 - l2, d2 - t2 + eps
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    c2 = (torch.max(r1, r2) - torch.min(l1, l2)) ** 2 + (torch.max(d1, d2) - torch.min(t1, t2)) ** 2 + eps
    rho2 = ((l2 + r2 - l1 - r1) ** 2 + (t2 + d2 - t1 - d1) ** 2) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        denom = v - iou + (1 + eps)
        alpha = torch.where(denom > 0, v / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(v))
    return iou - (rho2 / c2 + v * alpha)


def build_targets(shapes, targets: torch.Tensor, anchors, strides, anchor_t: float):
    """Per level: (image, anchor, gy, gx) indices, box targets (x, y in the cell, w, h; grid units),
    anchors (grid units) and classes of every assignment, in the reference's order (offset, anchor,
    target). `shapes`: per level (H, W)."""
    na, nt, dev = len(anchors[0]), targets.shape[0], targets.device
    ai = torch.arange(na, dtype=torch.float32, device=dev).view(na, 1).expand(na, nt)
    t_all = torch.cat([targets[None].expand(na, nt, 6), ai[..., None]], 2)  # (na, nt, 7)
    out = []
    for (h, w), anc_px, s in zip(shapes, anchors, strides):
        anc = torch.tensor(anc_px, dtype=torch.float32, device=dev) / s
        gain = torch.tensor([1, 1, w, h, w, h, 1], dtype=torch.float32, device=dev)
        t = t_all * gain
        r = t[..., 4:6] / anc[:, None]
        t = t[torch.max(r, 1 / r).max(2).values < anchor_t]  # shape match (docs/reference.md §8 step 2)
        gxy = t[:, 2:4]
        gxi = gain[[2, 3]] - gxy
        j, k = ((gxy % 1 < 0.5) & (gxy > 1)).T
        l, m = ((gxi % 1 < 0.5) & (gxi > 1)).T
        pick = torch.stack([torch.ones_like(j), j, k, l, m])
        t = t.repeat(5, 1, 1)[pick]
        offsets = (torch.zeros_like(gxy)[None] + _OFFSETS.to(dev)[:, None])[pick]
        img, cls = t[:, 0].long(), t[:, 1].long()
        gxy, gwh = t[:, 2:4], t[:, 4:6]
        gij = (gxy - offsets).long()
        gi, gj = gij[:, 0].clamp(0, w - 1), gij[:, 1].clamp(0, h - 1)
        a = t[:, 6].long()
        tbox = torch.cat([gxy - torch.stack([gi, gj], 1), gwh], 1)
        out.append(((img, a, gj, gi), tbox, anc[a], cls))
    return out


def _bce(logits, target, pos_weight: float):
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight, device=logits.device))


def yolo_loss(preds, targets: torch.Tensor, *, anchors, strides, hyp: dict):
    """The reference loss of raw per-level logits (B, na, H, W, 5 + nc) against rows (n, 6);
    `hyp` holds plain floats (box, obj, cls, cls_pw, obj_pw, anchor_t, balance, label_smoothing).
    Returns (total × batch size, per-level (box, obj, cls) after gains)."""
    nl, bsz, nc = len(preds), preds[0].shape[0], preds[0].shape[-1] - 5
    eps_ls = hyp.get("label_smoothing", 0.0)
    cp, cn = 1.0 - 0.5 * eps_ls, 0.5 * eps_ls
    s_lv = 3.0 / nl
    gains = (hyp["box"] * s_lv, hyp["obj"] * s_lv * (1.4 if nl >= 4 else 1.0), hyp["cls"] * s_lv)
    assigned = build_targets([p.shape[2:4] for p in preds], targets, anchors, strides, hyp["anchor_t"])
    zero = preds[0].new_zeros(())
    levels = []
    for lvl, (p, ((img, a, gj, gi), tbox, anc, cls)) in enumerate(zip(preds, assigned)):
        tobj = torch.zeros_like(p[..., 4])
        lbox = lcls = zero
        n = img.shape[0]
        if n:
            ps = p[img, a, gj, gi]
            pbox = torch.cat([ps[:, :2].sigmoid() * 2 - 0.5, (ps[:, 2:4].sigmoid() * 2) ** 2 * anc], 1)
            iou = ciou(pbox, tbox)
            lbox = (1.0 - iou).mean()
            # objectness target: the clamped CIoU, the last assignment to a cell winning (docs/reference.md §8);
            # resolved explicitly because an index_put with repeated indices has no defined winner
            cell = ((img * p.shape[1] + a) * p.shape[2] + gj) * p.shape[3] + gi
            uniq, inv = torch.unique(cell, return_inverse=True)
            last = torch.zeros_like(uniq).scatter_reduce(0, inv, torch.arange(n, device=p.device), "amax",
                                                     include_self=False)
            tobj.view(-1)[cell[last]] = iou.detach().clamp(0)[last].to(tobj.dtype)
            if nc > 1:
                tc = torch.full_like(ps[:, 5:], cn)
                tc[torch.arange(n, device=p.device), cls] = cp
                lcls = _bce(ps[:, 5:], tc, hyp["cls_pw"])
        lobj = _bce(p[..., 4], tobj, hyp["obj_pw"]) * hyp["balance"][lvl]
        levels.append(torch.stack([lbox * gains[0], lobj * gains[1], lcls * gains[2]]))
    local = torch.stack(levels)
    return local.sum() * bsz, local


def param_groups(model):
    """The reference's three optimiser groups (docs/reference.md §9): BN weights and implicit vectors, other
    weights, biases."""
    bn_weights, decay, biases = [], [], []
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if name == "bias":
                biases.append(p)
            elif name == "implicit" or (isinstance(mod, torch.nn.BatchNorm2d) and name == "weight"):
                bn_weights.append(p)
            else:
                decay.append(p)
    return bn_weights, decay, biases


class TorchTrainer:
    """One training iteration of a jaxyolo detector's PyTorch mirror (see the module docstring)."""

    def __init__(self, detector, hyp: dict, *, img_size: int, channels_last: bool = True,
                 lr: float = 0.01, ema_decay: float = 0.9999):
        from jaxyolo.export.torch_export import torch_config
        from jaxyolo.export.torch_mirror import build_model

        spec = detector.spec
        self.model = build_model(torch_config(detector))
        state = {k: torch.from_numpy(np.array(v)) for k, v in detector.state_dict().items()}
        self.model.load_state_dict(state)
        self.model.train()
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.anchors, self.strides, self.img_size = spec.anchors, spec.strides, img_size
        self.hyp = {k: (list(map(float, v)) if k == "balance" else float(np.asarray(v)))
                    for k, v in hyp.items() if k in ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t",
                                                     "balance", "label_smoothing")}
        self.hyp["cls"] *= spec.nc / 80.0  # docs/reference.md §9, as jaxyolo's step does
        g0, g1, g2 = param_groups(self.model)
        wd = float(np.asarray(hyp["weight_decay"]))
        self.opt = torch.optim.SGD(g0, lr=lr, momentum=float(np.asarray(hyp["momentum"])), nesterov=True)
        self.opt.add_param_group({"params": g1, "weight_decay": wd})
        self.opt.add_param_group({"params": g2})
        self.ema = [t.detach().clone() for t in self._ema_sources()]
        self.ema_decay = ema_decay

    def _ema_sources(self):
        return [t for t in self.model.state_dict().values() if t.dtype.is_floating_point]

    def images(self, images_uint8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div_(255.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def loss(self, images: torch.Tensor, targets: torch.Tensor):
        preds = self.model(images)
        return yolo_loss(preds, targets, anchors=self.anchors, strides=self.strides, hyp=self.hyp)

    def step(self, images_uint8: np.ndarray, targets: torch.Tensor) -> float:
        total, _ = self.loss(self.images(images_uint8), targets)
        total.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            sources = self._ema_sources()
            torch._foreach_mul_(self.ema, self.ema_decay)
            torch._foreach_add_(self.ema, sources, alpha=1.0 - self.ema_decay)
        return float(total.detach()) / images_uint8.shape[0]

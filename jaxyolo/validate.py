"""Validation of one detector or of a whole population in one pass over the data.

Each batch runs every member's inference model (KST mean, BN running statistics) in one vmapped
program that also returns the member's loss terms on that batch (local and global, the search
reads both), decodes and applies NMS on device; the host maps boxes back to the original images
and pycocotools scores them (`jaxyolo.evaluate`).

The in-training evaluation of the reference uses NMS IoU 0.6 (docs/reference.md §11); the standalone test uses
0.65. Both are arguments here; `DEFAULT_IOU_TRAIN` / `DEFAULT_IOU_TEST` name them.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from flax import nnx

from jaxyolo import distributed as dist
from jaxyolo import families
from jaxyolo.augment import to_unit
from jaxyolo.data.dataset import DetectionDataset
from jaxyolo.data.loader import eval_batches, pad_boxes, unletterbox_boxes
from jaxyolo.evaluate import detections_to_coco, evaluate_predictions, nms, split_detections
from jaxyolo.predictions import Predictions

DEFAULT_CONF = 0.001
DEFAULT_IOU_TRAIN = 0.6
DEFAULT_IOU_TEST = 0.65
DEFAULT_MAX_DET = 300


def fitness(ap50: float, ap: float) -> float:
    """The reference's fitness, 0.1·mAP@0.5 + 0.9·mAP@0.5:0.95 (its precision and recall weights
    are 0); trials, checkpoints and the search rank by it."""
    return 0.1 * ap50 + 0.9 * ap


def letterboxed_targets(dataset: DetectionDataset, batch: dict, max_boxes: int):
    """Ground truth of an eval batch in the letterboxed frame: (boxes, classes, mask) padded."""
    n = len(batch["index"])
    boxes = np.zeros((n, max_boxes, 4), np.float32)
    classes = np.zeros((n, max_boxes), np.int32)
    mask = np.zeros((n, max_boxes), bool)
    for j, idx in enumerate(batch["index"].tolist()):
        if idx < 0:
            continue
        b, c = dataset.labels(idx)
        gx, gy, px, py = batch["ratio_pad"][j]
        b = np.asarray(b, np.float32) * np.asarray([gx, gy, gx, gy], np.float32) + np.asarray([px, py, px, py],
                                                                                             np.float32)
        boxes[j], classes[j], mask[j], _ = pad_boxes(b, np.asarray(c), max_boxes)
    return boxes, classes, mask


@functools.lru_cache(maxsize=16)
def _population_eval(graphdef, spec, max_det, gain_rule, mesh=None):
    """The jitted evaluation of one batch for every member, for this architecture and settings.

    Built once per architecture and kept: as static arguments of one jitted function, the graph
    definition would be hashed on every batch (5 ms each for a small model on the CPU). With the
    members sharded over a mesh's 'pop' axis, each device group evaluates its own members
    (`shard_map`, as the train step: the partitioner cannot split the vmapped convolutions)."""

    family = families.of(spec)

    def members(params, stats, hyp, images, boxes, classes, mask, conf, iou):
        images = to_unit(images)

        def one(p, s, h):
            model = nnx.merge(graphdef, p, s, copy=True)
            raw = model(images, train=False)
            _, terms = family.loss(raw, boxes, classes, mask, h, spec=spec, img_size=images.shape[1],
                                   gain_rule=gain_rule)
            return terms, family.decode(raw, spec)

        terms, pred = jax.vmap(one)(params, stats, hyp)
        # NMS over every member's images at once, outside the vmap: it picks its candidate sort
        # by the batch's largest candidate count, a branch that vmap would turn into both
        pop, b = pred.scores.shape[:2]
        flat = Predictions(*(x.reshape(pop * b, *x.shape[2:]) for x in pred))
        dets = nms(flat, conf_thres=conf, iou_thres=iou, max_det=max_det)
        return terms, jax.tree.map(lambda x: x.reshape(pop, b, *x.shape[1:]), dets)

    if mesh is not None:
        members = jax.shard_map(members, mesh=mesh, in_specs=(P("pop"),) * 3 + (P(),) * 6,
                                out_specs=(P("pop"), P("pop")), axis_names={"pop"}, check_vma=False)

    @jax.jit
    def run(params, stats, images, boxes, classes, mask, hyp, conf, iou):
        return members(params, stats, hyp, images, boxes, classes, mask, conf, iou)

    return run


def _members_mesh(params):
    """The ('pop', 'data') mesh the members are placed on, if any."""
    mesh = getattr(getattr(jax.tree.leaves(params)[0], "sharding", None), "mesh", None)
    return mesh if mesh is not None and set(mesh.axis_names) == {"pop", "data"} else None


def validate_population(graphdef, spec, params, stats, hyp, dataset: DetectionDataset, *, img_size: int,
                        batch_size: int = 16, conf_thres: float = DEFAULT_CONF, iou_thres: float = DEFAULT_IOU_TRAIN,
                        max_det: int = DEFAULT_MAX_DET, max_boxes: int = 100, workers: int = 0,
                        keep_detections: bool = False, gain_rule: str = "per-class",
                        progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Metrics of every member: params/stats/hyp carry a leading population axis P. The loss
    uses the gains of `gain_rule` (`jaxyolo.hyp.loss_gains`), as the training run did.

    Returns per member {"loss": {"local": (L, T), "global": (T,)} (T: the family's terms) averaged over batches,
    "coco": ..., "voc": ..., "per_class": [...], "fitness": float} and, with `keep_detections`,
    "detections": the COCO results list.
    """
    pop = jax.tree.leaves(params)[0].shape[0]
    preds = [[None] * len(dataset) for _ in range(pop)]
    local_sum, n_batches = 0.0, 0
    mesh = _members_mesh(params)
    if dist.multi_process() and mesh is None:  # members held whole in each process: placed over all devices
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, -1), ("pop", "data"))
        params, stats, hyp = dist.place((params, stats, hyp), NamedSharding(mesh, P("pop")))
    run = _population_eval(graphdef, spec, max_det, gain_rule,
                           mesh if mesh is not None and (mesh.shape["pop"] > 1 or dist.multi_process()) else None)
    conf, iou = jnp.float32(conf_thres), jnp.float32(iou_thres)
    # with several processes each reads its rows of every batch (those its devices hold on 'data')
    rows_sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
    rows = None
    if dist.multi_process() and batch_size % mesh.shape["data"] == 0:
        rows = dist.local_rows(rows_sharding, batch_size)
        rows = None if rows == slice(0, batch_size) else rows  # 'data' within each process: all read all
    split = rows is not None
    batches = eval_batches(dataset, img_size=img_size, batch_size=batch_size, num_workers=workers, rows=rows)

    def collect(batch, terms, dets):
        nonlocal local_sum, n_batches
        local_sum = local_sum + dist.to_host(terms["local"])
        n_batches += 1
        dets = dist.to_host(dets)  # with several processes: gathered from the members' processes
        for m in range(pop):
            per_image = split_detections(jax.tree.map(lambda x, m=m: x[m], dets))
            for j, idx in enumerate(batch["index"].tolist()):
                if idx < 0:
                    continue
                bx, sc, cl = per_image[j]
                bx = unletterbox_boxes(bx, batch["ratio_pad"][j], batch["orig_shape"][j])
                preds[m][idx] = (bx, sc, cl)
        if progress is not None:
            progress(n_batches, len(batches))

    pending, program = None, None  # the previous batch, read back while this one runs on the device
    for batch in batches:
        boxes, classes, mask = letterboxed_targets(dataset, batch, max_boxes)
        arrays = (batch["image"], boxes, classes, mask)
        if split:  # the global batch from every process's rows; the rows' descriptions to every process
            arrays = tuple(dist.global_array(a, rows_sharding, batch_size) for a in arrays)
            batch = dist.gather_rows({k: batch[k] for k in ("index", "ratio_pad", "orig_shape")})
        if program is None:
            program = dist.compiled(run, params, stats, *arrays, hyp, conf, iou)
        out = program(params, stats, *arrays, hyp, conf, iou)
        if pending is not None:
            collect(*pending)
        pending = (batch, *out)
    if pending is not None:
        collect(*pending)
    out = []
    for m in range(pop):
        local = local_sum[m] / max(n_batches, 1)
        res = evaluate_predictions(preds[m], dataset)
        res["loss"] = {"local": local, "global": local.sum(0)}
        res["fitness"] = fitness(res["coco"]["AP50"], res["coco"]["AP"])
        res["predictions"] = preds[m]  # per image: (boxes in original pixels, scores, classes)
        if keep_detections:
            res["detections"] = detections_to_coco(*([p[j] for p in preds[m]] for j in range(3)),
                                                   dataset.image_ids, dataset.category_ids)
        out.append(res)
    return out


def validate(detector, dataset: DetectionDataset, *, img_size: int | None = None, batch_size: int = 16,
             conf_thres: float = DEFAULT_CONF, iou_thres: float = DEFAULT_IOU_TEST, hyp=None, **kw) -> dict:
    """Metrics of one detector on a dataset (the standalone test: NMS IoU 0.65 by default).

    `img_size`, the loss's `hyp` and its gain rule default to those the detector was trained with
    (`Detector.training`), else 640 px and the default hyps."""
    from jaxyolo import hyp as H

    detector.require_weights("validate")
    training = detector.training or {}
    img_size = img_size or detector.img_size or 640
    kw.setdefault("gain_rule", (training.get("recipe") or {}).get("gain_rule", H.RECIPE_DEFAULTS["gain_rule"]))
    graphdef, params, stats = nnx.split(detector.model, nnx.Param, nnx.BatchStat)
    add = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
    hp = H.as_arrays(H.load_hyp(hyp if hyp is not None else training.get("hyp"), num_levels=len(detector.spec.strides),
                                family=detector.family))
    return validate_population(graphdef, detector.spec, add(params), add(stats), add(hp), dataset,
                               img_size=img_size, batch_size=batch_size, conf_thres=conf_thres,
                               iou_thres=iou_thres, **kw)[0]

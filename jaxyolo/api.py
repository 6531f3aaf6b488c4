"""The façade a notebook user touches: create, load, run, fold and save a detector."""

from __future__ import annotations

import functools
import dataclasses
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxyolo import families
from jaxyolo.errors import CheckpointError, ConfigError
from jaxyolo.files import crc32, quiet_logger, reason
from jaxyolo.models import config as mcfg
from jaxyolo.models import profile
from jaxyolo.predictions import Predictions

CHECKPOINT_FORMAT = "jaxyolo-detector/2"  # 2: the family and its spec fields are named
# Version 1 (YOLOv4 only, anchors at the top level) still loads.
_READABLE_FORMATS = ("jaxyolo-detector/1", CHECKPOINT_FORMAT)


class Detector:
    """A detector network with its table and options, and the operations users need on it.

    `model` is the Flax NNX module; `family` the detector family that built it
    (`jaxyolo.families`); `spec` the resolved table; `options` how it was built;
    `training` how its weights were trained (None for a fresh or imported model): a JSON-able dict
    with at least `img_size`, and the `hyp` and `recipe` of the run, saved with the checkpoint so
    that evaluation and prediction default to the training size.
    """

    def __init__(self, model, table: dict, names: tuple[str, ...] | None = None,
                 training: dict | None = None):
        self.model = model
        self.family = families.of(model.spec)
        self.table = table  # the raw table, kept so save/load rebuild the same network
        self.names = tuple(names) if names is not None else tuple(str(i) for i in range(model.spec.nc))
        self.training = training

    @property
    def img_size(self) -> int | None:
        """The square size the weights were trained at, when known."""
        size = (self.training or {}).get("img_size")
        return int(size) if size else None

    def with_model(self, model, *, training: bool = True) -> "Detector":
        """This detector's table, names and (with `training`) training record around another
        module of its family (e.g. other weights, or a folded form)."""
        return Detector(model, self.table, self.names, self.training if training else None)

    def as_float32(self) -> "Detector":
        """Itself, or (when built with a reduced compute dtype) its weights computing in float32:
        what the exports' parity gates compare with."""
        if getattr(self.options, "dtype", None) is None:
            return self
        options = dataclasses.replace(self.options, dtype=None)
        model = nnx.eval_shape(lambda: self.family.build(self.spec, options, rngs=nnx.Rngs(0)))
        self.family.load_state_dict(model, self.state_dict(), source="as_float32")
        return self.with_model(model, training=False)

    # -- description -------------------------------------------------------------------------
    @property
    def spec(self):
        return self.model.spec

    @property
    def options(self):
        return self.model.options

    @property
    def num_classes(self) -> int:
        return self.spec.nc

    @property
    def kst(self) -> int:
        """KST candidates per implicit vector (0 for a plain Detect head or a family without)."""
        return self.family.kst(self.model)

    def num_params(self) -> int:
        return profile.count_params(self.model)

    def gflops(self, img_size: int = 640) -> float:
        """2 x convolution multiply-accumulates for one image of img_size x img_size, in 1e9."""
        return profile.gflops(self.model, img_size)

    def layer_table(self, img_size: int = 640) -> list[dict]:
        return self.family.layer_table(self.model, img_size)

    def __repr__(self) -> str:
        return (f"Detector({self.spec.name}, nc={self.num_classes}, {self.family.describe(self.spec, self.options)}, "
                f"params={self.num_params():,})")

    # -- inference ------------------------------------------------------------------------------
    def forward_raw(self, images, *, kst_index=None):
        """Images (B, H, W, 3) float32 in [0, 1] -> the raw outputs (YOLOv4: logits per level,
        (B, na, H/s, W/s, 5 + nc)).

        Inference mode (BatchNorm running statistics; KST candidates' mean unless `kst_index`
        = (shift, scale) picks a pair). H and W must be multiples of the largest stride.
        """
        images = self._check_images(images)
        graphdef, state = nnx.split(self.model)
        if kst_index is not None:
            self._check_kst_index(kst_index)
            kst_index = jnp.asarray(kst_index, jnp.int32)
        return _jit_forward(graphdef, state, images, kst_index)

    def decode(self, raw) -> jax.Array:
        """Raw outputs -> the tensor an exported file publishes, in the family's `export_layout`
        (`jaxyolo.predictions`). YOLOv4: (B, N, 5 + nc), centre x, y, width, height (pixels),
        objectness, class scores, all after sigmoid: the reference's eval output."""
        return _jit_export_tensor(self.family, self.spec, _as_tuple(raw))

    def __call__(self, images, *, kst_index=None) -> jax.Array:
        return self.decode(self.forward_raw(images, kst_index=kst_index))

    def predictions(self, images, *, kst_index=None) -> Predictions:
        """Images -> the family-neutral `Predictions` (boxes xyxy, per-class scores) that
        `jaxyolo.evaluate.nms` takes."""
        return _jit_predictions(self.family, self.spec, _as_tuple(self.forward_raw(images, kst_index=kst_index)))

    def forward_all_kst(self, images) -> list[jax.Array]:
        """Raw outputs for every (shift, scale) candidate pair in one vmapped program.

        Returns per level an array (K, K, B, na, H/s, W/s, 5 + nc); entry [i, j] equals
        `forward_raw(images, kst_index=(i, j))`. This is the paper's Table 4 sweep.
        """
        if not self.kst:
            raise ConfigError("forward_all_kst: this detector has a plain Detect head (no KST candidates)")
        images = self._check_images(images)
        graphdef, state = nnx.split(self.model)
        return _jit_all_kst(graphdef, state, images, self.kst)

    def require_weights(self, what: str):
        leaf = jax.tree.leaves(nnx.state(self.model))[0]
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ConfigError(f"{what}: this detector was built with abstract=True (shapes only, no weights)")

    def _check_images(self, images):
        self.require_weights("forward")
        images = jnp.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"images: expected (batch, height, width, 3) NHWC, got shape {tuple(images.shape)}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ConfigError(f"images: expected float values in [0, 1], got dtype {images.dtype}")
        return images

    def _check_kst_index(self, kst_index):
        if not self.kst:
            raise ConfigError("kst_index: this detector has a plain Detect head (no KST candidates)")
        if len(kst_index) != 2 or not all(0 <= int(i) < self.kst for i in kst_index):
            raise ConfigError(f"kst_index: expected (shift, scale) with each in [0, {self.kst}), got {kst_index!r}")

    # -- transformations ----------------------------------------------------------------------
    def fold(self, *, kst_index=None, bn: bool = True) -> "Detector":
        """The inference form: implicit vectors (their mean, or the pair `kst_index`) folded into
        the head convs and, if `bn`, BatchNorms folded into the convs. Outputs are unchanged."""
        if self.family.name != "yolov4":
            raise ConfigError(f"fold: a YOLOv4 operation; this is a {self.family.name} detector")
        from jaxyolo.models.fold import fold as fold_model

        if kst_index is not None:
            self._check_kst_index(kst_index)
        return self.with_model(fold_model(self.model, kst_index=kst_index, bn=bn))

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """The weights under the family's reference names (numpy arrays, in order).

        YOLOv4: the reference PyTorch state_dict. A K=1 implicit head or a Detect head gives
        exactly the reference's keys and shapes; K > 1 keeps all candidates, stacked on the leading
        axis of each `implicit` tensor (fold first for a reference-loadable file).
        """
        return self.family.state_dict(self.model)

    def load_state_dict(self, state, *, source: str = "state_dict") -> "Detector":
        self.family.load_state_dict(self.model, state, source=source)
        return self

    # -- deployment ---------------------------------------------------------------------------
    def export_onnx(self, path: str | Path, img_size: int = 640, **options) -> dict:
        """Write a parity-gated ONNX model (implicit layers and BN folded); see
        `jaxyolo.export.onnx_export.export_onnx` for the options. Returns the export report."""
        from jaxyolo.export.onnx_export import export_onnx

        return export_onnx(self, path, img_size, **options)

    def export_torch(self, out_dir: str | Path, img_size: int = 640, **options) -> dict:
        """Write the PyTorch mirror (a torch-only module file, config.json, model.pt), parity-gated;
        see `jaxyolo.export.torch_export.export_torch`. Returns the export report."""
        from jaxyolo.export.torch_export import export_torch

        return export_torch(self, out_dir, img_size, **options)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save as an Orbax checkpoint folder: the model's variables plus a JSON description."""
        import orbax.checkpoint as ocp

        self.require_weights("save")
        path = Path(path).absolute()
        meta = {"format": CHECKPOINT_FORMAT, "family": self.family.name, "name": self.spec.name,
                "table": self.table, "nc": self.spec.nc, "fields": self.family.checkpoint_fields(self.spec),
                "options": self.family.options_to_dict(self.options), "names": list(self.names),
                "training": self.training}
        state = nnx.to_pure_dict(nnx.state(self.model))
        if jax.process_count() > 1:  # every process saves the same values: NumPy, which Orbax writes from process 0
            state = jax.device_get(state)
        meta["crc32"] = [crc32(x) for x in jax.tree.leaves(jax.device_get(state))]
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(path, ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)
        return path


def _as_tuple(raw):
    return tuple(raw) if isinstance(raw, list) else raw


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, images, kst_index):
    model = nnx.merge(graphdef, state, copy=True)
    if kst_index is None:
        return model(images, train=False)
    return model(images, train=False, kst_index=kst_index)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_export_tensor(family, spec, raw):
    return family.export_tensor(list(raw) if isinstance(raw, tuple) else raw, spec)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_predictions(family, spec, raw):
    return family.decode(list(raw) if isinstance(raw, tuple) else raw, spec)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jit_all_kst(graphdef, state, images, k):
    from jaxyolo.models.yolo import apply

    ii, jj = jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing="ij")

    def one(i, j):
        return apply(graphdef, state, images, kst_index=(i, j))[0]

    outs = jax.vmap(one)(ii.reshape(-1), jj.reshape(-1))
    return [o.reshape((k, k) + o.shape[1:]) for o in outs]


def _build(table: dict, name: str, *, nc, fields: dict, options, seed: int, abstract: bool) -> Detector:
    family = families.of_table(table, f"model table {name!r}")
    spec = family.resolve(table, name=name, nc=nc, **fields)
    make = lambda: family.build(spec, options, rngs=nnx.Rngs(seed))  # noqa: E731
    return Detector(nnx.eval_shape(make) if abstract else make(), table)


def create_model(
    name: str | Path = "yolov4s",
    *,
    num_classes: int = 80,
    anchors=None,
    seed: int = 0,
    abstract: bool = False,
    **options,
) -> Detector:
    """Build a detector from a built-in table (`yolov4s`, `yolov4m`, `yolov4l`, `yolov4x`,
    `yolov4n`, `yolov4p`) or a path to a YAML table, initialised as its family does.

    `options` are the family's model options (YOLOv4: `jaxyolo.models.yolo.ModelOptions`:
    head="implicit", kst=3, kst_draw="step", act="silu", dtype=None); `anchors` (YOLOv4) replace
    the table's. `abstract=True` builds shapes only (no values, instant even for the largest
    models): enough for `num_params`, `gflops`, `layer_table` and `state_dict` key listings.
    """
    table_name, table = families.load_model_table(name)
    family = families.of_table(table, f"model table {table_name!r}")
    fields = {} if anchors is None else {"anchors": anchors}
    return _build(table, table_name, nc=num_classes, fields=fields, options=family.make_options(**options),
                  seed=seed, abstract=abstract)


def load(path: str | Path) -> Detector:
    """Load a detector saved by `Detector.save`."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "meta").is_dir() or not (path / "state").is_dir():
        raise CheckpointError(f"{path}: not a jaxyolo checkpoint folder (expected 'meta' and 'state' inside)")

    def read(ckptr, what: str, args):
        try:
            with quiet_logger("asyncio"):
                return ckptr.restore(path, ocp.args.Composite(**{what: args}))[what]
        except Exception as e:  # Orbax, TensorStore and json each raise their own types for a damaged file
            raise CheckpointError(f"{path}: damaged checkpoint, its {what} cannot be read ({reason(e)})") from None

    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = read(ckptr, "meta", ocp.args.JsonRestore())
        if not isinstance(meta, dict) or meta.get("format") not in _READABLE_FORMATS:
            raise CheckpointError(f"{path}: unknown checkpoint format "
                                  f"{meta.get('format') if isinstance(meta, dict) else meta!r} "
                                  f"(this version reads {', '.join(_READABLE_FORMATS)})")
        try:
            family = families.get(meta.get("family", families.DEFAULT))
            fields = meta["fields"] if "fields" in meta else {"anchors": meta["anchors"]}
            det = _build(meta["table"], meta["name"], nc=meta["nc"], fields=fields,
                         options=family.options_from_dict(meta["options"]), seed=0, abstract=True)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: checkpoint description is incomplete ({e})") from None
        abstract = nnx.to_pure_dict(nnx.state(det.model))
        state = read(ckptr, "state", ocp.args.StandardRestore(abstract))
    sums = meta.get("crc32")  # absent in checkpoints written before it was recorded
    if sums is not None:
        leaves = jax.tree.leaves(state)
        bad = len(sums) != len(leaves) or any(crc32(x) != c for x, c in zip(leaves, sums))
        if bad:
            raise CheckpointError(f"{path}: damaged checkpoint, its weights differ from the checksums saved with "
                                  "them (a file was changed or cut after the save)")
    graphdef, st = nnx.split(det.model)
    nnx.replace_by_pure_dict(st, state)
    det.model = nnx.merge(graphdef, st)
    names = meta.get("names")
    if isinstance(names, list) and len(names) == det.num_classes:
        det.names = tuple(str(n) for n in names)
    training = meta.get("training")
    if training is not None and not (isinstance(training, dict) and isinstance(training.get("img_size"), int)):
        raise CheckpointError(f"{path}: checkpoint description has a malformed 'training' entry")
    det.training = training
    return det


def load_torch(name: str | Path, path: str | Path, *, num_classes: int | None = None) -> Detector:
    """Build detector `name` with weights from a reference PyTorch checkpoint.

    Reads a plain state_dict `.pt`, an official release checkpoint (`{'model': <module>, ...}`,
    possibly fp16) without the reference code and without executing anything from the file, or a
    `.npz` of reference-named arrays; a checkpoint with an `'ema'` module gives the EMA weights.
    torch is not needed. The head type and K come from the
    keys (`ia`/`im` present: implicit head, K = their leading size); the classes from the head
    conv; the anchors from the `anchor_grid` buffer when present.
    """
    from jaxyolo.export.torch_format import extract_state_dict, read_torch_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                state = OrderedDict((k, z[k]) for k in z.files)
        except Exception as e:  # numpy raises several types for a bad archive
            raise CheckpointError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    else:
        # The EMA weights are the evaluated ones: use them whenever the file has them (as the
        # reference repositories' loaders do).
        state = extract_state_dict(read_torch_file(path), source=str(path), prefer_ema=True)

    from jaxyolo.models.yolo import ModelOptions

    table_name, table = families.load_model_table(name)
    if families.of_table(table).name != "yolov4":
        raise ConfigError(f"load_torch: {table_name} is not a YOLOv4 table (reference checkpoints are YOLOv4's)")
    spec = mcfg.resolve(table, name=table_name)
    p = f"model.{len(spec.layers) - 1}."
    if f"{p}m.0.bias" not in state:
        raise CheckpointError(f"{path}: missing key {p}m.0.bias: not a {table_name} checkpoint")
    na = spec.num_anchors
    anchors = None
    if f"{p}anchor_grid" in state:
        grid = np.asarray(state[f"{p}anchor_grid"], np.float64)
        na = grid.shape[2]
        anchors = [list(np.round(grid[i].reshape(-1), 6)) for i in range(grid.shape[0])]
    n_out = int(np.shape(state[f"{p}m.0.bias"])[0])
    if n_out % na or n_out // na < 6:
        raise CheckpointError(f"{path}: {p}m.0.bias has {n_out} outputs, not a multiple of {na} anchors x (5 + nc)")
    file_nc = n_out // na - 5
    if num_classes is not None and num_classes != file_nc:
        raise CheckpointError(f"{path}: the file has {file_nc} classes, num_classes={num_classes} was asked for")
    implicit = f"{p}ia.0.implicit" in state
    kst = int(np.shape(state[f"{p}ia.0.implicit"])[0]) if implicit else 1
    options = ModelOptions(head="implicit" if implicit else "detect", kst=kst)
    det = _build(table, table_name, nc=file_nc, fields={} if anchors is None else {"anchors": anchors},
                 options=options, seed=0, abstract=True)
    det.load_state_dict(state, source=str(path))
    return det

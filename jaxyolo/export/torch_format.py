"""Read and write PyTorch ``.pt`` checkpoints without torch and without running code from the file.

Since torch 1.6, ``torch.save`` writes a zip archive::

    <archive>/data.pkl          the pickled object; tensors are persistent ids into the storages below
    <archive>/data/<key>        the raw bytes of one storage
    <archive>/byteorder         "little" or "big" (newer files; absent means little)
    <archive>/version           "3\\n"   (and, in torch 2.x, .format_version, .storage_alignment, .data/serialization_id)

A pickle is a small program: every global it names is imported and may be called. So
:func:`read_torch_file` unpickles ``data.pkl`` with :class:`_RestrictedUnpickler`, whose ``find_class``
answers from an explicit allow-list and maps every allowed global to a small re-implementation in this
module (tensors become numpy arrays, module classes become :class:`ModuleStub` subclasses); any other
global is refused *before* anything from the file runs. Nothing here imports torch.

What torch 2.13 writes (checked with ``pickletools.dis`` on its output):

* tensors: ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` with the
  persistent id ``('storage', torch.<X>Storage, '<key>', '<location>', numel)`` (numel in elements);
  dtypes without a typed storage class (uint16/32/64, float8 ...) use ``torch._utils._rebuild_tensor_v3``
  with ``torch.storage.UntypedStorage`` (numel in bytes) and a dtype global such as ``torch.uint16``;
* parameters: ``torch._utils._rebuild_parameter(tensor, requires_grad, OrderedDict())``
  (``_rebuild_parameter_with_state`` when the parameter has Python attributes; tensors with Python
  attributes go through ``torch._tensor._rebuild_from_type_v2``);
* modules (pickle protocol 2): ``GLOBAL 'torch.nn.modules.conv Conv2d'`` + ``NEWOBJ`` + ``BUILD`` with the
  module ``__dict__``; ``_non_persistent_buffers_set`` is ``__builtin__ set``; hooks are
  ``collections OrderedDict``. With protocol 0/1 modules come through ``copy_reg _reconstructor``.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pathlib
import pickle
import re
import secrets
import struct
import sys
import threading
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxyolo.errors import CheckpointError

__all__ = ["ModuleStub", "extract_state_dict", "read_torch_file", "write_state_dict"]

# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------

# torch dtype name (as in ``torch.<name>``) -> numpy dtype name; "ml:<name>" means ml_dtypes.<name>.
_TORCH_DTYPES: dict[str, str] = {
    "float32": "float32", "float": "float32",
    "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16",
    "bfloat16": "ml:bfloat16",
    "int64": "int64", "long": "int64",
    "int32": "int32", "int": "int32",
    "int16": "int16", "short": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "complex64": "complex64", "cfloat": "complex64",
    "complex128": "complex128", "cdouble": "complex128",
    "float8_e4m3fn": "ml:float8_e4m3fn",
    "float8_e5m2": "ml:float8_e5m2",
    "float8_e4m3fnuz": "ml:float8_e4m3fnuz",
    "float8_e5m2fnuz": "ml:float8_e5m2fnuz",
    "float8_e8m0fnu": "ml:float8_e8m0fnu",
}

# Typed storage class name -> torch dtype name.
_STORAGE_TYPES: dict[str, str] = {
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

# numpy dtype -> (typed storage class or None, torch dtype name) for writing. None: _rebuild_tensor_v3.
_WRITE_TYPES: dict[str, tuple[str | None, str]] = {
    "float32": ("FloatStorage", "float32"),
    "float64": ("DoubleStorage", "float64"),
    "float16": ("HalfStorage", "float16"),
    "bfloat16": ("BFloat16Storage", "bfloat16"),
    "int64": ("LongStorage", "int64"),
    "int32": ("IntStorage", "int32"),
    "int16": ("ShortStorage", "int16"),
    "int8": ("CharStorage", "int8"),
    "uint8": ("ByteStorage", "uint8"),
    "bool": ("BoolStorage", "bool"),
    "complex64": ("ComplexFloatStorage", "complex64"),
    "complex128": ("ComplexDoubleStorage", "complex128"),
    "uint16": (None, "uint16"),
    "uint32": (None, "uint32"),
    "uint64": (None, "uint64"),
    "float8_e4m3fn": (None, "float8_e4m3fn"),
    "float8_e5m2": (None, "float8_e5m2"),
    "float8_e4m3fnuz": (None, "float8_e4m3fnuz"),
    "float8_e5m2fnuz": (None, "float8_e5m2fnuz"),
    "float8_e8m0fnu": (None, "float8_e8m0fnu"),
}


def _numpy_dtype(torch_name: str) -> np.dtype | None:
    """The numpy dtype for ``torch.<torch_name>``, or None when numpy/ml_dtypes has no equivalent."""
    spec = _TORCH_DTYPES.get(torch_name)
    if spec is None:
        return None
    if spec.startswith("ml:"):
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - ml_dtypes ships with jax
            return None
        kind = getattr(ml_dtypes, spec[3:], None)
        return None if kind is None else np.dtype(kind)
    return np.dtype(spec)


# ----------------------------------------------------------------------------------------------
# messages
# ----------------------------------------------------------------------------------------------


def _oneline(text: object, limit: int = 300) -> str:
    """``text`` as one line: control characters escaped, cut to ``limit`` characters."""
    s = str(text)
    s = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], s)
    if len(s) > limit:
        s = s[: limit - 3] + "..."
    return s


def _fail(source: str, what: str) -> CheckpointError:
    return CheckpointError(_oneline(f"{source}: {what}", limit=1000))


def _describe(obj: object) -> str:
    if isinstance(obj, ModuleStub):
        return f"a module {obj.qualname}"
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        shown = ", ".join(_oneline(repr(k), 40) for k in keys[:8])
        more = f", ... ({len(keys)} keys)" if len(keys) > 8 else ""
        return f"a {type(obj).__name__} with keys [{shown}{more}]"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}" if type(obj).__module__ != "builtins" \
        else f"a {type(obj).__name__}"


# ----------------------------------------------------------------------------------------------
# module stubs
# ----------------------------------------------------------------------------------------------


class ModuleStub:
    """Stands in for a module class from a checkpoint (``models.*``, ``utils.*``, ``torch.nn.modules.*``,
    ``argparse.Namespace``); one subclass per qualified name, see :func:`stub_class`.

    ``qualname`` is the pickled class name (e.g. ``'models.common.Conv'``), ``state`` what was pickled for
    the object (for an ``nn.Module`` its ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``,
    ``_non_persistent_buffers_set``, plus plain attributes), and ``args`` any constructor arguments.
    Reading an unknown attribute looks it up like ``nn.Module`` does: in ``state``, then in
    ``_parameters``, ``_buffers`` and ``_modules`` (so ``stub.model``, ``stub.stride`` work).
    """

    __slots__ = ("state", "args")
    qualname: str = "ModuleStub"

    def __new__(cls, *args: Any, **kwargs: Any) -> ModuleStub:
        self = object.__new__(cls)
        self.state = {}
        self.args = args
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if (isinstance(state, tuple) and len(state) == 2
                and (state[0] is None or isinstance(state[0], dict)) and isinstance(state[1], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1])
            state = merged
        self.state = state

    def __getstate__(self) -> Any:  # so copy.copy / copy.deepcopy round-trip a stub
        return self.state

    def __getnewargs__(self) -> tuple:
        return self.args

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("state", "args"):
            raise AttributeError(name)
        state = self.state
        if isinstance(state, dict):
            if name in state:
                return state[name]
            for group in ("_parameters", "_buffers", "_modules"):
                members = state.get(group)
                if isinstance(members, Mapping) and name in members:
                    return members[name]
        raise AttributeError(f"{self.qualname} stub has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<ModuleStub {self.qualname}>"


_STUB_CLASSES: dict[str, type[ModuleStub]] = {}
_STUB_LOCK = threading.Lock()
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def stub_class(qualname: str) -> type[ModuleStub]:
    """The (cached) ModuleStub subclass standing in for the class ``qualname``."""
    with _STUB_LOCK:
        cls = _STUB_CLASSES.get(qualname)
        if cls is None:
            short = qualname.rpartition(".")[2]
            cls = type(short, (ModuleStub,), {
                "__slots__": (),
                "qualname": qualname,
                "__module__": __name__,
                "__qualname__": f"ModuleStub[{qualname}]",
                "__doc__": f"Stub for {qualname} read from a checkpoint.",
            })
            _STUB_CLASSES[qualname] = cls
        return cls


def _is_module_class(module: str) -> bool:
    return (module in ("models", "utils") or module.startswith(("models.", "utils.", "torch.nn.modules."))
            or module == "argparse")


# ----------------------------------------------------------------------------------------------
# objects the unpickler hands out in place of real globals
# ----------------------------------------------------------------------------------------------


class _Frozen:
    """Base of the objects find_class returns: no __dict__, no attribute assignment, so a pickle's
    BUILD opcode cannot alter them."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __reduce__(self):  # never pickle these out again
        raise TypeError(f"{type(self).__name__} cannot be pickled")


class _Marker(_Frozen):
    """A non-callable stand-in for a global that is data, not code (storage types, torch.Tensor ...)."""

    __slots__ = ("kind", "name", "value")

    def __init__(self, kind: str, name: str, value: Any = None) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "value", value)

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>"


class _SafeCallable(_Frozen):
    """A callable global re-implemented here; ``name`` is the global it replaces."""

    __slots__ = ("fn", "name")

    def __init__(self, name: str, fn: Any) -> None:
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<safe {self.name}>"


_OBJECT = _Marker("builtin", "builtins.object")
_NDARRAY = _Marker("numpy", "numpy.ndarray")
_TENSOR_TYPES = {
    "torch.Tensor": _Marker("tensor type", "torch.Tensor"),
    "torch.nn.parameter.Parameter": _Marker("tensor type", "torch.nn.parameter.Parameter"),
}


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global as pickle's own find_class would resolve it (protocol < 3 pickles
    written with fix_imports name ``__builtin__.set``, ``copy_reg._reconstructor``, ``commands.Popen`` ...)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name

_NUMPY_DTYPE_SPEC = re.compile(r"[<>|=]?(b1|\?|[iu][1248]|f[248]|c(8|16))\Z")


class _NumpyDType:
    """What ``numpy.dtype('f8', False, True)`` + BUILD becomes; turned into an ``np.dtype`` afterwards."""

    __slots__ = ("spec", "byteorder")

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")
                and all(x is None for x in state[2:5])):
            raise ValueError("unsupported numpy dtype state")
        self.byteorder = state[1]

    def to_numpy(self) -> np.dtype:
        dt = np.dtype(self.spec)
        if self.byteorder in ("<", ">") and dt.itemsize > 1:
            dt = dt.newbyteorder(self.byteorder)
        return dt


class _NumpyArrayBuilder:
    """What ``numpy.core.multiarray._reconstruct(ndarray, ...)`` + BUILD becomes; see _finalize."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise ValueError("unsupported numpy array state")
        _version, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _NumpyDType):
            raise ValueError("numpy array state without a plain numeric dtype")
        if not (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)):
            raise ValueError("bad numpy array shape")
        if not isinstance(raw, (bytes, bytearray)):
            raise ValueError("numpy array holds Python objects")
        dt = dtype.to_numpy()
        count = math.prod(shape)
        if len(raw) != count * dt.itemsize:
            raise ValueError(f"numpy array data has {len(raw)} bytes, its shape {shape} needs "
                             f"{count * dt.itemsize}")
        arr = np.frombuffer(bytes(raw), dtype=dt, count=count).reshape(shape, order="F" if fortran else "C")
        self.array = np.array(arr, dtype=dt.newbyteorder("="), order="C")


# ----------------------------------------------------------------------------------------------
# the restricted unpickler
# ----------------------------------------------------------------------------------------------


class _Storage:
    """One storage as the pickle sees it: the record's bytes, of which the first ``nbytes`` are used."""

    __slots__ = ("key", "dtype", "data", "nbytes")

    def __init__(self, key: str, dtype: np.dtype, data: bytes, nbytes: int) -> None:
        self.key = key
        self.dtype = dtype
        self.data = data
        self.nbytes = nbytes


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch archive, allowing only the globals in :meth:`_allowed`."""

    def __init__(self, file: io.BytesIO, *, source: str, zf: zipfile.ZipFile | None = None,
                 prefix: str = "", big_endian: bool = False) -> None:
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._zf = zf
        self._prefix = prefix
        self._big_endian = big_endian
        self._raw: dict[str, bytes] = {}
        self.needs_finalize = False
        self._table = self._allowed()
        self._tensor_rebuilders = (self._table[("torch._utils", "_rebuild_tensor_v2")],
                                   self._table[("torch._utils", "_rebuild_tensor_v3")],
                                   self._table[("torch._utils", "_rebuild_parameter")],
                                   self._table[("torch._utils", "_rebuild_parameter_with_state")])

    # -- globals ---------------------------------------------------------------------------------

    def _allowed(self) -> dict[tuple[str, str], Any]:
        safe = _SafeCallable
        table: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("builtins", "slice"): slice,
            ("builtins", "complex"): complex,
            ("builtins", "object"): _OBJECT,
            ("builtins", "bytes"): safe("builtins.bytes", _safe_bytes),
            ("builtins", "bytearray"): safe("builtins.bytearray", lambda *a: bytearray(_safe_bytes(*a))),
            ("_codecs", "encode"): safe("_codecs.encode", _codecs_encode),
            ("copyreg", "_reconstructor"): safe("copyreg._reconstructor", _reconstructor),
            ("torch", "Size"): safe("torch.Size", _torch_size),
            ("torch", "device"): safe("torch.device", _torch_device),
            ("torch", "Tensor"): _TENSOR_TYPES["torch.Tensor"],
            ("torch.nn.parameter", "Parameter"): _TENSOR_TYPES["torch.nn.parameter.Parameter"],
            ("torch._utils", "_rebuild_tensor_v2"): safe("torch._utils._rebuild_tensor_v2", self._rebuild_v2),
            ("torch._utils", "_rebuild_tensor_v3"): safe("torch._utils._rebuild_tensor_v3", self._rebuild_v3),
            ("torch._utils", "_rebuild_parameter"): safe("torch._utils._rebuild_parameter", self._rebuild_param),
            ("torch._utils", "_rebuild_parameter_with_state"):
                safe("torch._utils._rebuild_parameter_with_state", self._rebuild_param),
            ("torch._tensor", "_rebuild_from_type_v2"):
                safe("torch._tensor._rebuild_from_type_v2", self._rebuild_from_type_v2),
            ("torch.storage", "UntypedStorage"): _Marker("storage type", "torch.storage.UntypedStorage", None),
            ("torch", "UntypedStorage"): _Marker("storage type", "torch.UntypedStorage", None),
            ("pathlib", "PosixPath"): safe("pathlib.PosixPath", _posix_path),
            ("pathlib", "PurePosixPath"): safe("pathlib.PurePosixPath", _posix_path),
            ("pathlib", "WindowsPath"): safe("pathlib.WindowsPath", _windows_path),
            ("pathlib", "PureWindowsPath"): safe("pathlib.PureWindowsPath", _windows_path),
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): safe("numpy.dtype", self._numpy_dtype),
        }
        for storage, torch_name in _STORAGE_TYPES.items():
            table[("torch", storage)] = _Marker("storage type", f"torch.{storage}", torch_name)
            table[("torch.cuda", storage)] = _Marker("storage type", f"torch.cuda.{storage}", torch_name)
        for torch_name in _TORCH_DTYPES:
            table[("torch", torch_name)] = f"torch.{torch_name}"
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            table[(mod, "_reconstruct")] = safe(f"{mod}._reconstruct", self._numpy_reconstruct)
            table[(mod, "scalar")] = safe(f"{mod}.scalar", _numpy_scalar)
        return table

    def find_class(self, module: str, name: str) -> Any:
        if isinstance(module, str) and isinstance(name, str):
            module, name = _python3_name(module, name)
        found = self._table.get((module, name))
        if found is not None:
            return found
        if (isinstance(module, str) and isinstance(name, str) and _DOTTED_NAME.match(module)
                and _DOTTED_NAME.match(name) and _is_module_class(module)
                and (module != "argparse" or name == "Namespace")):
            return stub_class(f"{module}.{name}")
        raise _fail(self._source, f"refusing to load: the pickle asks for {_oneline(module, 120)}."
                                  f"{_oneline(name, 120)}, which is not a tensor, module or plain container")

    # -- storages ----------------------------------------------------------------------------------

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _fail(self._source, f"data.pkl has an unknown persistent id {_oneline(repr(pid), 80)}")
        _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, _Marker) and storage_type.kind == "storage type"):
            raise _fail(self._source, f"data.pkl names a storage of unknown type {_oneline(repr(storage_type), 80)}")
        if not (isinstance(key, str) and type(numel) is int and numel >= 0):
            raise _fail(self._source, f"data.pkl has a malformed storage id {_oneline(repr(pid), 120)}")
        if storage_type.value is None:  # untyped: numel counts bytes
            dtype = np.dtype(np.uint8)
        else:
            dtype = _numpy_dtype(storage_type.value)
            if dtype is None:
                raise _fail(self._source, f"storage type {storage_type.name} has no numpy equivalent")
        nbytes = numel * dtype.itemsize
        data = self._raw.get(key)
        if data is None or len(data) < nbytes:  # several tensors may share one storage record
            data = self._read_storage(key, nbytes)
            self._raw[key] = data
        return _Storage(key, dtype, data, nbytes)

    def _read_storage(self, key: str, nbytes: int) -> bytes:
        record = f"{self._prefix}/data/{key}"
        if self._zf is None:
            raise _fail(self._source, f"the pickle refers to storage '{_oneline(key, 60)}' but there is no archive")
        try:
            info = self._zf.getinfo(record)
        except KeyError:
            raise _fail(self._source, f"storage record '{_oneline(record, 120)}' is missing from the archive") from None
        if info.file_size < nbytes:
            raise _fail(self._source, f"storage record '{_oneline(record, 120)}' holds {info.file_size} bytes "
                                      f"but the tensor needs {nbytes}")
        try:
            with self._zf.open(info) as fh:
                data = fh.read(nbytes)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise _fail(self._source, f"storage record '{_oneline(record, 120)}' is unreadable: "
                                      f"{type(exc).__name__}: {_oneline(exc, 160)}") from None
        if len(data) < nbytes:
            raise _fail(self._source, f"storage record '{_oneline(record, 120)}' is truncated: "
                                      f"{len(data)} of {nbytes} bytes")
        return data

    # -- tensors -----------------------------------------------------------------------------------

    def _make_array(self, storage: Any, dtype: np.dtype, offset: Any, size: Any, stride: Any) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise _fail(self._source, f"a tensor is built from {_oneline(repr(storage), 60)}, not a storage")
        size_t = tuple(size) if isinstance(size, (tuple, list)) else None
        stride_t = tuple(stride) if isinstance(stride, (tuple, list)) else None
        if (size_t is None or stride_t is None or len(size_t) != len(stride_t) or type(offset) is not int
                or offset < 0 or not all(type(v) is int and v >= 0 for v in size_t + stride_t)):
            raise _fail(self._source, f"tensor on storage '{_oneline(storage.key, 60)}' has a malformed "
                                      f"offset/size/stride {_oneline((offset, size, stride), 120)}")
        itemsize = dtype.itemsize
        available = storage.nbytes // itemsize
        numel = 1
        for s in size_t:
            numel *= s
        if numel == 0:
            return np.zeros(size_t, dtype=dtype)
        last = offset + sum((s - 1) * st for s, st in zip(size_t, stride_t))
        if last >= available:
            raise _fail(self._source, f"tensor of size {list(size_t)} on storage '{_oneline(storage.key, 60)}' "
                                      f"needs {last + 1} elements but the storage holds {available}")
        flat = np.frombuffer(storage.data, dtype=dtype, count=available)
        view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size_t,
                                               strides=tuple(st * itemsize for st in stride_t),
                                               writeable=False)
        arr = np.array(view, dtype=dtype, order="C", copy=True)
        if self._big_endian and itemsize > 1:
            arr.byteswap(inplace=True)
        return arr

    def _rebuild_v2(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                    requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
        dtype = storage.dtype if isinstance(storage, _Storage) else None
        return self._make_array(storage, dtype, storage_offset, size, stride)

    def _rebuild_v3(self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                    backward_hooks: Any, dtype: Any, metadata: Any = None) -> np.ndarray:
        np_dtype = _numpy_dtype(dtype[6:]) if isinstance(dtype, str) and dtype.startswith("torch.") else None
        if np_dtype is None:
            raise _fail(self._source, f"tensor dtype {_oneline(repr(dtype), 60)} is not supported")
        return self._make_array(storage, np_dtype, storage_offset, size, stride)

    def _rebuild_param(self, data: Any, requires_grad: Any = True, backward_hooks: Any = None,
                       state: Any = None) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise _fail(self._source, f"a parameter is built from {_oneline(type(data).__name__, 60)}, not a tensor")
        return data

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> np.ndarray:
        if not (any(func is f for f in self._tensor_rebuilders) and isinstance(new_type, _Marker)
                and new_type.kind == "tensor type" and isinstance(args, tuple)):
            raise _fail(self._source, "torch._tensor._rebuild_from_type_v2 is used on something that is not "
                                      "a plain tensor")
        return func(*args)

    # -- numpy -------------------------------------------------------------------------------------

    def _numpy_dtype(self, spec: Any, align: Any = False, copy: Any = True) -> _NumpyDType:
        if not (isinstance(spec, str) and _NUMPY_DTYPE_SPEC.match(spec)):
            raise _fail(self._source, f"numpy dtype {_oneline(repr(spec), 40)} is not a plain numeric dtype")
        self.needs_finalize = True
        return _NumpyDType(spec)

    def _numpy_reconstruct(self, cls: Any, shape: Any = (0,), typecode: Any = b"b") -> _NumpyArrayBuilder:
        if cls is not _NDARRAY:
            raise _fail(self._source, "numpy _reconstruct is asked for something other than numpy.ndarray")
        self.needs_finalize = True
        return _NumpyArrayBuilder()


def _safe_bytes(*args: Any) -> bytes:
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    if len(args) == 1 and isinstance(args[0], list) and all(type(b) is int and 0 <= b < 256 for b in args[0]):
        return bytes(args[0])
    raise ValueError("unsupported bytes() arguments")


def _codecs_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1", "utf-8", "utf8", "ascii")
            and errors == "strict"):
        raise ValueError("unsupported _codecs.encode arguments")
    return text.encode(encoding)


def _reconstructor(cls: Any, base: Any, state: Any) -> ModuleStub:
    if not (isinstance(cls, type) and issubclass(cls, ModuleStub) and base is _OBJECT and state is None):
        raise ValueError("copyreg._reconstructor is only allowed for module classes")
    return cls.__new__(cls)


def _torch_size(dims: Any = ()) -> tuple:
    dims = tuple(dims)
    if not all(type(d) is int for d in dims):
        raise ValueError("torch.Size of non-integers")
    return dims


def _torch_device(kind: Any, index: Any = None) -> str:
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise ValueError("bad torch.device arguments")
    return kind if index is None else f"{kind}:{index}"


def _check_parts(parts: tuple) -> tuple:
    if not all(isinstance(p, str) for p in parts):
        raise ValueError("path parts must be strings")
    return parts


def _posix_path(*parts: Any) -> str:
    return str(pathlib.PurePosixPath(*_check_parts(parts)))


def _windows_path(*parts: Any) -> str:
    return str(pathlib.PureWindowsPath(*_check_parts(parts)))


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, bytearray)):
        raise ValueError("numpy scalar of a non-numeric dtype")
    dt = dtype.to_numpy()
    if len(data) != dt.itemsize:
        raise ValueError("numpy scalar data has the wrong size")
    return np.frombuffer(bytes(data), dtype=dt).astype(dt.newbyteorder("="))[0]


def _finalize(obj: Any) -> Any:
    """Replace numpy builders (``_NumpyArrayBuilder``, ``_NumpyDType``) by real numpy objects, in place
    where the container is mutable."""
    done: dict[int, Any] = {}

    def fix(x: Any) -> Any:
        if isinstance(x, _NumpyArrayBuilder):
            if x.array is None:
                raise ValueError("numpy array without data")
            return x.array
        if isinstance(x, _NumpyDType):
            return x.to_numpy()
        if not isinstance(x, (dict, list, tuple, set, frozenset, ModuleStub)):
            return x
        key = id(x)
        if key in done:
            return done[key]
        done[key] = x
        if isinstance(x, dict):
            items = [(fix(k), fix(v)) for k, v in x.items()]
            x.clear()
            x.update(items)
            if isinstance(getattr(x, "__dict__", None), dict):
                for k, v in list(x.__dict__.items()):
                    x.__dict__[k] = fix(v)
            return x
        if isinstance(x, list):
            x[:] = [fix(v) for v in x]
            return x
        if isinstance(x, ModuleStub):
            x.state = fix(x.state)
            x.args = fix(x.args)
            return x
        new = type(x)(fix(v) for v in x) if not isinstance(x, tuple) else tuple(fix(v) for v in x)
        done[key] = new
        return new

    return fix(obj)


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------

# Legacy (pre-1.6) torch.save starts with a pickle of this magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_MAGIC_BYTES = _LEGACY_MAGIC.to_bytes(10, "little")
_LEGACY_MAGIC_TEXT = str(_LEGACY_MAGIC).encode()


def _classify_non_zip(source: str, head: bytes, exc: Exception) -> CheckpointError:
    if head.startswith(b"PK"):
        return _fail(source, f"the zip archive is truncated or corrupt ({_oneline(exc, 120)})")
    if _LEGACY_MAGIC_BYTES in head[:32] or _LEGACY_MAGIC_TEXT in head[:48]:
        return _fail(source, "legacy torch serialization is not supported; re-save it with torch >= 1.6")
    if head[:1] == b"\x80":
        return _fail(source, "is a bare pickle, not a PyTorch zip checkpoint; refusing to unpickle it")
    return _fail(source, "not a PyTorch zip checkpoint (not a zip archive)")


def read_torch_file(path: str | os.PathLike) -> Any:
    """Unpickle a torch zip-format ``.pt`` file without torch and without running code from it.

    Tensors and parameters come back as C-contiguous numpy arrays of the stored dtype (bfloat16 and
    float8 as ``ml_dtypes`` types); module objects (``models.*``, ``utils.*``, ``torch.nn.modules.*``) as
    :class:`ModuleStub` instances; ``torch.Size`` as tuple, ``torch.device`` and torch dtypes as str,
    paths as str. Any other global in the pickle is refused. Every failure is a one-line
    :class:`~jaxyolo.errors.CheckpointError` naming the file.
    """
    source = str(path)
    try:
        fh = open(os.fspath(path), "rb")
    except FileNotFoundError:
        raise _fail(source, "no such file") from None
    except IsADirectoryError:
        raise _fail(source, "is a directory, not a checkpoint file") from None
    except OSError as exc:
        raise _fail(source, f"cannot open: {exc.strerror or exc}") from None
    with fh:
        try:
            head = fh.read(64)
            fh.seek(0)
        except OSError as exc:
            raise _fail(source, f"cannot read: {exc.strerror or exc}") from None
        if not head:
            raise _fail(source, "is empty, not a PyTorch checkpoint")
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error,
                NotImplementedError) as exc:
            raise _classify_non_zip(source, head, exc) from None
        with zf:
            try:
                return _load_archive(zf, source)
            except CheckpointError as exc:
                raise CheckpointError(str(exc)) from None
            except RecursionError:
                raise _fail(source, "data.pkl is nested too deeply") from None
            except MemoryError:
                raise _fail(source, "data.pkl asks for more memory than is available") from None
            except Exception as exc:  # noqa: BLE001 - any failure inside the pickle is a bad file
                raise _fail(source, f"data.pkl is not a valid checkpoint pickle: "
                                    f"{type(exc).__name__}: {_oneline(exc, 200)}") from None


def _read_record(zf: zipfile.ZipFile, name: str, source: str) -> bytes:
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
            struct.error) as exc:
        raise _fail(source, f"record '{_oneline(name, 120)}' is unreadable: "
                            f"{type(exc).__name__}: {_oneline(exc, 160)}") from None


def _load_archive(zf: zipfile.ZipFile, source: str) -> Any:
    names = zf.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pickles:
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise _fail(source, "is a TorchScript archive (torch.jit.save), not a torch.save checkpoint")
        raise _fail(source, "the zip archive has no <archive>/data.pkl record; not a PyTorch checkpoint")
    if len(pickles) > 1:
        raise _fail(source, f"the zip archive has several data.pkl records ({', '.join(pickles[:4])})")
    prefix = pickles[0][: -len("/data.pkl")]
    if f"{prefix}/constants.pkl" in names:
        raise _fail(source, "is a TorchScript archive (torch.jit.save), not a torch.save checkpoint")
    big_endian = False
    if f"{prefix}/byteorder" in names:
        order = _read_record(zf, f"{prefix}/byteorder", source).strip()
        if order == b"big":
            big_endian = True
        elif order != b"little":
            raise _fail(source, f"unknown byteorder {_oneline(order[:20], 40)} in the archive")
    data = _read_record(zf, pickles[0], source)
    unpickler = _RestrictedUnpickler(io.BytesIO(data), source=source, zf=zf, prefix=prefix,
                                     big_endian=big_endian)
    obj = unpickler.load()
    if unpickler.needs_finalize:
        obj = _finalize(obj)
    return obj


# ----------------------------------------------------------------------------------------------
# state_dict extraction
# ----------------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


def _module_state_dict(root: ModuleStub, source: str, where: str) -> dict[str, np.ndarray]:
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    active: set[int] = set()

    def visit(module: ModuleStub, prefix: str) -> None:
        here = f"{where}{'.' + prefix[:-1] if prefix else ''} ({module.qualname})"
        if id(module) in active:
            raise _fail(source, f"the module tree loops back on itself at {here}")
        active.add(id(module))
        state = module.state
        groups = [state.get(g) if isinstance(state, dict) else None
                  for g in ("_parameters", "_buffers", "_modules")]
        if not all(isinstance(g, Mapping) for g in groups):
            raise _fail(source, f"{here} is not a torch nn.Module: its pickled state has no "
                                f"_parameters/_buffers/_modules")
        params, buffers, modules = groups
        non_persistent = state.get("_non_persistent_buffers_set") or ()
        for kind, members in (("parameter", params), ("buffer", buffers)):
            for name, value in members.items():
                if value is None or (kind == "buffer" and name in non_persistent):
                    continue
                if not isinstance(value, np.ndarray):
                    raise _fail(source, f"{kind} '{prefix}{name}' of {here} is a {type(value).__name__}, "
                                        f"not a tensor")
                out[f"{prefix}{name}"] = value
        for name, child in modules.items():
            if child is None:
                continue
            if not isinstance(child, ModuleStub):
                raise _fail(source, f"submodule '{prefix}{name}' of {here} is a {type(child).__name__}, "
                                    f"not a module")
            visit(child, f"{prefix}{name}.")
        active.discard(id(module))

    try:
        visit(root, "")
    except RecursionError:
        raise _fail(source, f"the module tree under {where} is nested too deeply") from None
    return out


def extract_state_dict(obj: Any, *, source: str = "<file>", prefer_ema: bool = False) -> dict[str, np.ndarray]:
    """The flat state_dict (key -> numpy array, in PyTorch registration order) of what
    :func:`read_torch_file` returned.

    Accepts a state_dict (a non-empty mapping of str -> array; returned as is), a module stub, or a
    checkpoint dict holding one under ``'model'`` (a module or a state_dict), ``'ema'`` (used when
    ``'model'`` is None, or whenever it is a module if ``prefer_ema``, as the reference repositories'
    loaders do) or ``'state_dict'``. Modules follow ``nn.Module.state_dict``: own non-None parameters,
    then persistent non-None buffers, then children recursively, keys joined by '.'.
    """
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, ModuleStub):
        return _module_state_dict(obj, source, "the saved module")
    if isinstance(obj, Mapping):
        model = obj.get("model")
        ema = obj.get("ema")
        if isinstance(ema, ModuleStub) and (model is None or prefer_ema):
            return _module_state_dict(ema, source, "'ema'")
        for key in ("model", "state_dict"):
            value = obj.get(key)
            if value is None:
                continue
            if isinstance(value, ModuleStub):
                return _module_state_dict(value, source, f"'{key}'")
            if _is_state_dict(value):
                return value
            raise _fail(source, f"checkpoint entry '{key}' holds {_describe(value)}, not a module or a state_dict")
    if isinstance(obj, Mapping) and len(obj) == 0:
        raise _fail(source, "holds an empty dict, no model weights")
    raise _fail(source, f"no model weights found: expected a state_dict or a checkpoint dict with 'model', "
                        f"'ema' or 'state_dict', got {_describe(obj)}")


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


class _PickleWriter:
    """Emits the protocol-2 opcodes torch.save uses for a state_dict (so no torch import is needed)."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self._memo: dict[tuple[str, str], int] = {}

    def put(self) -> int:
        index = len(self._memo)
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)
        return index

    def global_(self, module: str, name: str) -> None:
        index = self._memo.get((module, name))
        if index is not None:
            self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
            return
        self.out += b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n"
        self._memo[(module, name)] = self.put()

    def int_(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2 ** 31) <= value < 2 ** 31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            n = (value.bit_length() + 8) // 8
            self.out += b"\x8a" + bytes([n]) + value.to_bytes(n, "little", signed=True)

    def str_(self, value: str) -> None:
        data = value.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(data)) + data

    def int_tuple(self, values: tuple[int, ...]) -> None:
        if not values:
            self.out += b")"
            return
        if len(values) > 3:
            self.out += b"("
        for v in values:
            self.int_(v)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(values), b"t")

    def empty_ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _state_dict_pickle(entries: list[tuple[str, np.ndarray, str | None, str]]) -> bytes:
    w = _PickleWriter()
    w.empty_ordered_dict()
    if entries:
        w.out += b"("
        for index, (key, arr, storage, torch_dtype) in enumerate(entries):
            w.str_(key)
            w.global_("torch._utils", "_rebuild_tensor_v2" if storage else "_rebuild_tensor_v3")
            w.out += b"("  # args
            w.out += b"("  # persistent id
            w.str_("storage")
            if storage:
                w.global_("torch", storage)
            else:
                w.global_("torch.storage", "UntypedStorage")
            w.str_(str(index))
            w.str_("cpu")
            w.int_(arr.size if storage else arr.nbytes)
            w.out += b"tQ"
            w.int_(0)
            w.int_tuple(arr.shape)
            w.int_tuple(_contiguous_strides(arr.shape))
            w.out += b"\x89"  # requires_grad=False
            w.empty_ordered_dict()
            if not storage:
                w.global_("torch", torch_dtype)
            w.out += b"tR"
        w.out += b"u"
    w.out += b"."
    return bytes(w.out)


def _zip_records(fh: Any, records: list[tuple[str, Any]]) -> None:
    """Write ``records`` (name, bytes-like) as a ZIP_STORED archive with every record's data aligned to
    64 bytes by padding the local header's extra field, as torch's writer does."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, data in records:
            view = memoryview(data).cast("B")
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.file_size = view.nbytes
            info.CRC = info.compress_size = 0  # only the header's length matters here
            zip64 = view.nbytes * 1.05 > zipfile.ZIP64_LIMIT  # the rule zipfile uses when opening to write
            header = len(info.FileHeader(zip64))
            pad = (-(fh.tell() + header + 4)) % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # id "FB", like torch
            with zf.open(info, "w", force_zip64=zip64) as out:
                out.write(view)


def write_state_dict(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` (key -> array) as a torch zip checkpoint holding an OrderedDict of tensors, loadable
    with ``torch.load(path, weights_only=True)`` and :func:`read_torch_file`. The file is written to a
    temporary file in the same folder and moved into place, so readers never see half a file."""
    target = os.fspath(path)
    source = str(path)
    if not isinstance(state, Mapping):
        raise _fail(source, f"cannot write {type(state).__name__}: expected a mapping of name -> array")
    entries: list[tuple[str, np.ndarray, str | None, str]] = []
    for key, value in state.items():
        if not isinstance(key, str):
            raise _fail(source, f"state_dict key {_oneline(repr(key), 60)} is not a string")
        arr = np.asarray(value)
        kind = _WRITE_TYPES.get(arr.dtype.name)
        if kind is None:
            raise _fail(source, f"'{key}' has dtype {arr.dtype}, which a torch checkpoint cannot hold")
        if arr.dtype.byteorder not in ("=", "|") and arr.dtype.itemsize > 1:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if not arr.flags.c_contiguous:
            arr = np.array(arr, order="C")
        if sys.byteorder == "big" and arr.dtype.itemsize > 1:  # pragma: no cover - little-endian hosts
            arr = arr.byteswap()
        entries.append((key, arr, kind[0], kind[1]))

    records: list[tuple[str, Any]] = [
        ("archive/data.pkl", _state_dict_pickle(entries)),
        ("archive/.format_version", b"1"),
        ("archive/.storage_alignment", b"64"),
        ("archive/byteorder", b"little"),
    ]
    for index, (_key, arr, _storage, _dtype) in enumerate(entries):
        records.append((f"archive/data/{index}", arr.reshape(-1).view(np.uint8)))
    records.append(("archive/version", b"3\n"))

    folder = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, flags, 0o666)
    except OSError as exc:
        raise _fail(source, f"cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            _zip_records(fh, records)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _fail(source, f"cannot write: {exc.strerror or exc}") from None
        raise

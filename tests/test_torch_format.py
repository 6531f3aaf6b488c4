"""Tests for jaxyolo.export.torch_format: torch-free reading/writing of .pt checkpoints.

Truths used: the arrays we wrote; torch itself (torch.save / torch.load, where torch is installed); numpy's
own pickling; a fake `models` package saved by torch in a subprocess like the official releases; and
side effects (files) a hostile pickle would create if any of its code ran.
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import pathlib
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
import zipfile

import ml_dtypes
import numpy as np
import pytest

from jaxyolo.errors import CheckpointError
from jaxyolo.export import torch_format as tf
from jaxyolo.export.torch_format import (
    ModuleStub,
    extract_state_dict,
    read_torch_file,
    write_state_dict,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (NaNs included) of dtype, shape and contents."""
    a = np.asarray(a)
    b = np.asarray(b)
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


def _write_zip(path, records, prefix="archive"):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            zf.writestr(f"{prefix}/{name}" if prefix else name, data)
    return path


def _zip_with_pickle(path, payload: bytes, **records):
    return _write_zip(path, {"data.pkl": payload, **records})


def _error(path, exc_type=CheckpointError) -> str:
    with pytest.raises(exc_type) as info:
        read_torch_file(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def _frag(obj) -> bytes:
    """Opcodes that push ``obj`` (a pickle without its PROTO header and STOP)."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor_ops(storage_type="FloatStorage", key="0", numel=4, offset=0, size=(2, 2), stride=(2, 1)) -> bytes:
    """Opcodes pushing a tensor exactly as torch.save writes one (_rebuild_tensor_v2 + persistent id)."""
    return (_global("torch._utils", "_rebuild_tensor_v2") + b"((" + _frag("storage")
            + _global("torch", storage_type) + _frag(key) + _frag("cpu") + _frag(numel) + b"tQ"
            + _frag(offset) + _frag(tuple(size)) + _frag(tuple(stride)) + b"\x89"
            + _global("collections", "OrderedDict") + b")Rt" + b"R")


def _ordered_dict_ops(items: dict[str, bytes]) -> bytes:
    out = b"\x80\x02" + _global("collections", "OrderedDict") + b")R("
    for key, ops in items.items():
        out += _frag(key) + ops
    return out + b"u."


SAMPLE_STATE = collections.OrderedDict([
    ("conv.weight", np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)),
    ("conv.half", np.random.default_rng(1).standard_normal((5, 2)).astype(np.float16)),
    ("bn.num_batches_tracked", np.array(123456789012, dtype=np.int64)),
    ("mask", np.array([[True, False, True], [False, False, True]])),
    ("strided", np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]),
    ("fortran", np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))),
    ("bf16", np.array([1.5, -2.0, 3.25, np.inf], dtype=ml_dtypes.bfloat16)),
    ("nan", np.array([np.nan, -0.0, 1e-45], dtype=np.float32)),
    ("empty", np.zeros((0, 3), dtype=np.float32)),
    ("bytes", np.arange(7, dtype=np.uint8)),
    ("ints", np.array([-(2 ** 31), 2 ** 31 - 1], dtype=np.int32)),
    ("int8", np.array([-128, 127], dtype=np.int8)),
    ("int16", np.array([-3, 300], dtype=np.int16)),
    ("cplx", np.array([1 + 2j, -3.5j], dtype=np.complex64)),
    ("u16", np.array([0, 65535, 7], dtype=np.uint16)),
])


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "weights.pt"
    write_state_dict(path, SAMPLE_STATE)
    return path


# ------------------------------------------------------------------------------------------------
# 1. write_state_dict -> read_torch_file round trip (no torch needed)
# ------------------------------------------------------------------------------------------------


def test_round_trip_is_exact(written):
    back = read_torch_file(written)
    assert isinstance(back, collections.OrderedDict)
    assert list(back) == list(SAMPLE_STATE)
    for key, want in SAMPLE_STATE.items():
        got = back[key]
        assert isinstance(got, np.ndarray), key
        assert _same(got, want), key
        assert got.flags.c_contiguous and got.flags.writeable, key
    assert back["bn.num_batches_tracked"].shape == ()
    assert extract_state_dict(back) is back


def test_written_archive_layout(written):
    raw = written.read_bytes()
    with zipfile.ZipFile(written) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names[0] == "archive/data.pkl"
        assert zf.read("archive/version") == b"3\n"
        assert zf.read("archive/byteorder") == b"little"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        data_records = [i for i in infos if i.filename.startswith("archive/data/")]
        assert [i.filename for i in data_records] == [f"archive/data/{k}" for k in range(len(SAMPLE_STATE))]
        for info, arr in zip(data_records, SAMPLE_STATE.values()):
            # where the data starts, from the local file header itself
            sig, = struct.unpack_from("<I", raw, info.header_offset)
            assert sig == 0x04034B50
            name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            assert start % 64 == 0, info.filename
            assert raw[start:start + info.file_size] == np.ascontiguousarray(arr).tobytes()
        pkl = zf.read("archive/data.pkl")
    globals_used = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    assert globals_used == {
        "collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3",
        "torch FloatStorage", "torch HalfStorage", "torch LongStorage", "torch BoolStorage",
        "torch DoubleStorage", "torch BFloat16Storage", "torch ByteStorage", "torch IntStorage",
        "torch CharStorage", "torch ShortStorage", "torch ComplexFloatStorage",
        "torch.storage UntypedStorage", "torch uint16",
    }


def test_write_accepts_scalars_and_empty_state(tmp_path):
    path = tmp_path / "s.pt"
    write_state_dict(path, {"a": np.float32(2.5), "b": 3, "c": [[1.0, 2.0]]})
    back = read_torch_file(path)
    assert _same(back["a"], np.array(2.5, dtype=np.float32))
    assert _same(back["b"], np.array(3))
    assert _same(back["c"], np.array([[1.0, 2.0]]))
    write_state_dict(path, {})
    assert read_torch_file(path) == collections.OrderedDict()


def test_write_rejects_bad_input_and_keeps_old_file(tmp_path):
    path = tmp_path / "w.pt"
    write_state_dict(path, {"a": np.ones(2, np.float32)})
    before = path.read_bytes()
    for bad in ({"obj": np.array([object()])}, {"s": np.array(["x"])}, {1: np.ones(1)}, [("a", np.ones(1))]):
        with pytest.raises(CheckpointError) as info:
            write_state_dict(path, bad)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_write_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    write_state_dict(path, {"a": np.ones(2, np.float32)})
    before = path.read_bytes()

    def broken(fh, records):
        fh.write(b"PK\x03\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf, "_zip_records", broken)
    with pytest.raises(CheckpointError) as info:
        write_state_dict(path, {"b": np.zeros(3, np.float32)})
    assert "No space left" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
    with pytest.raises(CheckpointError, match="cannot write"):
        write_state_dict(tmp_path / "missing-dir" / "x.pt", {"a": np.ones(1)})


def test_big_endian_archive_is_swapped_to_native(tmp_path, written):
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(written) as src, zipfile.ZipFile(big, "w") as dst:
        arrays = iter(SAMPLE_STATE.values())
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "archive/byteorder":
                data = b"big"
            elif info.filename.startswith("archive/data/"):
                data = np.ascontiguousarray(next(arrays)).byteswap().tobytes()
            dst.writestr(info.filename, data)
    back = read_torch_file(big)
    for key, want in SAMPLE_STATE.items():
        assert _same(back[key], want), key
        assert back[key].dtype.isnative


def test_views_sharing_one_storage(tmp_path):
    storage = np.arange(12, dtype=np.float32)
    pkl = _ordered_dict_ops({
        "whole": _tensor_ops(numel=12, size=(3, 4), stride=(4, 1)),
        "col": _tensor_ops(numel=12, offset=1, size=(3,), stride=(4,)),
        "transposed": _tensor_ops(numel=12, offset=0, size=(4, 3), stride=(1, 4)),
        "tail": _tensor_ops(numel=12, offset=10, size=(2,), stride=(1,)),
        "broadcast": _tensor_ops(numel=12, offset=5, size=(2, 3), stride=(0, 1)),
        "scalar": _tensor_ops(numel=12, offset=7, size=(), stride=()),
    })
    path = _zip_with_pickle(tmp_path / "views.pt", pkl, **{"data/0": storage.tobytes()})
    back = read_torch_file(path)
    m = storage.reshape(3, 4)
    assert _same(back["whole"], m)
    assert _same(back["col"], m[:, 1])
    assert _same(back["transposed"], m.T)
    assert _same(back["tail"], storage[10:])
    assert _same(back["broadcast"], np.broadcast_to(storage[5:8], (2, 3)))
    assert _same(back["scalar"], np.array(7, dtype=np.float32))
    back["whole"][0, 0] = 99  # copies, not views of each other
    assert back["transposed"][0, 0] == 0


def test_numpy_and_plain_objects_in_checkpoint(tmp_path):
    ns = argparse.Namespace(weights="yolov7.pt", img_size=[640, 640], rect=False)
    ckpt = {
        "best_fitness": np.float64(0.625),
        "epoch_np": np.int64(-1),
        "hist": np.array([[1, 2, 3], [4, 5, 6]], dtype=">i4"),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "flag": np.bool_(True),
        "dt": np.dtype("float16"),
        "path": pathlib.PurePosixPath("/runs/train/exp/weights/best.pt"),
        "opt": ns,
        "set": {1, 2}, "frozen": frozenset({"a"}), "slice": slice(1, 5, 2), "complex": 1 + 2j,
        "raw": b"\x00\xffbytes", "empty_raw": b"", "buf": bytearray(b"ab"),
        "od": collections.OrderedDict(a=1, b=[None, 2.5, "s"]),
    }
    for protocol in (0, 1, 2, 4):
        path = _zip_with_pickle(tmp_path / f"np{protocol}.pt", pickle.dumps(ckpt, protocol=protocol))
        back = read_torch_file(path)
        assert back["best_fitness"] == 0.625 and isinstance(back["best_fitness"], np.float64)
        assert back["epoch_np"] == -1 and isinstance(back["epoch_np"], np.int64)
        assert _same(back["hist"], ckpt["hist"].astype("<i4"))
        assert _same(back["fortran"], ckpt["fortran"])
        assert back["flag"] is np.True_ or back["flag"] == np.True_
        assert back["dt"] == np.dtype("float16")
        assert back["path"] == "/runs/train/exp/weights/best.pt"
        assert isinstance(back["opt"], ModuleStub) and back["opt"].qualname == "argparse.Namespace"
        assert back["opt"].state == vars(ns) and back["opt"].weights == "yolov7.pt"
        for key in ("set", "frozen", "slice", "complex", "raw", "empty_raw", "buf", "od"):
            assert back[key] == ckpt[key], (protocol, key)


# ------------------------------------------------------------------------------------------------
# 4. hostile pickles: refused before anything runs
# ------------------------------------------------------------------------------------------------


def _payloads(sentinel: pathlib.Path):
    class System:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    class Eval:
        def __reduce__(self):
            return (eval, (f"open({str(sentinel)!r}, 'w').close()",))

    class Popen:
        def __reduce__(self):
            return (subprocess.Popen, (["touch", str(sentinel)],))

    class Exec:
        def __reduce__(self):
            return (exec, (f"open({str(sentinel)!r}, 'w').close()",))

    return {
        "system": System(),
        "eval": Eval(),
        "Popen": Popen(),
        "exec": Exec(),
        # an otherwise valid checkpoint with the global nested deep inside
        "nested": collections.OrderedDict(
            epoch=1, model=collections.OrderedDict(a=[1, 2, {"b": (3, [System()])}])),
    }


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("kind", ["system", "eval", "Popen", "exec", "nested"])
def test_hostile_pickle_is_refused_without_side_effects(tmp_path, protocol, kind):
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_payloads(sentinel)[kind], protocol=protocol)
    if protocol == 4:
        assert any(op.name == "STACK_GLOBAL" for op, _, _ in pickletools.genops(payload))
    path = _zip_with_pickle(tmp_path / "evil.pt", payload)
    msg = _error(path)
    assert "refusing to load" in msg
    expected = {"system": "system", "nested": "system", "eval": "builtins.eval", "exec": "builtins.exec",
                "Popen": "subprocess.Popen"}[kind]
    assert expected in msg
    assert not sentinel.exists()


def test_bare_pickle_file_is_not_unpickled(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_payloads(sentinel)["system"], protocol=2))
    msg = _error(path)
    assert "not a PyTorch zip checkpoint" in msg
    assert not sentinel.exists()


@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"), ("__builtin__", "exec"),
    ("builtins", "getattr"), ("builtins", "__import__"), ("builtins", "open"), ("builtins", "type"),
    ("subprocess", "Popen"), ("torch", "load"), ("torch.serialization", "load"), ("numpy", "load"),
    ("functools", "partial"), ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_qtensor"),
    ("copyreg", "__newobj__"), ("collections", "defaultdict"), ("pickle", "loads"),
    ("argparse", "ArgumentParser"), ("models.common", "Conv\nos"), ("torch.nn", "Module"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy.core.multiarray", "fromstring"),
])
def test_globals_outside_the_allow_list_are_refused(tmp_path, module, name):
    payload = b"\x80\x02" + _frag(module) + _frag(name) + b"\x93)R."  # STACK_GLOBAL, call with ()
    if "\n" not in name:
        payload = b"\x80\x02" + _global(module, name) + b")R."
    path = _zip_with_pickle(tmp_path / "g.pt", payload)
    msg = _error(path)
    assert "refusing to load" in msg
    assert name.split("\n")[0] in msg


def test_allowed_callables_cannot_be_misused(tmp_path):
    v2 = _global("torch._utils", "_rebuild_tensor_v2")
    cases = {
        # copyreg._reconstructor only builds module stubs
        "recon": (_global("copyreg", "_reconstructor") + _global("builtins", "set")
                  + _global("builtins", "object") + b"N\x87R", "only allowed for module classes"),
        # BUILD cannot modify a safe callable, neither through __dict__ nor through setattr
        "build": (v2 + b"}" + _frag("fn") + b"K\x01sb", "__dict__"),
        "build_slots": (v2 + b"N}" + _frag("fn") + b"K\x01s\x86b", "read-only"),
        # ... nor a stub class
        "build_class": (_global("models.common", "Conv") + b"}b", "__setstate__"),
        # a tensor rebuilt from something that is not a storage
        "not_storage": (v2 + b"(K\x00K\x00))\x89NtR", "not a storage"),
        # numpy object arrays / non-numeric dtypes
        "np_object": (_global("numpy", "dtype") + _frag("O8") + b"\x89\x88\x87R", "'O8'"),
        "np_reconstruct": (_global("numpy.core.multiarray", "_reconstruct") + _global("builtins", "set")
                           + b")" + _frag(b"b") + b"\x87R", "other than numpy.ndarray"),
        "persid_str": (_frag("storage") + b"Q", "unknown persistent id"),
        "rebuild_from_type": (_global("torch._tensor", "_rebuild_from_type_v2") + b"(" + _global("builtins", "set")
                              + _global("torch", "Tensor") + b")}tR", "not a plain tensor"),
        "device": (_global("torch", "device") + _frag(("cuda", "0")) + b"R", "torch.device"),
    }
    for name, (ops, fragment) in cases.items():
        path = _zip_with_pickle(tmp_path / f"{name}.pt", b"\x80\x02" + ops + b".")
        msg = _error(path)
        assert fragment in msg, (name, msg)
    # the safe callables still work afterwards
    path = _zip_with_pickle(tmp_path / "ok.pt", _ordered_dict_ops({"w": _tensor_ops()}),
                            **{"data/0": np.arange(4, dtype=np.float32).tobytes()})
    assert _same(read_torch_file(path)["w"], np.arange(4, dtype=np.float32).reshape(2, 2))


def test_import_free_reading(tmp_path, written):
    """Reading needs neither torch nor any module named in the file."""
    code = textwrap.dedent(f"""
        import sys
        from jaxyolo.export.torch_format import read_torch_file
        sd = read_torch_file({str(written)!r})
        assert len(sd) == {len(SAMPLE_STATE)}
        assert 'torch' not in sys.modules, 'torch was imported'
        print('ok')
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------------
# 5. corrupt and foreign files
# ------------------------------------------------------------------------------------------------


def test_truncated_zip(tmp_path, written):
    raw = written.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[: len(raw) // 2])
    assert "truncated or corrupt" in _error(path)


def test_random_bytes_and_empty_file(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a PyTorch zip checkpoint" in _error(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty" in _error(empty)


def test_missing_file_and_directory(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.pt")
    assert "directory" in _error(tmp_path)


def test_legacy_format_is_named(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    assert "legacy torch serialization is not supported; re-save it with torch >= 1.6" in _error(path)


def test_zip_without_data_pkl(tmp_path):
    path = _write_zip(tmp_path / "nodata.pt", {"version": b"3\n", "data/0": b"\0" * 16})
    assert "data.pkl" in _error(path)
    script = _write_zip(tmp_path / "script.pt", {"data.pkl": b"\x80\x02N.", "constants.pkl": b"\x80\x02).",
                                                 "code/__torch__.py": b""})
    assert "TorchScript" in _error(script)


def test_missing_and_short_storage_records(tmp_path, written):
    with zipfile.ZipFile(written) as zf:
        records = {i.filename: zf.read(i) for i in zf.infolist()}

    missing = tmp_path / "missing.pt"
    _write_zip(missing, {k: v for k, v in records.items() if k != "archive/data/0"}, prefix="")
    msg = _error(missing)
    assert "archive/data/0" in msg and "missing" in msg

    short = tmp_path / "short.pt"
    _write_zip(short, {k: (v[:-4] if k == "archive/data/0" else v) for k, v in records.items()}, prefix="")
    msg = _error(short)
    assert "archive/data/0" in msg and "bytes" in msg


def test_corrupt_storage_bytes_fail_the_crc(tmp_path, written):
    raw = bytearray(written.read_bytes())
    with zipfile.ZipFile(written) as zf:
        info = zf.getinfo("archive/data/0")
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    raw[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    path = tmp_path / "crc.pt"
    path.write_bytes(bytes(raw))
    assert "archive/data/0" in _error(path)


@pytest.mark.parametrize("payload", [b"", b"garbage", b"\x80\x02(", b"\x80\x02]q\x00(K\x01K\x02", b"\x80\x02h\x05."])
def test_bad_pickle(tmp_path, payload):
    path = _zip_with_pickle(tmp_path / "bad.pt", payload)
    assert "data.pkl" in _error(path)


@pytest.mark.parametrize("ops,what", [
    (_tensor_ops(numel=4, size=(3, 3), stride=(3, 1)), "needs 9 elements"),
    (_tensor_ops(numel=4, offset=4, size=(1,), stride=(1,)), "needs 5 elements"),
    (_tensor_ops(numel=4, size=(2,), stride=(-1,)), "malformed"),
    (_tensor_ops(numel=8, size=(2,), stride=(1,)), "holds 16 bytes but the tensor needs 32"),
    (_tensor_ops(storage_type="QInt8Storage"), "torch.QInt8Storage"),
])
def test_tensors_that_do_not_fit_their_storage(tmp_path, ops, what):
    path = _zip_with_pickle(tmp_path / "t.pt", _ordered_dict_ops({"w": ops}),
                            **{"data/0": np.arange(4, dtype=np.float32).tobytes()})
    assert what in _error(path)


def test_unknown_byteorder(tmp_path):
    path = _zip_with_pickle(tmp_path / "bo.pt", b"\x80\x02N.", byteorder=b"middle")
    assert "byteorder" in _error(path)


# ------------------------------------------------------------------------------------------------
# 6. extract_state_dict
# ------------------------------------------------------------------------------------------------


def _module(qualname, params=(), buffers=(), modules=(), non_persistent=(), **attrs):
    stub = tf.stub_class(qualname)()
    stub.__setstate__({
        "training": False,
        "_parameters": dict(params),
        "_buffers": dict(buffers),
        "_non_persistent_buffers_set": set(non_persistent),
        "_modules": dict(modules),
        **attrs,
    })
    return stub


def _tiny_model():
    a = np.arange(4, dtype=np.float16)
    conv = _module("torch.nn.modules.conv.Conv2d", params=[("weight", a), ("bias", None)])
    bn = _module("torch.nn.modules.batchnorm.BatchNorm2d",
                 params=[("weight", a + 1), ("bias", a + 2)],
                 buffers=[("running_mean", a + 3), ("running_var", a + 4), ("num_batches_tracked", np.array(7))])
    block = _module("models.common.Conv", modules=[("conv", conv), ("bn", bn), ("act", None)])
    head = _module("models.yolo.IDetect", params=[("extra", a + 9)],
                   buffers=[("anchors", a + 5), ("cache", a + 6), ("gone", None)], non_persistent=["cache"],
                   modules=[("m", _module("torch.nn.modules.container.ModuleList", modules=[("0", conv)]))])
    seq = _module("torch.nn.modules.container.Sequential", modules=[("0", block), ("1", head)])
    model = _module("models.yolo.Model", params=[("p", a + 8)], modules=[("model", seq)],
                    names=["a", "b"], stride=np.array([8.0, 16.0]))
    expected = ["p", "model.0.conv.weight", "model.0.bn.weight", "model.0.bn.bias", "model.0.bn.running_mean",
                "model.0.bn.running_var", "model.0.bn.num_batches_tracked", "model.1.extra",
                "model.1.anchors", "model.1.m.0.weight"]
    return model, expected


def test_extract_from_module_stub_follows_state_dict_order():
    model, expected = _tiny_model()
    sd = extract_state_dict({"epoch": -1, "model": model, "optimizer": None})
    assert list(sd) == expected
    assert _same(sd["model.1.anchors"], np.arange(4, dtype=np.float16) + 5)
    assert sd["model.1.m.0.weight"] is sd["model.0.conv.weight"]  # shared module appears under both keys
    assert list(extract_state_dict(model)) == expected
    assert model.names == ["a", "b"] and model.model.qualname == "torch.nn.modules.container.Sequential"


def test_extract_plain_and_nested_state_dicts():
    sd = collections.OrderedDict(a=np.ones(2), b=np.zeros(3))
    assert extract_state_dict(sd) is sd
    assert extract_state_dict({"state_dict": sd, "epoch": 3}) is sd
    assert extract_state_dict({"model": sd}) is sd


def test_extract_prefers_ema_only_when_model_is_none():
    model, expected = _tiny_model()
    other = _module("models.yolo.Model", params=[("q", np.ones(1))])
    assert list(extract_state_dict({"model": None, "ema": model})) == expected
    assert list(extract_state_dict({"model": other, "ema": model})) == ["q"]
    assert list(extract_state_dict({"model": other, "ema": model}, prefer_ema=True)) == expected
    assert list(extract_state_dict({"model": other, "ema": None}, prefer_ema=True)) == ["q"]


@pytest.mark.parametrize("obj,fragment", [
    ([1, 2], "got a list"),
    ({"epoch": 3, "optimizer": None}, "'epoch', 'optimizer'"),
    ({}, "empty"),
    ({"model": "yolov7"}, "'model' holds a str"),
    ({"model": {"a": np.ones(1), "b": None}}, "'model' holds a dict"),
    ({"model": tf.stub_class("models.yolo.Model")()}, "not a torch nn.Module"),
    (np.ones(3), "numpy.ndarray"),
])
def test_extract_rejects_unsupported_objects(obj, fragment):
    with pytest.raises(CheckpointError) as info:
        extract_state_dict(obj, source="ckpt.pt")
    msg = str(info.value)
    assert msg.startswith("ckpt.pt: ") and "\n" not in msg
    assert fragment in msg


def test_extract_rejects_cycles_and_non_tensors():
    loop = _module("models.common.Conv")
    loop.state["_modules"]["self"] = loop
    with pytest.raises(CheckpointError, match="loops back"):
        extract_state_dict({"model": loop})
    bad = _module("models.common.Conv", params=[("weight", "not a tensor")])
    with pytest.raises(CheckpointError, match="'weight'.*not a tensor"):
        extract_state_dict({"model": bad})


def test_stub_state_tuple_form_and_caching():
    cls = tf.stub_class("models.common.ImplicitA")
    assert cls is tf.stub_class("models.common.ImplicitA") and issubclass(cls, ModuleStub)
    stub = cls(1, 2, key="ignored")
    stub.__setstate__(({"a": 1}, {"b": 2}))
    assert stub.state == {"a": 1, "b": 2} and stub.qualname == "models.common.ImplicitA"
    with pytest.raises(AttributeError):
        stub.missing  # noqa: B018
    clone = copy.deepcopy(stub)
    assert type(clone) is cls and clone.state == stub.state and clone.state is not stub.state
    assert clone.args == (1, 2)


# ------------------------------------------------------------------------------------------------
# 2./3. against torch itself
# ------------------------------------------------------------------------------------------------


def test_torch_save_is_read_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = collections.OrderedDict([
        ("fp32", torch.randn(3, 4, generator=g)),
        ("fp16", torch.randn(7, generator=g).half()),
        ("bf16", torch.randn(5, generator=g).bfloat16()),
        ("f64", torch.randn(2, 2, generator=g).double()),
        ("num_batches_tracked", torch.tensor(12345, dtype=torch.long)),
        ("base", base),
        ("view_col", base[:, 2]),           # shares base's storage, offset 2, stride 5
        ("view_t", base.t()),               # shares base's storage, transposed strides
        ("view_tail", base[4:]),            # shares base's storage, offset 20
        ("int32", torch.arange(-3, 3, dtype=torch.int32)),
        ("int8", torch.tensor([-128, 5, 127], dtype=torch.int8)),
        ("uint8", torch.tensor([0, 255], dtype=torch.uint8)),
        ("bool", torch.tensor([True, False, True])),
        ("c64", torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)),
        ("u16", torch.tensor([1, 65535], dtype=torch.int32).to(torch.uint16)),  # _rebuild_tensor_v3
        ("empty", torch.empty(0, 3)),
        ("param", torch.nn.Parameter(torch.randn(3, generator=g))),
        ("param_state", torch.nn.Parameter(torch.randn(2, generator=g))),  # _rebuild_parameter_with_state
        ("tagged", torch.randn(2, generator=g)),                           # _rebuild_from_type_v2
    ])
    sd["param_state"].note = "has python state"
    sd["tagged"].note = "has python state"
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    with zipfile.ZipFile(path) as zf:  # the views really share one storage record
        assert len([n for n in zf.namelist() if "/data/" in n]) == len(sd) - 3
        pkl = zf.read("sd/data.pkl")
    globals_used = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    assert {"torch._utils _rebuild_parameter_with_state", "torch._tensor _rebuild_from_type_v2",
            "torch._utils _rebuild_tensor_v3", "torch.storage UntypedStorage"} <= globals_used
    back = read_torch_file(path)
    assert list(back) == list(sd)
    for key, tensor in sd.items():
        got = back[key]
        if tensor.dtype == torch.bfloat16:
            assert got.dtype == ml_dtypes.bfloat16
            assert _same(got.view(np.int16), tensor.view(torch.int16).numpy()), key
        elif tensor.dtype == torch.uint16:
            assert _same(got, tensor.to(torch.int32).numpy().astype(np.uint16)), key
        else:
            assert _same(got, tensor.detach().numpy()), key


def test_written_file_loads_in_torch_weights_only(written):
    torch = pytest.importorskip("torch")
    for kwargs in ({}, {"mmap": True}):
        loaded = torch.load(written, weights_only=True, **kwargs)
        assert isinstance(loaded, collections.OrderedDict)
        assert list(loaded) == list(SAMPLE_STATE)
        for key, want in SAMPLE_STATE.items():
            t = loaded[key]
            assert tuple(t.shape) == want.shape, key
            assert t.is_contiguous(), key
            if want.dtype == ml_dtypes.bfloat16:
                assert t.dtype == torch.bfloat16
                assert _same(t.view(torch.int16).numpy(), np.ascontiguousarray(want).view(np.int16)), key
            elif want.dtype == np.uint16:
                assert t.dtype == torch.uint16
                assert _same(t.to(torch.int32).numpy(), want.astype(np.int32)), key
            else:
                assert _same(t.numpy(), want), key


def test_torch_legacy_file_is_named(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert "legacy torch serialization is not supported" in _error(path)


FAKE_COMMON = '''
import torch
import torch.nn as nn


class Conv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ImplicitA(nn.Module):
    def __init__(self, channel):
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, std=.02)


class ImplicitM(nn.Module):
    def __init__(self, channel):
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=1., std=.02)
'''

FAKE_YOLO = '''
import torch
import torch.nn as nn

from models.common import Conv, ImplicitA, ImplicitM


class IDetect(nn.Module):
    stride = None
    export = False

    def __init__(self, nc=2, anchors=((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119)), ch=(8, 8)):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer('anchors', a)
        self.register_buffer('anchor_grid', a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.register_buffer('cache', torch.zeros(3), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.ia = nn.ModuleList(ImplicitA(x) for x in ch)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.yaml = {'nc': 2, 'depth_multiple': 1.0, 'anchors': 2}
        self.model = nn.Sequential(
            Conv(3, 8, 3, 2), Conv(8, 8, 3, 1), nn.MaxPool2d(kernel_size=1, stride=1),
            nn.Upsample(scale_factor=2.0, mode='nearest'), IDetect(ch=(8, 8)))
        self.register_module('unused', None)
        self.stride = torch.tensor([8., 16.])
        self.names = ['cat', 'dog']
        self.traced = False
'''

FAKE_SAVE = '''
import collections
import numpy as np
import torch
from models.yolo import Model

torch.manual_seed(0)
model = Model()
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.num_batches_tracked.fill_(1234)
model.half()
torch.save({'epoch': -1, 'best_fitness': None, 'training_results': None, 'model': model, 'optimizer': None},
           'release.pt')
torch.save({'epoch': -1, 'best_fitness': None, 'model': model}, 'release_p1.pt', pickle_protocol=1)
torch.save({'epoch': 5, 'best_fitness': np.float64(0.75), 'model': None, 'ema': model, 'updates': 10,
            'optimizer': None, 'date': '2024-01-01'}, 'release_ema.pt')
truth = collections.OrderedDict(
    (k, v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items())
torch.save(truth, 'truth.pt')
print('saved')
'''


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("release")
    (root / "models").mkdir()
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "common.py").write_text(FAKE_COMMON)
    (root / "models" / "yolo.py").write_text(FAKE_YOLO)
    out = subprocess.run([sys.executable, "-c", FAKE_SAVE], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return root


@pytest.mark.parametrize("name", ["release.pt", "release_p1.pt", "release_ema.pt"])
def test_official_release_format(release_files, name):
    torch = pytest.importorskip("torch")
    assert str(release_files) not in sys.path
    ckpt = read_torch_file(release_files / name)
    assert "models" not in sys.modules and "models.yolo" not in sys.modules
    assert isinstance(ckpt, dict)
    model = ckpt["ema"] if name == "release_ema.pt" else ckpt["model"]
    assert isinstance(model, ModuleStub) and model.qualname == "models.yolo.Model"
    assert model.model.qualname == "torch.nn.modules.container.Sequential"
    assert model.names == ["cat", "dog"] and model.yaml["nc"] == 2
    head = model.model.state["_modules"]["4"]
    assert head.qualname == "models.yolo.IDetect"
    assert head.ia.state["_modules"]["0"].qualname == "models.common.ImplicitA"
    if name == "release_ema.pt":
        assert ckpt["best_fitness"] == 0.75

    sd = extract_state_dict(ckpt, source=name)
    truth = torch.load(release_files / "truth.pt", weights_only=True)
    assert list(sd) == list(truth)
    assert "model.4.cache" not in sd and "model.0.conv.bias" not in sd
    assert "model.4.anchors" in sd and "model.4.ia.1.implicit" in sd and "model.4.m.0.bias" in sd
    for key, want in truth.items():
        got = sd[key]
        if want.is_floating_point():
            assert got.dtype == np.float16, key
            assert _same(got.astype(np.float32), want.numpy()), key
        else:
            assert _same(got, want.numpy()), key

"""The reference state_dict mapping, PyTorch-format import/export, and jaxyolo checkpoints."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from conftest import SPEC_DIR, perturbed

import jaxyolo
from jaxyolo.export.torch_format import write_state_dict
from jaxyolo.tools import cli


def _read_tsv(name):
    path = SPEC_DIR / f"{name}_state_dict.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:]]
    return [(k, () if s == "scalar" else tuple(int(v) for v in s.split("x"))) for k, s in rows]


@pytest.mark.parametrize("name", ["yolov4s", "yolov4l"])
@pytest.mark.parametrize("head", ["implicit", "detect"])
def test_state_dict_keys_and_shapes_equal_the_reference(name, head):
    ref = _read_tsv(name)
    if head == "detect":  # docs/reference.md §7: the plain-Detect file lacks the six implicit rows
        ref = [(k, s) for k, s in ref if ".ia." not in k and ".im." not in k]
    det = jaxyolo.create_model(name, head=head, kst=1, abstract=True)
    from jaxyolo.models.state_dict import expected_shapes

    assert list(expected_shapes(det.model).items()) == ref
    # the abstract detector's state_dict lists the same keys with shapes only
    assert [(k, tuple(v.shape)) for k, v in det.state_dict().items()] == ref


def test_every_variable_is_mapped_exactly_once(tiny):
    from flax import nnx

    from jaxyolo.models.state_dict import entries

    mapped = [id(e.variable) for e in entries(tiny.model) if e.variable is not None]
    assert len(mapped) == len(set(mapped))
    assert len(mapped) == len(nnx.to_flat_state(nnx.state(tiny.model)))


def test_anchor_buffers_follow_the_spec():
    sd = jaxyolo.create_model("yolov4p", head="detect").state_dict()
    # docs/reference.md §5, measured anchors buffer (grid units)
    np.testing.assert_allclose(sd["model.31.anchors"][0], [[1.5, 2.0], [2.375, 4.5], [5.0, 3.5]])
    np.testing.assert_allclose(sd["model.31.anchors"][2, 2], [14.34375, 12.53125])
    assert sd["model.31.anchor_grid"].shape == (3, 1, 3, 1, 1, 2)
    np.testing.assert_allclose(sd["model.31.anchor_grid"][1, 0, :, 0, 0], [[36, 75], [76, 55], [72, 146]])
    assert sd["model.31.m.0.weight"].shape == (3 * 85, 16, 1, 1)  # P3 input: ceil(256 * 0.0625 / 8) * 8


def test_export_import_round_trip_is_exact(tiny, tmp_path, images):
    path = tmp_path / "tiny.pt"
    write_state_dict(path, tiny.state_dict())
    back = jaxyolo.load_torch("yolov4p", path)
    assert back.kst == 3 and back.num_classes == 3
    for (k, a), (k2, b) in zip(tiny.state_dict().items(), back.state_dict().items()):
        assert k == k2
        np.testing.assert_array_equal(a, b)
    for a, b in zip(tiny.forward_raw(images), back.forward_raw(images)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_npz_import(tiny, tmp_path):
    np.savez(tmp_path / "w.npz", **tiny.state_dict())
    back = jaxyolo.load_torch("yolov4p", tmp_path / "w.npz")
    np.testing.assert_array_equal(back.state_dict()["model.31.im.2.implicit"],
                                  tiny.state_dict()["model.31.im.2.implicit"])


def test_plain_detect_file_gives_detect_head_and_file_anchors(tmp_path):
    det = jaxyolo.create_model("yolov4p", head="detect", num_classes=5,
                               anchors=[[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]])
    write_state_dict(tmp_path / "d.pt", det.state_dict())
    back = jaxyolo.load_torch("yolov4p", tmp_path / "d.pt")
    assert back.kst == 0 and back.num_classes == 5
    assert back.spec.anchors[2][2] == (373.0, 326.0)


def test_import_errors_name_the_keys(tiny, tmp_path):
    sd = tiny.state_dict()
    missing = dict(sd)
    del missing["model.6.m.0.cv2.conv.weight"]
    missing["model.99.extra"] = np.zeros(3, np.float32)
    write_state_dict(tmp_path / "m.pt", missing)
    with pytest.raises(jaxyolo.CheckpointError) as err:
        jaxyolo.load_torch("yolov4p", tmp_path / "m.pt")
    assert "missing keys: model.6.m.0.cv2.conv.weight" in str(err.value)
    assert "unexpected keys: model.99.extra" in str(err.value)

    wrong = dict(sd)
    o, i = sd["model.3.conv.weight"].shape[:2]
    wrong["model.3.conv.weight"] = np.zeros((o, i, 5, 5), np.float32)
    write_state_dict(tmp_path / "s.pt", wrong)
    with pytest.raises(jaxyolo.CheckpointError,
                       match=rf"model.3.conv.weight: file \({o}, {i}, 5, 5\) vs model \({o}, {i}, 3, 3\)"):
        jaxyolo.load_torch("yolov4p", tmp_path / "s.pt")

    write_state_dict(tmp_path / "ok.pt", sd)
    with pytest.raises(jaxyolo.CheckpointError, match="the file has 3 classes, num_classes=80"):
        jaxyolo.load_torch("yolov4p", tmp_path / "ok.pt", num_classes=80)
    with pytest.raises(jaxyolo.CheckpointError, match="different model scale.*model.0.conv.weight"):
        jaxyolo.load_torch("yolov4s", tmp_path / "ok.pt")  # wrong table: shapes differ


def test_corrupt_and_hostile_files_give_one_line_errors(tiny, tmp_path):
    good = tmp_path / "good.pt"
    write_state_dict(good, tiny.state_dict())
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(jaxyolo.CheckpointError) as err:
        jaxyolo.load_torch("yolov4p", cut)
    assert "\n" not in str(err.value) and "cut.pt" in str(err.value)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    hostile = tmp_path / "hostile.pt"
    with zipfile.ZipFile(hostile, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"model": Evil()}, protocol=2))
    with pytest.raises(jaxyolo.CheckpointError, match="refusing.*system"):
        jaxyolo.load_torch("yolov4p", hostile)
    assert not (tmp_path / "pwned").exists()

    with pytest.raises(jaxyolo.CheckpointError, match="no such file"):
        jaxyolo.load_torch("yolov4p", tmp_path / "absent.pt")


RELEASE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from models.yolo import Model
    from models.common import Block
    sd = torch.load(sys.argv[2], weights_only=True)
    root = Model()
    for key, t in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for p in path:
            if p not in mod._modules:
                mod.add_module(p, torch.nn.ModuleList() if p in ("m", "ia", "im") and mod is not root.model
                               else torch.nn.Sequential() if mod is root else Block())
            mod = mod._modules[p]
        if leaf in ("running_mean", "running_var", "num_batches_tracked", "anchors", "anchor_grid"):
            mod.register_buffer(leaf, t)
        else:
            mod.register_parameter(leaf, torch.nn.Parameter(t))
    root.half()  # release checkpoints are stored in fp16
    torch.save({"epoch": -1, "best_fitness": None, "training_results": None, "model": root,
                "optimizer": None}, sys.argv[3])
    import copy
    raw = copy.deepcopy(root)
    with torch.no_grad():
        for p in raw.parameters():
            p.zero_()
    torch.save({"epoch": 7, "model": raw, "ema": root, "updates": 100}, sys.argv[4])  # an unstripped last.pt
    """
)


def test_official_release_checkpoint_loads_without_reference_code(tmp_path, images):
    """A whole-module pickle whose classes live in a `models` package the test process never sees."""
    pytest.importorskip("torch")
    pkg = tmp_path / "refcode" / "models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "common.py").write_text("import torch\nclass Block(torch.nn.Module):\n    pass\n")
    (pkg / "yolo.py").write_text(
        "import torch\nclass Model(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.model = torch.nn.Sequential()\n"
    )
    det = perturbed(jaxyolo.create_model("yolov4p", num_classes=3, kst=1, seed=3))
    write_state_dict(tmp_path / "sd.pt", det.state_dict())
    release, last = tmp_path / "release.pt", tmp_path / "last.pt"
    subprocess.run([sys.executable, "-c", RELEASE_SCRIPT, str(pkg.parent), str(tmp_path / "sd.pt"), str(release),
                    str(last)], check=True, capture_output=True)
    assert "models" not in sys.modules
    back = jaxyolo.load_torch("yolov4p", release)
    assert back.kst == 1 and back.num_classes == 3
    assert "models" not in sys.modules
    for k, v in det.state_dict().items():
        expect = v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v
        np.testing.assert_array_equal(back.state_dict()[k], expect, err_msg=k)
    for a, b in zip(det.forward_raw(images), back.forward_raw(images)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05, rtol=0.02)  # fp16 weights
    from_last = jaxyolo.load_torch("yolov4p", last).state_dict()  # 'ema' wins over the (zeroed) 'model'
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(from_last[k], v, err_msg=k)


def test_save_and_load_round_trip(tiny, tmp_path, images):
    path = tiny.save(tmp_path / "ckpt")
    back = jaxyolo.load(path)
    assert (back.kst, back.num_classes, back.options, back.spec) == (tiny.kst, tiny.num_classes, tiny.options, tiny.spec)
    for a, b in zip(tiny.forward_raw(images), back.forward_raw(images)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(jaxyolo.CheckpointError, match="not a jaxyolo checkpoint"):
        jaxyolo.load(tmp_path)


def test_a_checkpoint_from_before_families_still_loads(tiny, tmp_path, images):
    """Format 1 (no family, anchors at the top level) is read as YOLOv4; an unknown format is
    refused naming the ones this version reads."""
    import json

    path = tiny.save(tmp_path / "ckpt")
    meta_file = path / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    old = {k: v for k, v in meta.items() if k not in ("family", "fields")}
    old.update(format="jaxyolo-detector/1", anchors=meta["fields"]["anchors"])
    meta_file.write_text(json.dumps(old))
    back = jaxyolo.load(path)
    assert back.family.name == "yolov4" and back.spec == tiny.spec
    for a, b in zip(tiny.forward_raw(images), back.forward_raw(images)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta_file.write_text(json.dumps({**old, "format": "jaxyolo-detector/9"}))
    with pytest.raises(jaxyolo.CheckpointError, match="jaxyolo-detector/9.*reads jaxyolo-detector/1, jaxyolo-detector/2"):
        jaxyolo.load(path)


def test_folded_detector_saves_and_loads(tiny, tmp_path, images):
    folded = tiny.fold()
    back = jaxyolo.load(folded.save(tmp_path / "folded"))
    assert back.options.fused
    for a, b in zip(folded.forward_raw(images), back.forward_raw(images)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_info_json(capsys):
    assert cli.main(["info", "--model", "yolov4s", "--head", "detect", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 9_329_581
    assert abs(out["gflops"] - 21.17) < 0.2
    assert len(out["layers"]) == 32


def test_cli_table_and_errors(capsys):
    assert cli.main(["info", "--model", "yolov4p", "--img", "320"]) == 0
    out = capsys.readouterr().out
    assert "SPPCSP" in out and "GFLOPs" in out
    assert cli.main(["info", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err

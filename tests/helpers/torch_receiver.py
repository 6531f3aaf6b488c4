"""What the torch mirror tests of both families share: test images in both layouts, the parity
measure of decoded outputs, and what a receiver of an exported folder runs (the mirror in a fresh
interpreter where jax, flax and jaxyolo, and optionally numpy, cannot be imported)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np


def images(size: int, n: int = 2, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def nchw(images_nhwc: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))


def normalised_diff(a, b, size) -> float:
    """Largest difference of decoded outputs, boxes (the first 4 channels) divided by the input size."""
    norm = np.ones(a.shape[-1])
    norm[:4] = size
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / norm))


def receiver_output(folder: Path, images_nchw, tmp_path: Path, *, block_numpy: bool = False):
    """The mirror's output (a torch tensor) for `images_nchw` (a torch tensor), computed by
    `jaxyolo_torch.load(folder)` in a subprocess that cannot import jax, flax or jaxyolo."""
    import torch

    torch.save(images_nchw, tmp_path / "x.pt")
    blocked = ("jax", "jaxlib", "flax", "jaxyolo") + (("numpy",) if block_numpy else ())
    code = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None          # any import of these now fails
        sys.path.insert(0, {str(folder)!r})
        import torch
        import jaxyolo_torch
        model = jaxyolo_torch.load({str(folder)!r})
        with torch.no_grad():
            y = model(torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True))
        torch.save(y, {str(tmp_path / 'y.pt')!r})
        leaked = [m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "jaxyolo")
                  and sys.modules[m] is not None]
        assert not leaked, leaked
        print("receiver ok", tuple(y.shape))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "receiver ok" in proc.stdout
    return torch.load(tmp_path / "y.pt", weights_only=True)


def outside_imports(source: Path) -> set[str]:
    """Top-level modules a source file imports beyond torch and the standard library."""
    tree = ast.parse(Path(source).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return names - {"torch"} - set(sys.stdlib_module_names) - {"__future__"}

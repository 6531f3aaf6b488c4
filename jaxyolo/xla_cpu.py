"""XLA settings for the CPU that jaxyolo applies when it is imported (before JAX starts a backend).

XLA's CPU backend hands convolutions to the YNNPACK library by default. For the convolutions of
these detectors (many channels-last layers with 16-512 channels at large spatial sizes) its
forward and gradient kernels measured slower than XLA's own (Eigen) convolutions, while YNNPACK's
reductions (BatchNorm statistics), matmuls and elementwise kernels are the fastest on offer. So
jaxyolo keeps YNNPACK for those and leaves convolutions to XLA:

    --xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE,
        LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_ELTWISE

(`jaxyolo bench --suite train` measures the step; docs/benchmarks.md has the figures:
JAX / PyTorch 0.97 with the flag on an AVX2 CPU; 1.22 with it against 1.68 without on an AVX-512
one, so it is applied whatever the CPU's features.)
The flag only concerns the CPU backend. It is not applied when `XLA_FLAGS` already sets
`xla_cpu_experimental_ynn_fusion_type` (the user's choice wins), when `JAXYOLO_XLA_DEFAULTS=0`,
when `XLA_FLAGS` asks for several host devices (XLA refuses some of its fusions in partitioned
programs), or when a JAX backend is already running (XLA reads its flags once, at start-up); a
multi-process run withdraws it (`withdraw`).
"""

from __future__ import annotations

import os

YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_REDUCE", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_ELTWISE")
FLAG = "--xla_cpu_experimental_ynn_fusion_type=" + ",".join(YNN_FUSION_TYPES)


def apply_defaults() -> bool:
    """Add `FLAG` to `XLA_FLAGS` unless one of the exceptions above holds; True if it was added."""
    if os.environ.get("JAXYOLO_XLA_DEFAULTS", "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    if _host_device_count(flags) > 1:  # see `withdraw`: several CPU devices, programs XLA partitions
        return False
    if backend_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


def _host_device_count(flags: str) -> int:
    for f in flags.split():
        if f.startswith("--xla_force_host_platform_device_count="):
            return int(f.split("=", 1)[1] or 1)
    return 1


def withdraw() -> bool:
    """Take `FLAG` back out of `XLA_FLAGS` before the backend starts; True if it was there. XLA
    refuses some layouts in YNNPACK fusions of partitioned programs, over several CPU devices or
    processes ("Instruction with unsupported layout in YNN fusion"), so such runs go without it
    (a process with several CPU devices never takes it: `apply_defaults`)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG not in flags or backend_started():
        return False
    os.environ["XLA_FLAGS"] = " ".join(f for f in flags.split() if f != FLAG)
    return True


def backend_started() -> bool:
    """Whether this process has started a JAX backend (XLA flags set after that are ignored).
    JAX has no public call for it; this is the one place that reaches into its internals."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def active() -> bool:
    """Whether this process's XLA flags carry jaxyolo's CPU setting."""
    return FLAG in os.environ.get("XLA_FLAGS", "")

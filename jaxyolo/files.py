"""File helpers: atomic writes (a reader, or a run killed mid-write, sees the old file or the new one,
never half of one), checksums for checkpoints, quiet reads of possibly damaged checkpoints, and
settings files read with one clear error."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(out_path, write: Callable) -> Path:
    """Call write(binary file object) on a temporary file beside out_path, then move it over out_path."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would carry over to the result; "x" mode keeps the umask's mode.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def atomic_write_text(out_path, text: str) -> Path:
    """`atomic_write` of a UTF-8 text. With several processes (`jaxyolo.distributed`), each of
    which computes the same text, process 0 alone writes it."""
    from jaxyolo import distributed

    if not distributed.is_primary():
        return Path(out_path)
    return atomic_write(out_path, lambda f: f.write(text.encode("utf-8")))


def crc32(array) -> int:
    """CRC-32 of an array's bytes (C order): saved beside a checkpoint's arrays, it tells a damaged
    file that still decodes (a zeroed or missing chunk reads back as zeros) from an intact one."""
    import zlib

    import numpy as np

    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def reason(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception from another library, shortened: enough to say what broke
    in a one-line error, without its traceback."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = f"{type(e).__name__}: {text}" if not text.startswith(type(e).__name__) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def quiet_logger(name: str, level: int | None = None):
    """Logger `name` raised to `level` (default CRITICAL) inside the block. Used where another
    library logs noise the caller handles itself: Orbax reads through asyncio, and when a damaged
    file fails one read asyncio logs the other cancelled reads' tracebacks at shutdown (the caller
    raises one clear error instead); onnx_ir warns about harmless untyped shape constants."""
    import logging

    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(logging.CRITICAL if level is None else level)
    try:
        yield
    finally:
        logger.setLevel(old)


def read_document(path: Path, *, what: str, fmt: str = "yaml"):
    """The YAML (`yaml.safe_load`: a settings file never runs code) or JSON document at `path`; a
    missing or unparsable file is a one-line ConfigError naming `what` and the file."""
    import json

    import yaml

    from jaxyolo.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = path.read_text()
        return yaml.safe_load(text) if fmt == "yaml" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: not valid {fmt.upper()} ({str(e).splitlines()[0]})") from None

"""A TensorBoard scalar writer with no TensorFlow or tensorboard dependency.

An event file is a sequence of TFRecords, each
    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
whose data is a serialized `tensorflow.Event` protobuf, encoded here by hand:
    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }
The first record carries file_version "brain.Event:2". Every call writes whole records and flushes,
so a killed run leaves a readable file holding everything logged before it died.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

# ------------------------------------------------------------------------------------------ crc32c

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def _make_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _CRC32C_POLY if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of data, continuing from crc; crc32c(b"123456789") == 0xE3069283."""
    c = crc ^ 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add 0xa282ead8, modulo 2**32."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord frame around data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ---------------------------------------------------------------------------------------- protobuf


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement: a negative number takes 10 bytes, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    """Serialized Event with wall_time, step and either file_version or a Summary of scalars."""
    msg = _key(1, 1) + struct.pack("<d", float(wall_time)) + _key(2, 0) + _varint(int(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, str(tag).encode()) + _key(2, 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        msg += _bytes_field(5, summary)
    return msg


# ------------------------------------------------------------------------------------------ writer


def _float(value) -> float:
    try:
        return float(value)
    except TypeError:  # a 0-d array-like without __float__ (e.g. a one-element list)
        import numpy as np

        return float(np.asarray(value).reshape(()))


class SummaryWriter:
    """Append scalar summaries to `<logdir>/events.out.tfevents.<time>.<hostname>.jaxyolo`.

    `scalar(tag, value, step)` and `scalars({tag: value}, step)` write one event each and flush.
    Values are stored as float32 (TensorBoard's simple_value); NaN and inf are kept. Thread-safe;
    usable as a context manager; `close()` is idempotent and writing after it raises ValueError.
    """

    def __init__(self, logdir, *, filename_suffix: str = ".jaxyolo"):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        host = socket.gethostname() or "localhost"
        base = f"events.out.tfevents.{int(now):010d}.{host}"
        path, n = self.logdir / f"{base}{filename_suffix}", 1
        while True:  # two writers in one second and folder must not share (or clobber) a file
            try:
                self._file = open(path, "xb")  # noqa: SIM115 (lives as long as the writer)
                break
            except FileExistsError:
                path, n = self.logdir / f"{base}.{os.getpid()}-{n}{filename_suffix}", n + 1
        self.path = path
        self._lock = threading.Lock()
        self._write(encode_event(now, 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        with self._lock:
            if self._file is None:
                raise ValueError(f"SummaryWriter for {self.path} is closed")
            self._file.write(tfrecord(event))
            self._file.flush()

    def scalar(self, tag: str, value, step: int, *, wall_time: float | None = None) -> None:
        """Log one scalar at step."""
        self.scalars({tag: value}, step, wall_time=wall_time)

    def scalars(self, values: Mapping[str, float], step: int, *, wall_time: float | None = None) -> None:
        """Log several scalars at one step (one event holding every tag)."""
        vals = {str(k): _float(v) for k, v in values.items()}
        if not vals:
            return
        self._write(encode_event(time.time() if wall_time is None else wall_time, int(step), scalars=vals))

    add_scalar = scalar  # the torch.utils.tensorboard spelling: add_scalar(tag, value, global_step)

    def flush(self) -> None:
        """Flush to the OS and to disk (every call already flushes to the OS)."""
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                self._file.close()
                self._file = None

    @property
    def closed(self) -> bool:
        return self._file is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        f = getattr(self, "_file", None)
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

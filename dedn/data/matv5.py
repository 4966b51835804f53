"""Stream the columns of one 2-D numeric variable of a MATLAB v5 ``.mat`` file with bounded memory.

``scipy.io.loadmat`` reads a whole variable into memory; xlsa17's ``res101.mat`` holds ``features``
as a 2048 x N float64 matrix (611 MB for AWA2), and user files can be larger. A MATLAB matrix is
column-major, so image j (column j) is 2048 consecutive values: reading the element's data in order
yields images in order. Compressed variables (miCOMPRESSED) are inflated incrementally.
Format: MATLAB "MAT-File Format" (v5), sections "Data Element Format" and "miMATRIX".
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO, Protocol

import numpy as np

from dedn.errors import DednInputError

MI_MATRIX, MI_COMPRESSED = 14, 15
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}


class _Reader(Protocol):
    def read(self, n: int) -> bytes: ...


class _Inflater:
    """A read(n) stream over ``nbytes`` of zlib data starting at the file's current position."""

    def __init__(self, f: BinaryIO, nbytes: int, block: int = 1 << 20) -> None:
        self.f, self.left, self.block = f, nbytes, block
        self.z = zlib.decompressobj()
        self.buf = b""

    def read(self, n: int) -> bytes:
        parts, have = [self.buf], len(self.buf)
        while have < n:
            if self.z.unconsumed_tail:
                out = self.z.decompress(self.z.unconsumed_tail, n - have)
            elif self.left > 0:
                raw = self.f.read(min(self.block, self.left))
                if not raw:
                    break
                self.left -= len(raw)
                out = self.z.decompress(raw, n - have)
            else:
                break
            parts.append(out)
            have += len(out)
        data = b"".join(parts)
        self.buf = data[n:]
        return data[:n]


def _read_exact(stream: _Reader, n: int, source: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise DednInputError(source, "file", "truncated MATLAB file (unexpected end of data)")
    return data


def _read_tag(stream: _Reader, endian: str, source: str) -> tuple[int, int, bytes | None]:
    """(type, nbytes, small-element data or None)."""
    raw = _read_exact(stream, 8, source)
    first, second = struct.unpack(endian + "II", raw)
    if first >> 16:  # small data element: type and size in one word, data in the next
        return first & 0xFFFF, first >> 16, raw[4 : 4 + (first >> 16)]
    return first, second, None


def _read_sub(stream: _Reader, endian: str, source: str) -> tuple[int, bytes]:
    mtype, nbytes, small = _read_tag(stream, endian, source)
    if small is not None:
        return mtype, small
    data = _read_exact(stream, nbytes, source)
    pad = (-nbytes) % 8
    if pad:
        _read_exact(stream, pad, source)
    return mtype, data


class MatrixStream:
    """A located 2-D numeric variable: ``shape`` (rows, cols), ``dtype``; ``iter_columns`` streams it."""

    def __init__(self, path: str | os.PathLike[str], name: str) -> None:
        self.path, self.name, self.source = path, name, str(path)
        with open(path, "rb") as f:
            header = f.read(128)
            if len(header) < 128 or not header.startswith(b"MATLAB"):
                raise DednInputError(self.source, "file", "not a MATLAB .mat file")
            if b"MATLAB 7.3" in header[:116]:
                raise DednInputError(self.source, "file", "MATLAB 7.3 (HDF5) file: read it with h5py instead")
            self.endian = "<" if header[126:128] == b"IM" else ">"
            size = os.fstat(f.fileno()).st_size
            pos = 128
            while pos + 8 <= size:
                f.seek(pos)
                mtype, nbytes, _ = _read_tag(f, self.endian, self.source)
                body = pos + 8
                if mtype in (MI_MATRIX, MI_COMPRESSED):
                    stream: _Reader = f if mtype == MI_MATRIX else _Inflater(f, nbytes)
                    if mtype == MI_COMPRESSED:
                        inner_type, _, _ = _read_tag(stream, self.endian, self.source)
                        if inner_type != MI_MATRIX:
                            pos = body + nbytes
                            continue
                    found = self._read_matrix_header(stream)
                    if found:
                        self._element = (mtype, body, nbytes)
                        return
                pos = body + nbytes + ((-nbytes) % 8 if mtype != MI_COMPRESSED else 0)
        raise DednInputError(self.source, name, "missing variable in the MATLAB file")

    def _read_matrix_header(self, stream: _Reader) -> bool:
        e, src = self.endian, self.source
        _, flags = _read_sub(stream, e, src)
        mx_class = struct.unpack(e + "I", flags[:4])[0] & 0xFF
        complex_ = bool(struct.unpack(e + "I", flags[:4])[0] & 0x0800)
        _, dims_raw = _read_sub(stream, e, src)
        dims = struct.unpack(e + f"{len(dims_raw) // 4}i", dims_raw)
        _, name_raw = _read_sub(stream, e, src)
        if name_raw.rstrip(b"\0").decode("latin1") != self.name:
            return False
        if mx_class not in range(6, 16) or complex_:
            raise DednInputError(src, self.name, "must be a real numeric matrix")
        if len(dims) != 2:
            raise DednInputError(src, self.name, f"must be a 2-D matrix, got dims {dims}")
        mtype, nbytes, small = _read_tag(stream, e, src)
        if mtype not in _MI_DTYPES:
            raise DednInputError(src, self.name, f"unsupported MATLAB data type {mtype}")
        self.shape = (int(dims[0]), int(dims[1]))
        self.dtype = np.dtype(e + _MI_DTYPES[mtype])
        if nbytes != self.shape[0] * self.shape[1] * self.dtype.itemsize:
            raise DednInputError(src, self.name, f"data size {nbytes} B does not match dims {self.shape}")
        self._small = small
        return True

    def iter_columns(self, chunk_cols: int) -> Iterator[np.ndarray]:
        """Yield (rows, c) float arrays of consecutive columns, c <= chunk_cols; memory ~ one chunk."""
        rows, cols = self.shape
        mtype, body, nbytes = self._element
        with open(self.path, "rb") as f:
            f.seek(body)
            stream: _Reader = f if mtype == MI_MATRIX else _Inflater(f, nbytes)
            if mtype == MI_COMPRESSED:
                _read_tag(stream, self.endian, self.source)
            self._read_matrix_header(stream)
            done = 0
            if self._small is not None:
                arr = np.frombuffer(self._small, self.dtype).reshape(cols, rows).T
                yield arr
                return
            while done < cols:
                c = min(chunk_cols, cols - done)
                raw = _read_exact(stream, c * rows * self.dtype.itemsize, self.source)
                yield np.frombuffer(raw, self.dtype).reshape(c, rows).T
                done += c


__all__ = ["MI_COMPRESSED", "MI_MATRIX", "MatrixStream"]

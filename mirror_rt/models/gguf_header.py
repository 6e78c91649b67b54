"""A GGUF file's header (metadata and tensor table) read straight from the file.

``gguf.GGUFReader`` builds a numpy view for every item of every metadata array, which for a
tokenizer's 49k tokens and 49k merges costs seconds; here the same header is decoded with
``struct`` in one pass over a memory map, and tensor data is left in the file (each tensor's
absolute offset is given, for a memory-mapped view). Format: github.com/ggml-org/ggml, docs/gguf.md.
"""
from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (rows first): GGUF lists dimensions innermost first
    ggml_type: int          # gguf.GGMLQuantizationType value
    offset: int             # absolute byte offset of the tensor's data in the file


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    path: str
    version: int
    metadata: dict          # key -> int | float | bool | str | list
    tensors: list[GGUFTensorInfo]
    data_offset: int        # where tensor data starts (aligned)


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header (at byte {self.pos})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self):
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header (a string of {n} bytes at byte {self.pos})")
        raw = self.buf[self.pos:end]
        self.pos = end
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")

    def array(self):
        itype, count = self.unpack("<I"), self.unpack("<Q")
        if itype in _SCALARS:  # one numpy read instead of `count` struct calls
            dtype = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise ValueError(f"{self.path}: truncated GGUF header (an array of {count} at byte {self.pos})")
            values = np.frombuffer(self.buf[self.pos:end], dtype=dtype).tolist()  # a slice: a bytes copy
            self.pos = end
            return values
        if itype == _STRING:
            return self._strings(count)
        return [self.value(itype) for _ in range(count)]

    def _strings(self, count):
        """``count`` length-prefixed strings (a tokenizer's 49k tokens: this loop is the header's cost)."""
        buf, pos, unpack = self.buf, self.pos, struct.Struct("<Q").unpack_from
        raw = [b""] * count
        try:
            for i in range(count):
                (n,) = unpack(buf, pos)
                raw[i] = buf[pos + 8:pos + 8 + n]
                pos += 8 + n
        except struct.error:
            pos = len(buf) + 1
        if pos > len(buf):  # a slice past the end comes back short instead of failing
            raise ValueError(f"{self.path}: truncated GGUF header (a string array at byte {self.pos})")
        self.pos = pos
        return [b.decode("utf-8", errors="replace") for b in raw]


def read_gguf_header(path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file (versions 2 and 3). ValueError names the file and
    the problem for a file that is not GGUF or is cut short; tensor data is not read.

    The last few headers read are kept (keyed by path, size and modification time), so the loader
    and the tokenizer of one file share one read (``forget_gguf_headers`` drops them); treat the
    result as read-only."""
    path = os.path.abspath(os.fspath(path))
    st = os.stat(path)
    return _read_cached(path, st.st_size, st.st_mtime_ns)


def forget_gguf_headers():
    """Drop the kept headers once nothing is to read them again: a tokenizer's metadata (49k tokens
    and 49k merges as Python strings: ~8 MB) would otherwise stay for the whole run."""
    _read_cached.cache_clear()


@functools.lru_cache(maxsize=4)
def _read_cached(path, size, mtime_ns) -> GGUFHeader:
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ValueError(f"{path}: empty file, not a GGUF file") from None
    with mapped:
        return _parse(mapped, path, len(mapped))


def _parse(buf, path, size) -> GGUFHeader:
    if buf[:4] != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {buf[:4]!r})")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    raw = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        raw.append((name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))
    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = -(-cur.pos // align) * align
    tensors = [GGUFTensorInfo(name, shape, gtype, data_offset + off) for name, shape, gtype, off in raw]
    for t in tensors:
        if t.offset > size:
            raise ValueError(f"{path}: truncated GGUF file (tensor {t.name} starts past the end)")
    return GGUFHeader(path, version, metadata, tensors, data_offset)


# --- a stand-in for gguf.GGUFReader -------------------------------------------------------------

class _Field:
    """``GGUFReader.fields[key]``'s ``contents()`` and ``data`` (the list itself for an array)."""

    __slots__ = ("name", "value")

    def __init__(self, name, value):
        self.name, self.value = name, value

    def contents(self):
        return self.value

    @property
    def data(self):
        return self.value if isinstance(self.value, list) else [self.value]


@dataclass(frozen=True, slots=True)
class _Tensor:
    """``GGUFReader.tensors[i]``'s name, shape (GGUF order), tensor_type, data_offset, n_elements and
    data: a view of the file's map, typed for float types, uint8 [rows, bytes per row] for blocks."""
    name: str
    shape: tuple
    tensor_type: int        # GGML type id (gguf.GGMLQuantizationType's value)
    data_offset: int
    n_elements: int
    data: np.ndarray


# GGML type id -> (name, elements per block, bytes per block) for the types the loaders meet most;
# the rest come from the gguf package (imported only then: it takes ~0.15 s to import).
_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
          6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 28: ("F64", 1, 8),
          30: ("BF16", 1, 2)}
_FLOATS = {0: np.float32, 1: np.float16, 28: np.float64}


def _block_size(ggml_type: int) -> tuple[int, int]:
    if ggml_type in _TYPES:
        return _TYPES[ggml_type][1:]
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]


def type_name(ggml_type: int) -> str:
    """"Q4_1" for 3, and so on (the gguf package's name for a type it knows)."""
    if ggml_type in _TYPES:
        return _TYPES[ggml_type][0]
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type).name


class GGUFFile:
    """The parts of ``gguf.GGUFReader`` the loaders use (``fields``, ``tensors``), from
    ``read_gguf_header`` and one copy-on-write memory map of the file (writable views, nothing
    copied until written), without the per-item cost of GGUFReader's metadata parsing."""

    def __init__(self, path):
        header = read_gguf_header(path)
        self.path = header.path
        self.fields = {k: _Field(k, v) for k, v in header.metadata.items()}
        data = np.memmap(header.path, dtype=np.uint8, mode="c")
        self.tensors = []
        for t in header.tensors:
            qtype = t.ggml_type
            block, type_size = _block_size(qtype)
            n = int(np.prod(t.shape)) if t.shape else 1
            inner = t.shape[-1] if t.shape else 1
            if inner % block:
                raise ValueError(f"{path}: tensor {t.name} rows of {inner} do not fill {type_name(qtype)} blocks of {block}")
            nbytes = n // block * type_size
            if t.offset + nbytes > len(data):
                raise ValueError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end)")
            raw = data[t.offset:t.offset + nbytes]
            if qtype in _FLOATS:
                view = raw.view(_FLOATS[qtype]).reshape(t.shape)
            else:
                view = raw.reshape(*t.shape[:-1], inner // block * type_size)
            self.tensors.append(_Tensor(t.name, tuple(reversed(t.shape)), qtype, t.offset, n, view))

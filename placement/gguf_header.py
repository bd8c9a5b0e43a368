"""read_header(): the header of a GGUF file (metadata and tensor table), never its weights.

One reader for the model store (is this file whole and loadable?) and for estimate() (what
does this model need?). It is hardened against truncated, corrupt and crafted files: every
length and count is checked against the file's size and sane bounds before anything is read
or allocated, so a bad file gets a precise GgufFormatError instead of a crash deep inside
llama.cpp or a huge read. Small numeric arrays (per-layer head counts and the like) are
decoded; long ones (the tokenizer's scores and token types) and every string array (its
vocabulary, merges) are summarised as their length, so the result stays small.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Sanity bounds so a corrupt count cannot make us allocate or loop forever.
MAX_STRING_BYTES = 1 << 26
MAX_DIMS = 8
MAX_ARRAY_DEPTH = 4  # arrays of arrays: llama.cpp writes none; recursion must stay shallow
# Numeric arrays up to this many items are decoded: per-layer values have one item per layer
# (a few hundred at most); the tokenizer's per-token arrays (32k+ items) are not needed.
MAX_DECODED_ITEMS = 4096
_CHUNK = 1 << 20  # a header is ~100k small items: read it in large pieces

# Scalar value types of GGUF metadata: type number -> struct format.
_SCALARS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING = 8
_ARRAY = 9


class GgufFormatError(ValueError):
    """The file is not a GGUF model llama.cpp could load, or is damaged; the message says where."""


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    ggml_type: int
    nbytes: int | None  # bytes of its data; None if the ggml type is unknown
    offset: int  # where its data begins, relative to the header's data_offset


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, object]  # key -> value; string and long arrays -> their length
    tensors: dict[str, TensorInfo]  # in file order
    data_offset: int  # where tensor data begins
    data_end: int | None  # end of the last tensor's data; None if a type is unknown

    @property
    def tensor_count(self) -> int:
        return len(self.tensors)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_value(self, key: str, default=None):
        """The architecture's own key, e.g. `llama.block_count` for `block_count`."""
        return self.metadata.get(f"{self.architecture or 'llama'}.{key}", default)


class _Reader:
    """Little-endian reads from a file through a buffer, each checked against the file's size."""

    def __init__(self, f: BinaryIO, size: int):
        self._f = f
        self._size = size
        self._buf = b""
        self._at = 0  # next unread byte in _buf
        self._base = 0  # file position of _buf[0]; the file itself is at _base + len(_buf)

    def pos(self) -> int:
        return self._base + self._at

    def _ends(self, what: str) -> GgufFormatError:
        return GgufFormatError(f"file ends inside the header (while reading {what})")

    def read(self, n: int, what: str) -> bytes:
        end = self._at + n
        if end > len(self._buf):
            if self.pos() + n > self._size:
                raise self._ends(what)
            more = self._f.read(max(end - len(self._buf), _CHUNK))
            self._base += self._at
            self._buf = self._buf[self._at :] + more
            self._at, end = 0, n
            if n > len(self._buf):  # the file shrank since we took its size
                raise self._ends(what)
        data = self._buf[self._at : end]
        self._at = end
        return data

    def skip(self, n: int, what: str) -> None:
        if self.pos() + n > self._size:
            raise self._ends(what)
        if self._at + n <= len(self._buf):
            self._at += n
            return
        self._base = self.pos() + n
        self._buf, self._at = b"", 0
        self._f.seek(self._base)

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string_length(self, what: str) -> int:
        n = self.unpack("<Q", what)
        if n > MAX_STRING_BYTES or n > self._size:
            raise GgufFormatError(f"implausible string length {n} in {what}")
        return n

    def string(self, what: str) -> str:
        return self.read(self.string_length(what), what).decode("utf-8", errors="replace")

    def new_name(self, seen: dict, what: str) -> str:
        """A metadata key or tensor name not in `seen`: llama.cpp refuses duplicates."""
        name = self.string(f"{what} #{len(seen)}")
        if name in seen:
            raise GgufFormatError(f"duplicate {what} {name!r}")
        return name

    def value(self, vtype: int, what: str, depth: int = 0) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise GgufFormatError(f"unknown metadata value type {vtype} in {what}")
        if depth >= MAX_ARRAY_DEPTH:
            raise GgufFormatError(f"arrays nested more than {MAX_ARRAY_DEPTH} deep in {what}")
        item_type = self.unpack("<I", what)
        count = self.unpack("<Q", what)
        if count > self._size:
            raise GgufFormatError(f"implausible array length {count} in {what}")
        if item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            nbytes = count * struct.calcsize(fmt)
            if count <= MAX_DECODED_ITEMS:
                return list(struct.unpack(f"<{count}{fmt[1]}", self.read(nbytes, what)))
            self.skip(nbytes, what)  # fixed-size items: skip without decoding
        elif item_type == _STRING:
            for _ in range(count):
                self.skip(self.string_length(what), what)
        elif item_type == _ARRAY:
            for _ in range(count):
                self.value(_ARRAY, what, depth + 1)
        else:
            raise GgufFormatError(f"unknown array item type {item_type} in {what}")
        return count


def tensor_nbytes(ggml_type: int, n_elements: int) -> int | None:
    """Bytes of a tensor's data, or None for a ggml type the gguf package does not know."""
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None
    return n_elements // block_size * type_size


def read_header(path: str | os.PathLike, *, check_data: bool = True) -> GgufHeader:
    """Parse the header of `path`; raise GgufFormatError (or OSError) if it is not whole.

    With `check_data` the file must also hold all the tensor data its header describes (a
    truncated download fails here); estimate() passes False, as it reads header-only files.
    """
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        r = _Reader(f, size)
        if size < 4 or r.read(4, "magic") != GGUF_MAGIC:
            raise GgufFormatError("not a GGUF file (the first bytes are not 'GGUF')")
        version = r.unpack("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            raise GgufFormatError(f"unsupported GGUF version {version}")
        tensor_count = r.unpack("<Q", "tensor count")
        kv_count = r.unpack("<Q", "metadata count")
        if tensor_count > size or kv_count > size:
            raise GgufFormatError(f"implausible counts: {tensor_count} tensors, {kv_count} keys")
        metadata: dict[str, object] = {}
        for _ in range(kv_count):
            key = r.new_name(metadata, "metadata key")
            vtype = r.unpack("<I", f"type of {key!r}")
            metadata[key] = r.value(vtype, repr(key))
        tensors: dict[str, TensorInfo] = {}
        for _ in range(tensor_count):
            name = r.new_name(tensors, "tensor name")
            n_dims = r.unpack("<I", f"dims of {name!r}")
            if n_dims > MAX_DIMS:
                raise GgufFormatError(f"implausible dimension count {n_dims} for {name!r}")
            shape = tuple(r.unpack("<Q", f"shape of {name!r}") for _ in range(n_dims))
            ggml_type = r.unpack("<I", f"type of {name!r}")
            offset = r.unpack("<Q", f"offset of {name!r}")
            n_elements = 1
            for d in shape:
                n_elements *= d
            tensors[name] = TensorInfo(
                shape, ggml_type, tensor_nbytes(ggml_type, n_elements), offset
            )
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise GgufFormatError(f"bad general.alignment {alignment!r}")
        data_offset = -(-r.pos() // alignment) * alignment

    data_end: int | None = data_offset
    for name, tensor in tensors.items():
        start = data_offset + tensor.offset
        if check_data and start > size:
            raise GgufFormatError(f"file is truncated: tensor {name!r} starts past its end")
        if tensor.nbytes is None:
            data_end = None
        elif data_end is not None:
            data_end = max(data_end, start + tensor.nbytes)
    if check_data and data_end is not None and data_end > size:
        raise GgufFormatError(
            f"file is truncated: tensor data needs {data_end} bytes, the file has {size}"
        )
    return GgufHeader(version, metadata, tensors, data_offset, data_end)

"""Check a GGUF file's structure in Python before MLX's native reader sees it.

MLX's GGUF reader (gguflib, C) trusts the file: a string length, array count or tensor offset that
points past the end of the file makes it read out of bounds, and the process dies with SIGSEGV and
no message (e.g. a valid header followed by random bytes, or a truncated download). ``check_gguf``
walks the same structure with bounds checks (the spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md):
header, every key/value pair, every tensor's name, shape, type and offset, and that every tensor's
bytes lie inside the file. What passes can be parsed without reading outside the file; the tensor
*values* are not checked (random numbers are still numbers).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# value types: id -> struct format (scalars), or "string" / "array"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (elements per block, bytes per block)
GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
}
MAX_DIMS = 4
_U64 = struct.Struct("<Q")


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF file; the message says where it broke."""


class _Reader:
    def __init__(self, data: mmap.mmap | bytes, path: Path) -> None:
        self.data, self.pos, self.path, self.size = data, 0, path, len(data)

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"cannot read {self.path} as GGUF: {what} (at byte {self.pos} of "
                               f"{self.size}; truncated or damaged?)")

    def unpack(self, fmt: str) -> int | float | bool:
        n = struct.calcsize("<" + fmt)
        if self.pos + n > self.size:
            raise self.fail("unexpected end of file")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += n
        return value

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} of {n} bytes runs past the end of the file")
        self.pos += n

    def string(self, what: str) -> str:
        n = int(self.unpack("Q"))
        if self.pos + n > self.size:
            raise self.fail(f"{what} claims {n} bytes, past the end of the file")
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def _skip_strings(self, count: int, key: str) -> None:
        """Skip ``count`` strings (length-prefixed), bounds-checked (a tight loop: tokenizers hold ~100k)."""
        data, size, pos, length = self.data, self.size, self.pos, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            pos += 8 + length(data, pos)[0]
            if pos > size:
                break
        else:
            self.pos = pos
            return
        self.pos = min(pos, size)
        raise self.fail(f"an item of array {key!r} runs past the end of the file")

    def value(self, kind: int, key: str, depth: int = 0) -> int | None:
        """Skip one value of type ``kind``; return it when it is an integer scalar (for general.alignment)."""
        if kind in _SCALARS:
            value = self.unpack(_SCALARS[kind])
            return value if isinstance(value, int) and not isinstance(value, bool) else None
        if kind == _STRING:
            self.string(f"string value of {key!r}")
            return None
        if kind == _ARRAY and depth == 0:
            inner, count = int(self.unpack("I")), int(self.unpack("Q"))
            if inner in _SCALARS:
                self.skip(count * struct.calcsize("<" + _SCALARS[inner]), f"array {key!r}")
            elif inner == _STRING:
                if count > (self.size - self.pos) // 8:
                    raise self.fail(f"array {key!r} claims {count} strings, more than the file can hold")
                self._skip_strings(count, key)
            else:
                raise self.fail(f"array {key!r} has unknown item type {inner}")
            return None
        raise self.fail(f"value of {key!r} has unknown type {kind}")


def check_gguf(path: str | Path) -> None:
    """Raise ``GGUFFormatError`` unless ``path`` is a structurally sound GGUF file (see the module docstring)."""
    path = Path(path)
    with path.open("rb") as f:
        if path.stat().st_size < 24:
            raise GGUFFormatError(f"cannot read {path} as GGUF: {path.stat().st_size} bytes, shorter than a header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check(_Reader(data, path))


def _check(r: _Reader) -> None:
    if r.data[:4] != MAGIC:
        raise GGUFFormatError(f"cannot read {r.path} as GGUF: it starts with {bytes(r.data[:4])!r}, not b'GGUF'")
    r.pos = 4
    version = r.unpack("I")
    if version not in VERSIONS:
        raise r.fail(f"unsupported GGUF version {version} (this reader knows {VERSIONS})")
    n_tensors, n_kv = int(r.unpack("Q")), int(r.unpack("Q"))
    if n_kv > r.size // 13 or n_tensors > r.size // 29:  # each entry takes at least that many bytes
        raise r.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = r.string("a metadata key")
        value = r.value(int(r.unpack("I")), key)
        if key == "general.alignment":
            if not value or value & (value - 1):
                raise r.fail(f"general.alignment is {value}, not a power of two")
            alignment = value
    tensors = []
    for _ in range(n_tensors):
        name = r.string("a tensor name")
        n_dims = int(r.unpack("I"))
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [int(r.unpack("Q")) for _ in range(n_dims)]
        kind, offset = int(r.unpack("I")), int(r.unpack("Q"))
        if kind not in GGML_TYPES:
            raise r.fail(f"tensor {name!r} has unknown type {kind}")
        block, block_bytes = GGML_TYPES[kind]
        count = 1
        for d in dims:
            if d < 1:
                raise r.fail(f"tensor {name!r} has a dimension of {d}")
            count *= d
        if dims[0] % block:
            raise r.fail(f"tensor {name!r}: its first dimension {dims[0]} is not a multiple of the type's block {block}")
        tensors.append((name, offset, count // block * block_bytes))
    data_start = -(-r.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        if offset % alignment:
            raise r.fail(f"tensor {name!r} starts at offset {offset}, not a multiple of {alignment}")
        end = data_start + offset + nbytes
        if end > r.size:
            raise GGUFFormatError(f"cannot read {r.path} as GGUF: the data of tensor {name!r} ends at byte {end}, "
                                  f"past the end of the file ({r.size} bytes): the file is truncated")


__all__ = ["GGML_TYPES", "GGUFFormatError", "check_gguf"]

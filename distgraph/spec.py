"""The graph IR as plain data: pydantic models that round-trip through JSON.

A node is ``name, op, inputs (names), attrs`` plus its inferred ``shape`` and ``dtype``. Arrays
(parameter values, array constants) are stored as base64 of their little-endian bytes with an
explicit dtype from an allow-list, so loading a spec never unpickles anything.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import stat
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SpecError

#: dtypes a spec may carry; object, void and string dtypes are refused.
ALLOWED_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
    + ["float16", "float32", "float64"]
)
#: Largest JSON text ``GraphSpec.from_json`` accepts, to refuse oversized specs before parsing.
MAX_SPEC_BYTES = 512 * 1024 * 1024
#: Most JSON values (counted from the text's commas and brackets before parsing) a spec may
#: hold: parsed, a value takes up to ~25 times its text, so the byte limit alone would let a
#: 200 MiB spec of tiny values need gigabytes while loading.
MAX_SPEC_VALUES = 8_000_000
#: Most nodes a spec may hold (a loaded node costs ~1.5 KB).
MAX_SPEC_NODES = 1_000_000
#: Names users give: no ':' (reserved for generated backward nodes) and no whitespace.
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/\[\]]*$")
#: Names autodiff gives backward nodes: ``grad:NAME`` and ``vjp:NAME:ARGNUM``.
GENERATED_NAME_PATTERN = re.compile(
    r"^(?:grad:(?P<grad>.+)|vjp:(?P<vjp>.+):(?:0|[1-9][0-9]{0,5}))$"
)
#: Longest name a user may give a node (generated gradient names add a few characters).
MAX_NAME_LENGTH = 256
#: Most dimensions a declared shape may have (numpy's own limit is 64; ops add a few).
MAX_NDIM = 32
#: Largest declared dimension, and largest element count of a declared shape (batch
#: dimensions counted as 1): 2**36 float64 elements are 512 GiB, beyond any one process, and
#: byte counts of such shapes times any batch size stay far from int64 overflow.
MAX_DIM = 2**36

Shape = tuple[int | None, ...]
#: What base64 text looks like (checked without decoding when its length is already wrong).
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def name_problem(name: Any) -> str | None:
    """Why ``name`` is not a valid user-given node name, or None when it is.

    Letters, digits, ``_ . - / [ ]``, starting with a letter or ``_``, at most
    :data:`MAX_NAME_LENGTH` characters; ``/``-separated parts are neither empty nor ``.``/``..``
    (names may become paths or keys elsewhere), and ``:`` is reserved for gradient nodes.
    """
    if not isinstance(name, str):
        return f"a node name must be a string, got {type(name).__name__}"
    if len(name) > MAX_NAME_LENGTH:
        return f"name of {len(name)} characters is longer than {MAX_NAME_LENGTH}"
    if not NAME_PATTERN.match(name):
        return (
            f"invalid node name {name!r}: use letters, digits, '_', '.', '-', '/', '[', ']' "
            "and start with a letter or '_' (':' is reserved for generated gradient nodes)"
        )
    if any(part in ("", ".", "..") for part in name.split("/")):
        return f"invalid node name {name!r}: '/'-separated parts must not be empty, '.' or '..'"
    return None


def generated_name_problem(name: str) -> str | None:
    """Why ``name`` is not a name autodiff generates (``grad:X``, ``vjp:X:N``), or None."""
    m = GENERATED_NAME_PATTERN.match(name)
    if m is None:
        return (
            f"invalid backward node name {name!r}: autodiff names its nodes 'grad:NAME' and "
            "'vjp:NAME:ARGNUM'"
        )
    return name_problem(m.group("grad") or m.group("vjp"))


def shape_problem(shape: Sequence[Any], batch: bool = True) -> str | None:
    """Why a declared shape is out of bounds, or None (``batch``: ``None`` dims allowed)."""
    if len(shape) > MAX_NDIM:
        return f"shape has {len(shape)} dimensions, more than the limit of {MAX_NDIM}"
    count = 1
    for d in shape:
        if d is None and batch:
            continue
        if not isinstance(d, int) or isinstance(d, bool):
            return f"dimension {d!r} is not an int" + (" or None" if batch else "")
        if d < 0:
            return f"shape {list(shape)} has a negative dimension"
        if d > MAX_DIM:
            return f"dimension {d} is larger than the limit of {MAX_DIM} (2**36)"
        count *= d
    if count > MAX_DIM:
        return (
            f"shape {list(shape)} holds {count} elements, more than the limit of {MAX_DIM} (2**36)"
        )
    return None


class ArrayData(BaseModel):
    """An ndarray as JSON: dtype, shape and base64 of its little-endian bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str
    shape: list[int]
    data: str

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in ALLOWED_DTYPES:
            raise ValueError(f"dtype {v!r} is not allowed (allowed: {sorted(ALLOWED_DTYPES)})")
        return v

    @field_validator("shape")
    @classmethod
    def _bounded(cls, v: list[int]) -> list[int]:
        problem = shape_problem(v, batch=False)
        if problem:
            raise ValueError(problem)
        return v

    @classmethod
    def from_numpy(cls, array: Any) -> ArrayData:
        """Encode an array (or scalar) exactly."""
        a = np.asarray(array)
        if a.dtype.name not in ALLOWED_DTYPES:
            raise SpecError(f"cannot serialize dtype {a.dtype.name!r}")
        raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        return cls.model_construct(
            dtype=a.dtype.name, shape=list(a.shape), data=base64.b64encode(raw).decode("ascii")
        )

    def to_numpy(self) -> np.ndarray:
        """Decode to a fresh writable array in native byte order."""
        dt = np.dtype(self.dtype).newbyteorder("<")
        count = math.prod(self.shape)  # Python ints: a huge shape cannot overflow
        # Compare the text's length with the declared shape before decoding anything.
        want = 4 * -(-count * dt.itemsize // 3)
        if len(self.data) != want:
            if len(self.data) % 4 or not _BASE64.fullmatch(self.data):
                raise SpecError(
                    f"array data is not valid base64 ({len(self.data)} characters); shape "
                    f"{self.shape} of {self.dtype} needs {want}"
                )
            held = len(self.data) // 4 * 3 - len(self.data[-2:]) + len(self.data[-2:].rstrip("="))
            raise SpecError(
                f"array data holds {held} bytes, shape {self.shape} of {self.dtype} "
                f"needs {count * dt.itemsize}"
            )
        try:
            raw = base64.b64decode(self.data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as e:
            raise SpecError(f"array data is not valid base64: {e}") from None
        if len(raw) != count * dt.itemsize:
            raise SpecError(
                f"array data holds {len(raw)} bytes, shape {self.shape} of {self.dtype} "
                f"needs {count * dt.itemsize}"
            )
        return np.frombuffer(raw, dtype=dt).astype(np.dtype(self.dtype)).reshape(self.shape)


class NodeSpec(BaseModel):
    """One node: an op applied to named inputs, with JSON-able attributes."""

    model_config = ConfigDict(extra="forbid")

    name: str
    op: str
    inputs: list[str] = Field(default_factory=list)
    attrs: dict[str, Any] = Field(default_factory=dict)
    shape: list[int | None] | None = None
    dtype: str | None = None
    phase: Literal["forward", "backward"] = "forward"
    #: For a backward node: the forward node whose gradient rule produced it (for placement).
    origin: str | None = None

    # Names are checked where a spec becomes a graph (Graph.from_spec), against ``phase``:
    # forward nodes carry names a user may give, backward nodes the ones autodiff generates.

    @field_validator("shape")
    @classmethod
    def _bounded_shape(cls, v: list[int | None] | None) -> list[int | None] | None:
        if v is not None:
            problem = shape_problem(v)
            if problem:
                raise ValueError(problem)
        return v


_NODE_FIELDS = frozenset(NodeSpec.model_fields)
# Shared by every node made here, so a 100,000-node graph does not hold 100,000 copies of each
# for the cyclic GC to rescan: node records are treated as immutable (model_copy copies these).
_FIELDS_SET = set(_NODE_FIELDS)
_NO_ATTRS: dict[str, Any] = {}
_SHAPES: dict[tuple, list[int | None]] = {}
# The slot setters of BaseModel, called directly: what ``object.__setattr__`` ends up doing,
# without looking the attribute up on every call (which dominated making a node).
_new_node = NodeSpec.__new__
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def intern_shape(shape: Sequence[int | None]) -> list[int | None]:
    """The one shared list equal to ``shape`` (any sequence): equal shapes share one list."""
    key = tuple(shape)
    hit = _SHAPES.get(key)
    if hit is None:
        hit = _SHAPES[key] = list(key)
    return hit


def make_node(
    name: str,
    op: str,
    inputs: list[str],
    attrs: dict[str, Any],
    shape: Sequence[int | None] | None,
    dtype: str | None,
    phase: str = "forward",
    origin: str | None = None,
) -> NodeSpec:
    """Build a NodeSpec from trusted values without validation.

    What ``NodeSpec.model_construct`` does, minus its per-field default and alias handling,
    which dominated building 100,000-node graphs. ``shape`` is any sequence (or None); equal
    shapes share one list, and empty attrs one dict: node records are never modified in place.
    Specs read from files still go through full validation (``GraphSpec.from_json``); a test
    keeps this equal to ``model_construct``.
    """
    node = _new_node(NodeSpec)
    _set_dict(
        node,
        {
            "name": name,
            "op": op,
            "inputs": inputs,
            "attrs": attrs or _NO_ATTRS,
            "shape": None if shape is None else intern_shape(shape),
            "dtype": dtype,
            "phase": phase,
            "origin": origin,
        },
    )
    _set_fields_set(node, _FIELDS_SET)
    _set_extra(node, None)
    _set_private(node, None)
    return node


Constant = ArrayData | float | int | bool


class GraphSpec(BaseModel):
    """A whole graph: nodes in a topological order, outputs, parameter values, constants.

    After autodiff, ``grads`` maps each differentiated input/param to the node holding the
    gradient of ``grad_of`` with respect to it.
    """

    # Non-finite scalar constants are written as "NaN"/"Infinity" strings: JSON has no NaN, and
    # writing null (pydantic's default) would not load back.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    format: Literal["distgraph.graph/1"] = "distgraph.graph/1"
    nodes: list[NodeSpec]
    outputs: list[str] = Field(default_factory=list)
    params: dict[str, ArrayData] = Field(default_factory=dict)
    constants: dict[str, Constant] = Field(default_factory=dict)
    grads: dict[str, str] = Field(default_factory=dict)
    grad_of: str | None = None

    def to_json(self, indent: int | None = None) -> str:
        """Serialize to JSON text."""
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(
        cls,
        text: str | bytes,
        max_bytes: int = MAX_SPEC_BYTES,
        max_values: int = MAX_SPEC_VALUES,
        max_nodes: int = MAX_SPEC_NODES,
    ) -> GraphSpec:
        """Parse and validate JSON text; errors name the field path that is wrong.

        Refused before parsing: more than ``max_bytes`` of text or (roughly) ``max_values``
        JSON values; after parsing, more than ``max_nodes`` nodes."""
        if len(text) > max_bytes:
            raise SpecError(
                f"spec is {len(text)} bytes, larger than the limit of {max_bytes} "
                "(raise it with max_bytes=)"
            )
        if isinstance(text, bytes):
            values = text.count(b",") + text.count(b"[") + text.count(b"{")
        else:
            values = text.count(",") + text.count("[") + text.count("{")
        if values > max_values:
            raise SpecError(
                f"spec holds about {values} JSON values, more than the limit of {max_values} "
                "(raise it with max_values=)"
            )
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SpecError(f"spec is not valid JSON: {e}") from None
        except RecursionError:
            raise SpecError("spec is not valid JSON: nested too deeply") from None
        nodes = data.get("nodes") if isinstance(data, dict) else None
        if isinstance(nodes, list) and len(nodes) > max_nodes:
            raise SpecError(
                f"nodes: the spec has {len(nodes)} nodes, more than the limit of {max_nodes} "
                "(raise it with max_nodes=)"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(format_validation_error(e)) from None
        except RecursionError:
            raise SpecError("invalid graph spec: values nested too deeply") from None


def read_spec_file(path: str | os.PathLike[str], max_bytes: int = MAX_SPEC_BYTES) -> bytes:
    """The bytes of a spec file, refused (SpecError) beyond ``max_bytes`` while reading.

    A regular file's size is checked before reading; a pipe is read at most ``max_bytes + 1``
    bytes; devices (``/dev/zero``), sockets and directories are refused without reading.
    """
    name = os.fspath(path)
    try:
        # A named pipe waits for its writer, as ``cat`` would; anything else is opened without
        # blocking, so a device is refused below, unread.
        is_fifo = stat.S_ISFIFO(os.stat(name).st_mode)
        fd = os.open(name, os.O_RDONLY | (0 if is_fifo else getattr(os, "O_NONBLOCK", 0)))
    except FileNotFoundError:
        raise SpecError(f"spec file {name!r} does not exist") from None
    except OSError as e:
        raise SpecError(f"cannot open spec file {name!r}: {e.strerror or e}") from None
    info = os.fstat(fd)
    problem = None
    if stat.S_ISREG(info.st_mode):
        if info.st_size > max_bytes:
            problem = f"is {info.st_size} bytes, larger than the limit of {max_bytes}"
    elif stat.S_ISDIR(info.st_mode):
        problem = "is a directory"
    elif not stat.S_ISFIFO(info.st_mode):
        problem = "is not a regular file or a pipe"
    if problem is not None:
        os.close(fd)
        raise SpecError(f"spec file {name!r} {problem}")
    with os.fdopen(fd, "rb", buffering=0) as f:
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:  # the file may grow (or be a pipe): never past the limit
            try:
                chunk = f.read(min(1 << 20, max_bytes + 1 - total))
            except OSError as e:
                raise SpecError(f"cannot read spec file {name!r}: {e.strerror or e}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise SpecError(f"spec file {name!r} is larger than the limit of {max_bytes} bytes")
        return b"".join(chunks)


def format_validation_error(e: ValidationError) -> str:
    """One line per problem, each starting with the dotted field path (``nodes.3.op``)."""
    lines = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"{path}: {err['msg']}")
    return "invalid graph spec:\n  " + "\n  ".join(lines)


def encode_constant(value: Any) -> Constant:
    """Python scalars stay scalars (so numpy keeps treating them as weakly typed)."""
    if isinstance(value, (bool, int, float)):
        return value
    return ArrayData.from_numpy(value)


def decode_constant(value: Constant) -> Any:
    """Inverse of :func:`encode_constant`."""
    if isinstance(value, ArrayData):
        return value.to_numpy()
    if isinstance(value, dict):  # a constant validated from JSON before model conversion
        return ArrayData.model_validate(value).to_numpy()
    return value

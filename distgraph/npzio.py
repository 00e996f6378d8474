"""Read ``.npz`` files that nobody vouches for: every limit is checked before any data is read.

``np.load`` decompresses a member before anyone can look at its shape, and allocates whatever
its header claims: a 2 MB file can ask for gigabytes. :func:`read_npz` reads, for each member,
the zip directory's uncompressed size and the ``.npy`` header (dtype, shape) first, and refuses
object or unusual dtypes, a header that disagrees with the member's size, names or shapes that
do not match ``expect``, and more than ``max_bytes`` in all, before decompressing any data.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
from numpy.lib import format as npy_format

from .errors import DistgraphError, FeedError

#: Default ceiling on the bytes all members of one file may hold once read (1 GiB).
MAX_BYTES = 1 << 30
#: At most this many members (a zip of a million empty members is a bomb of its own).
MAX_MEMBERS = 10_000
#: Bytes a ``.npy`` header may take (numpy's own limit on the header text is 10,000).
_HEADER_SLACK = 1 << 16
#: Array kinds a feed or a checkpoint may hold: bool, signed and unsigned ints, floats.
ALLOWED_KINDS = frozenset("biuf")

#: name -> (shape with ``None`` for any size along that axis, dtype or ``None`` for any).
Expect = Mapping[str, tuple[Sequence[int | None] | None, Any]]


def read_npz(
    path: str | os.PathLike,
    *,
    max_bytes: int = MAX_BYTES,
    expect: Expect | None = None,
    require_all: bool = True,
    error: type[DistgraphError] = FeedError,
    what: str = "feeds file",
) -> dict[str, np.ndarray]:
    """The arrays of ``path`` by name, each checked before its data is read.

    ``max_bytes`` bounds the decompressed size of all members together; ``expect`` (if given)
    lists the only names allowed and each one's shape and dtype; every member named in it must
    be present unless ``require_all=False``. Failures raise ``error`` naming the file and the
    member.
    """
    where = f"{what} {os.fspath(path)}"
    if not os.path.exists(path):
        raise error(f"{where} does not exist")
    if not os.path.isfile(path):
        raise error(f"{where} is not a file (a directory?); give an .npz file")
    with open(path, "rb") as raw:
        if raw.read(6) == b"\x93NUMPY":
            raise error(
                f"{where} is a single .npy array, not an .npz archive; "
                "save it with np.savez(path, name=array)"
            )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise error(f"{where} is not an .npz archive (np.savez writes one): {e}") from None
    with zf:
        infos = zf.infolist()
        members = _check_directory(infos, max_bytes, where, error)
        headers = {name: _read_header(zf, info, where, error) for name, info in members.items()}
        _check_expect(headers, expect, require_all, where, error)
        total = sum(nbytes for _, _, _, nbytes in headers.values())
        if total > max_bytes:
            raise error(
                f"{where}: its arrays hold {total:,} bytes in all, more than the limit of "
                f"{max_bytes:,} (raise max_bytes if the file is trusted)"
            )
        return {
            name: _read_data(zf, members[name], headers[name], where, error) for name in members
        }


def _check_directory(
    infos: list[zipfile.ZipInfo], max_bytes: int, where: str, error: type[DistgraphError]
) -> dict[str, zipfile.ZipInfo]:
    """Names and sizes from the zip directory alone (nothing decompressed yet)."""
    if len(infos) > MAX_MEMBERS:
        raise error(f"{where} has {len(infos):,} members, more than {MAX_MEMBERS:,}")
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise error(f"{where}: member {info.filename!r} is not an .npy array")
        name = info.filename[: -len(".npy")]
        if name in members:
            raise error(f"{where}: member {info.filename!r} appears twice")
        if info.file_size > max_bytes + _HEADER_SLACK:
            raise error(
                f"{where}: member {name!r} unpacks to {info.file_size:,} bytes, more than the "
                f"limit of {max_bytes:,} (raise max_bytes if the file is trusted)"
            )
        total += info.file_size
        members[name] = info
    if total > max_bytes + _HEADER_SLACK * len(members):
        raise error(
            f"{where}: its members unpack to {total:,} bytes in all, more than the limit of "
            f"{max_bytes:,} (raise max_bytes if the file is trusted)"
        )
    return members


def _read_header(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, error: type[DistgraphError]
) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data bytes) of one member, checked against its size."""
    name = info.filename[: -len(".npy")]
    try:
        with zf.open(info) as fp:
            version = npy_format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(fp)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fp.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise error(f"{where}: member {name!r} has no valid .npy header: {e}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise error(
            f"{where}: member {name!r} has dtype {dtype}, which holds Python objects or records; "
            "only plain numeric arrays are read"
        )
    if dtype.kind not in ALLOWED_KINDS:
        raise error(
            f"{where}: member {name!r} has dtype {dtype}; allowed: bool, integer and float arrays"
        )
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise error(f"{where}: member {name!r} has an invalid shape {shape!r}")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if nbytes != info.file_size - offset:
        raise error(
            f"{where}: member {name!r} claims shape {shape} of {dtype} ({nbytes:,} bytes) but "
            f"holds {info.file_size - offset:,} bytes of data; the file is corrupt or forged"
        )
    return tuple(shape), bool(fortran), dtype, nbytes


def _check_expect(
    headers: Mapping[str, tuple[tuple[int, ...], bool, np.dtype, int]],
    expect: Expect | None,
    require_all: bool,
    where: str,
    error: type[DistgraphError],
) -> None:
    if expect is None:
        return
    unknown = sorted(set(headers) - set(expect))
    if unknown:
        raise error(f"{where}: unexpected members {unknown}; expected {sorted(expect)}")
    missing = sorted(set(expect) - set(headers))
    if missing and require_all:
        raise error(f"{where}: missing members {missing}")
    for name, (want_shape, want_dtype) in expect.items():
        if name not in headers:
            continue
        shape, _, dtype, _ = headers[name]
        if want_shape is not None and (
            len(shape) != len(want_shape)
            or any(w is not None and w != s for w, s in zip(want_shape, shape))
        ):
            want = tuple("?" if w is None else w for w in want_shape)
            raise error(f"{where}: member {name!r} has shape {shape}, expected {want}")
        if want_dtype is not None and dtype != np.dtype(want_dtype):
            raise error(f"{where}: member {name!r} has dtype {dtype}, expected {want_dtype}")


def _read_data(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    header: tuple[tuple[int, ...], bool, np.dtype, int],
    where: str,
    error: type[DistgraphError],
) -> np.ndarray:
    """Read one member's data into a buffer of exactly the checked size."""
    shape, fortran, dtype, nbytes = header
    name = info.filename[: -len(".npy")]
    buf = bytearray(nbytes)
    view = memoryview(buf)
    try:
        # Opened for reading it is a ZipExtFile, a BufferedIOBase (typeshed says only IO[bytes]).
        with cast(io.BufferedIOBase, zf.open(info)) as fp:
            fp.read(info.file_size - nbytes)  # the header, already checked
            got = 0
            while got < nbytes:
                n = fp.readinto(view[got:])
                if not n:
                    break
                got += n
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise error(f"{where}: member {name!r} is unreadable: {e}") from None
    if got != nbytes:
        raise error(f"{where}: member {name!r} ends after {got:,} of {nbytes:,} bytes")
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return arr.astype(dtype.newbyteorder("="), copy=False)

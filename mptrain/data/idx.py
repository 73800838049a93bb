"""Reader for the IDX files that MNIST and Fashion-MNIST ship in (gzip or plain).

torchvision's own reader does not open ``.gz`` files, and the Debian package
``dataset-fashion-mnist`` ships only those, so this small one does both.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from mptrain.errors import UserError

IDX_UBYTE = 0x08  # the only element type these datasets use


def read_idx(path: str | Path) -> np.ndarray:
    """Return the uint8 array stored in an IDX file; corrupt files raise UserError naming the file."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; truncated gzip is EOFError
        raise UserError(f"cannot read IDX file {path}: {err}; delete it and fetch the dataset again") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE or data[3] == 0:
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic number); delete it and fetch it again")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated (incomplete IDX header); delete it and fetch it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise UserError(
            f"{path} holds {len(data) - header} data bytes but its header {shape} says {expected}; "
            "delete it and fetch it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """The gzip or plain copy of ``stem`` (e.g. ``train-images-idx3-ubyte``) in ``directory``, if any."""
    for name in (stem + ".gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz); used to build test fixtures."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())

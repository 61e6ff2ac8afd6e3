"""Atomic file writes (temp file, fsync, rename) shared by nncore checkpoints and the worker's storage."""
from __future__ import annotations

import contextlib
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], Any],
                 fence: Callable[[], None] | None = None) -> None:
    """Write through ``write(fileobj)`` into ``<path>.<random>.tmp``, fsync it, then rename it over ``path``.

    Readers never see a partial file; on any error the temp file is removed and ``path`` is untouched. The
    temp name is unique per call, so two writers of one file never write through the same temp file. ``fence``
    runs right before the rename and may raise to forbid it (a writer that lost ownership of the file).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if fence is not None:
            fence()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # on a read-only or vanished folder, keep the first error, not this one
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray],
                     fence: Callable[[], None] | None = None) -> None:
    """Save ``arrays`` as an uncompressed ``.npz`` atomically, refusing object arrays (no pickle); ``fence`` as
    in ``atomic_write``."""
    atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **arrays), fence)


def check_npz_sizes(path: str | os.PathLike[str]) -> None:
    """ValueError naming the array when a member of the ``.npz`` at ``path`` has a header claiming more data than
    the member holds (a forged header would make NumPy allocate it all before reading); a non-zip file passes."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f, max_header_size=10_000)
                claimed, held = math.prod(shape) * dtype.itemsize, info.file_size - f.tell()
                if not dtype.hasobject and claimed > held:
                    raise ValueError(f"array '{info.filename.removesuffix('.npy')}' claims shape {shape} "
                                     f"({claimed:,} bytes) but holds {held:,} bytes")

"""Crash-safe file output: nothing partial is ever left under a final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def temporary_path_for(final_path: str | os.PathLike) -> Path:
    """A unique temporary name in the same directory (so the final rename is atomic)."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    os.close(fd)
    # mkstemp creates 0600; outputs should get the usual permissions (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def commit_file(tmp_path: str | os.PathLike, final_path: str | os.PathLike) -> None:
    """fsync then atomically rename ``tmp_path`` to ``final_path``."""
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, final_path)


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``final_path``, on error removed.

    Use for writers that want a path (pyarrow, numpy, matplotlib)::

        with atomic_path("out/meta.parquet") as tmp:
            pq.write_table(table, tmp)
    """
    tmp = temporary_path_for(final_path)
    try:
        yield tmp
        commit_file(tmp, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(final_path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """``open()`` that writes to a temporary file renamed into place only on success."""
    with atomic_path(final_path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def save_png(fig, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write a matplotlib figure as a PNG under a temporary name, rename it into place, and
    close the figure. Returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path

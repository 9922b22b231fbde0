"""What is in a preprocessed dataset: documents and tokens per language/source/topic, samples."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megatron_syne.data.metadata import read_metadata
from megatron_syne.preprocess.indexed import bin_path, check_bin_size, read_index


@dataclass
class GroupCounts:
    column: str
    rows: list[tuple[str, int, int]]  # (value, documents, tokens), most tokens first

    def format(self) -> str:
        total_docs = sum(r[1] for r in self.rows) or 1
        total_tokens = sum(r[2] for r in self.rows) or 1
        width = max([len(self.column)] + [len(r[0]) for r in self.rows])
        lines = [f"{self.column:<{width}}  {'docs':>10} {'%':>6}  {'tokens':>13} {'%':>6}"]
        for value, docs, tokens in self.rows:
            lines.append(
                f"{value:<{width}}  {docs:>10,} {100 * docs / total_docs:>5.1f}%  "
                f"{tokens:>13,} {100 * tokens / total_tokens:>5.1f}%"
            )
        return "\n".join(lines)


def group_counts(table: pa.Table, column: str) -> GroupCounts:
    """Documents and tokens (``n_tokens``, EOD included) per value of ``column`` (null: "-")."""
    values = pc.fill_null(table.column(column).cast(pa.string()), "-")
    grouped = (
        pa.table({"value": values, "n_tokens": table.column("n_tokens")})
        .group_by("value")
        .aggregate([("n_tokens", "count"), ("n_tokens", "sum")])
    )
    rows = sorted(
        zip(
            grouped.column("value").to_pylist(),
            grouped.column("n_tokens_count").to_pylist(),
            grouped.column("n_tokens_sum").to_pylist(),
        ),
        key=lambda r: (-r[2], r[0]),
    )
    return GroupCounts(column, rows)


def document_tokens(prefix: str | os.PathLike, index: int) -> np.ndarray:
    """Token ids of document ``index`` (0-based), read through the index without loading all."""
    ix = read_index(prefix)
    check_bin_size(prefix, ix)
    start = int(ix.document_indices[index])
    length = int(ix.sequence_lengths[start])
    data = np.memmap(bin_path(prefix), dtype=ix.dtype, mode="r")
    offset = int(ix.sequence_pointers[start]) // np.dtype(ix.dtype).itemsize
    return np.array(data[offset : offset + length])


def summarize(prefix: str | os.PathLike, by: tuple[str, ...] = ("lang", "source", "topic")):
    """(documents, tokens, per-column GroupCounts) of a dataset with its metadata sidecar."""
    ix = read_index(prefix)  # first: a wrong prefix is reported as such
    check_bin_size(prefix, ix)
    table = read_metadata(prefix)  # also checks each row's n_tokens against the index
    unknown = [c for c in by if c not in table.column_names]
    if unknown:
        raise ValueError(
            f"--by {' '.join(unknown)}: no such metadata column in {prefix}; it has "
            f"{', '.join(table.column_names)}"
        )
    groups = [group_counts(table, c) for c in by]
    return ix.num_documents, ix.num_tokens, groups, table


def plot_lengths(table: pa.Table, column: str, path: str | os.PathLike) -> None:
    """PNG histogram of document lengths (tokens, log scale) per value of ``column``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_syne.utils.io import save_png

    values = pc.fill_null(table.column(column).cast(pa.string()), "-").to_numpy(
        zero_copy_only=False
    )
    lengths = table.column("n_tokens").to_numpy()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = max(int(lengths.max()) if len(lengths) else 1, 2)
    bins = np.logspace(0, np.log10(top), 40)
    for value in sorted(set(values.tolist())):
        ax.hist(lengths[values == value], bins=bins, histtype="step", label=value, linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title(f"document lengths by {column}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)

"""PPL distribution report: percentiles, curriculum bucket boundaries and histograms per group
(by default per source and language) from the ``ppl`` column written by the scorer.

Bucket boundaries: CCNet's head/middle/tail split at the 30th and 60th percentiles, and the
``num_buckets``-quantiles a finer easy-to-hard curriculum would use. Boundaries are computed
per group because PPL is not comparable across sources and languages (code and web text sit
at very different PPL), so ordering should happen within a group, not across the blend.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_syne.data.metadata import check_distinct_datasets, metadata_path, read_metadata
from megatron_syne.utils.io import commit_file, save_png, temporary_path_for

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
CCNET_PERCENTILES = (30, 60)
OUTPUT_FILES = ("ppl_report.json", "ppl_report.md", "ppl_histogram.png")


@dataclass
class GroupStats:
    key: str
    n_documents: int
    n_scored: int
    status_counts: dict[str, int]
    percentiles: dict[str, float]
    ccnet_boundaries: list[float]
    quantile_boundaries: list[float]
    log_ppl: np.ndarray

    def to_dict(self) -> dict:
        return {
            "group": self.key,
            "n_documents": self.n_documents,
            "n_scored": self.n_scored,
            "status_counts": self.status_counts,
            "percentiles": self.percentiles,
            "ccnet_head_middle_tail_boundaries": self.ccnet_boundaries,
            "quantile_boundaries": self.quantile_boundaries,
        }


def _stats(key: str, ppl: np.ndarray, status: list[str], num_buckets: int) -> GroupStats:
    ok = np.array([s == "ok" for s in status]) & np.isfinite(ppl)
    values = ppl[ok]
    counts: dict[str, int] = {}
    for s in status:
        counts[s or "unscored"] = counts.get(s or "unscored", 0) + 1
    if len(values):
        pct = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
        ccnet = [float(np.percentile(values, p)) for p in CCNET_PERCENTILES]
        quant = [float(np.quantile(values, q / num_buckets)) for q in range(1, num_buckets)]
    else:
        pct, ccnet, quant = {}, [], []
    return GroupStats(key, len(status), int(ok.sum()), counts, pct, ccnet, quant, np.log(values))


def ppl_report(
    data_prefixes: list[str | os.PathLike],
    output_dir: str | os.PathLike,
    group_by: tuple[str, ...] = ("source", "lang"),
    num_buckets: int = 4,
) -> list[GroupStats]:
    """Write ``ppl_report.json``, ``ppl_report.md`` and ``ppl_histogram.png``; return the stats
    (first entry: all documents together)."""
    if num_buckets < 2:
        raise ValueError(f"--num-buckets must be >= 2, got {num_buckets}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(
            f"--output-dir {output_dir} is an existing file, not a directory; give a directory "
            "path (it is created if missing)"
        )
    check_distinct_datasets(data_prefixes, "its documents would be counted twice")
    ppl_parts, status_parts, key_parts = [], [], []
    for prefix in data_prefixes:
        table = read_metadata(prefix)
        _check_columns(prefix, table.column_names, group_by)
        ppl = table.column("ppl").to_numpy(zero_copy_only=False).astype(np.float64)
        status = table.column("ppl_status").to_pylist()
        _check_scored_values(prefix, ppl, status)
        ppl_parts.append(ppl)
        status_parts.extend(status)
        columns = [table.column(c).to_pylist() for c in group_by]
        key_parts.extend("/".join(str(v) for v in values) for values in zip(*columns))
    ppl = np.concatenate(ppl_parts) if ppl_parts else np.zeros(0)
    keys = np.array(key_parts, dtype=object)
    groups = [_stats("all", ppl, status_parts, num_buckets)]
    for key in sorted(set(key_parts)):
        sel = keys == key
        groups.append(
            _stats(key, ppl[sel], [s for s, m in zip(status_parts, sel) if m], num_buckets)
        )

    report = {
        "data_prefixes": [str(p) for p in data_prefixes],
        "group_by": list(group_by),
        "num_buckets": num_buckets,
        "groups": [g.to_dict() for g in groups],
    }
    # All or nothing: the three files are rendered under temporary names and renamed into
    # place only once every one of them has been written.
    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = {name: temporary_path_for(output_dir / name) for name in OUTPUT_FILES}
    try:
        with open(temporary["ppl_report.json"], "w") as f:
            json.dump(report, f, indent=2)
        with open(temporary["ppl_report.md"], "w") as f:
            f.write(format_report(groups, group_by, num_buckets) + "\n")
        plot_histograms(groups, temporary["ppl_histogram.png"], group_by)
        for name, tmp in temporary.items():
            commit_file(tmp, output_dir / name)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
    return groups


def _check_columns(prefix, columns: list[str], group_by: tuple[str, ...]) -> None:
    where = metadata_path(prefix)
    unscored = [c for c in ("ppl", "ppl_status") if c not in columns]
    if unscored:
        raise ValueError(
            f"{where}: no column(s) {unscored}; score the dataset with tools/ppl/score_ppl.py first"
        )
    missing = [c for c in group_by if c not in columns]
    if missing:
        hint = " (tools/topics/label.py writes `topic`)" if "topic" in missing else ""
        raise ValueError(
            f"{where}: no column(s) {missing} to group by{hint}; choose --group-by from the "
            f"columns it has: {', '.join(c for c in columns if c not in ('ppl', 'ppl_status'))}"
        )


def _check_scored_values(prefix, ppl: np.ndarray, status: list) -> None:
    """Rows marked ``ok`` must carry a finite PPL > 0 (PPL = exp(nll) is never <= 0)."""
    ok = np.array([s == "ok" for s in status], dtype=bool)
    bad = np.flatnonzero(ok & ~(np.isfinite(ppl) & (ppl > 0)))
    if len(bad):
        shown = ", ".join(f"row {int(i)} (ppl={ppl[i]})" for i in bad[:5])
        raise ValueError(
            f"{metadata_path(prefix)}: {len(bad)} row(s) with ppl_status 'ok' have a PPL that is "
            f"not a finite number > 0 ({shown}{', ...' if len(bad) > 5 else ''}); the ppl "
            "column was not written by tools/ppl/score_ppl.py or was edited: rescore the "
            "dataset (score_ppl.py --restart)"
        )


def format_report(groups: list[GroupStats], group_by, num_buckets: int) -> str:
    cols = [f"p{p}" for p in PERCENTILES]
    lines = [
        f"## PPL percentiles per {'/'.join(group_by)}",
        "",
        "| group | documents | scored | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for g in groups:
        values = " | ".join(f"{g.percentiles[c]:.2f}" if g.percentiles else "-" for c in cols)
        lines.append(f"| {g.key} | {g.n_documents} | {g.n_scored} | {values} |")
    lines += [
        "",
        "## Curriculum bucket boundaries (PPL)",
        "",
        f"| group | CCNet head < p30 | middle < p60 | {num_buckets}-quantile boundaries |",
        "|---|---|---|---|",
    ]
    for g in groups:
        head, middle = (f"{b:.2f}" for b in g.ccnet_boundaries) if g.ccnet_boundaries else "--"
        quant = ", ".join(f"{b:.2f}" for b in g.quantile_boundaries) or "-"
        lines.append(f"| {g.key} | {head} | {middle} | {quant} |")
    return "\n".join(lines)


def plot_histograms(groups: list[GroupStats], path: Path, group_by) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        if len(g.log_ppl):
            ax.hist(g.log_ppl, bins=40, color="tab:blue", alpha=0.8)
            for b, style in zip(g.ccnet_boundaries, ("--", ":")):
                ax.axvline(math.log(b), color="tab:red", linestyle=style, linewidth=1)
        ax.set_title(f"{g.key} ({g.n_scored} scored)", fontsize=9)
        ax.set_xlabel("log PPL (red: p30, p60)")
        ax.set_ylabel("documents")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"document PPL per {'/'.join(group_by)}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=110)

"""What a mixture spec will train on: tokens per stage/group/source/topic, epochs, plots.

Used by ``tools/mixture/plan.py``. The planned weights are the spec's initial ones (the online
mixer changes topic weights during training; a run's TensorBoard logs give the actual ones).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_syne.data.blending import build_phased_blending_indices
from megatron_syne.data.schedule import MixturePlan
from megatron_syne.utils.io import save_png

logger = logging.getLogger(__name__)


@dataclass
class PlanReport:
    """Planned tokens (not samples) at each level, and epochs per component."""

    stage_tokens: dict[str, int] = field(default_factory=dict)
    group_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    source_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    component_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    component_available_tokens: dict[str, int] = field(default_factory=dict)
    component_epochs: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, dict[str, int]] = field(default_factory=dict)
    missing_scores: dict[str, int] = field(default_factory=dict)
    # source -> (min_topic_documents, {merged topic: selected documents}); see <source>/other.
    merged_topics: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def plan_report(plan: MixturePlan) -> PlanReport:
    """Blend the planned (initial) weights exactly as training would and count per level."""
    report = PlanReport()
    bounds = plan.phase_bounds_samples()
    weights = plan.planned_phase_weights()
    index, _, totals = build_phased_blending_indices(bounds, weights)
    seq = plan.seq_length
    group_of = {
        (stage.name, source): group.name
        for stage in plan.spec.stages
        for group in stage.groups
        for source, _ in group.sources
    }
    stage_bounds = [
        (
            plan.stage_starts[s] * plan.global_batch_size,
            (plan.stage_starts[s] + n) * plan.global_batch_size,
        )
        for s, n in enumerate(plan.stage_iterations)
    ]
    for s, stage in enumerate(plan.spec.stages):
        start, end = stage_bounds[s]
        counts = np.bincount(index[start:end], minlength=len(plan.components))
        report.stage_tokens[stage.name] = (end - start) * seq
        for i, c in enumerate(plan.components):
            if counts[i] == 0:
                continue
            tokens = int(counts[i]) * seq
            group = group_of[(stage.name, c.source)]
            report.component_tokens[(stage.name, c.name)] = tokens
            report.source_tokens[(stage.name, c.source)] = (
                report.source_tokens.get((stage.name, c.source), 0) + tokens
            )
            report.group_tokens[(stage.name, group)] = (
                report.group_tokens.get((stage.name, group), 0) + tokens
            )
    per_epoch = plan.samples_per_epoch
    for i, c in enumerate(plan.components):
        report.component_available_tokens[c.name] = int(per_epoch[i]) * seq
        report.component_epochs[c.name] = float(totals[i] / max(per_epoch[i], 1))
        if c.missing_scores:
            report.missing_scores[c.name] = c.missing_scores
    for name, resolution in plan.resolutions.items():
        if any(resolution.excluded.values()):
            report.excluded[name] = {k: v for k, v in resolution.excluded.items() if v}
        if resolution.merged_topics:
            report.merged_topics[name] = (
                resolution.spec.min_topic_documents,
                dict(resolution.merged_topics),
            )
    report.warnings = plan.check_static_budget()
    return report


def _fmt_tokens(tokens: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(tokens) >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return f"{tokens:.0f}"


def format_report(plan: MixturePlan, report: PlanReport) -> str:
    """A plain-text table: stage > group > source > topic, then epochs per component."""
    lines = [
        f"mixture plan {plan.spec.path}: {len(plan.components)} components, "
        f"{len(plan.spec.stages)} stages, {len(plan.phases)} phases, {plan.total_iterations} "
        f"iterations of {plan.global_batch_size} x {plan.seq_length} tokens"
    ]
    for s, stage in enumerate(plan.spec.stages):
        total = report.stage_tokens[stage.name]
        lines.append(
            f"\nstage {stage.name}: {_fmt_tokens(total)} tokens, {plan.stage_iterations[s]} "
            f"iterations{' (mixer active)' if plan.spec.mixer_active_in(stage.name) else ''}"
        )
        for group in stage.groups:
            tokens = report.group_tokens.get((stage.name, group.name), 0)
            lines.append(
                f"  {group.name:<24} {_fmt_tokens(tokens):>8}  {tokens / total:6.1%} "
                f"(spec {group.ratio:.1%})"
            )
            for source, ratio in group.sources:
                tokens = report.source_tokens.get((stage.name, source), 0)
                group_total = max(report.group_tokens.get((stage.name, group.name), 0), 1)
                lines.append(
                    f"    {source:<22} {_fmt_tokens(tokens):>8}  {tokens / group_total:6.1%} "
                    f"of {group.name} (spec {ratio:.1%})"
                )
                for c in plan.resolutions[source].components:
                    if c.topic is None:
                        continue
                    tokens = report.component_tokens.get((stage.name, c.name), 0)
                    merged = f"  ({len(c.merged_topics)} merged topics)" if c.merged_topics else ""
                    lines.append(f"      {c.topic:<20} {_fmt_tokens(tokens):>8}{merged}")
    lines.append("\nepochs per component over the whole run (planned weights):")
    for c in plan.components:
        epochs = report.component_epochs[c.name]
        flag = "  WARNING: repeats" if epochs > 1 else ""
        lines.append(
            f"  {c.name:<40} {epochs:8.3f} epochs of {_fmt_tokens(report.component_available_tokens[c.name])}"
            f" tokens ({len(c.train_documents)} docs, {len(c.valid_documents)} held out){flag}"
        )
    for source, reasons in report.excluded.items():
        for reason, count in reasons.items():
            lines.append(f"  excluded from {source}: {count} documents ({reason})")
    for source, (threshold, topics) in report.merged_topics.items():
        lines.append(
            f"  merged into {source}/other: {len(topics)} topics with < {threshold} documents, "
            f"{sum(topics.values())} documents: "
            + ", ".join(f"{t} ({n})" for t, n in topics.items())
        )
    for name, count in report.missing_scores.items():
        lines.append(f"  {name}: {count} documents without a PPL score (placed per missing_ppl)")
    for warning in report.warnings:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def read_tensorboard_weights(
    log_dir: str | os.PathLike,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``mixture/weight/<component>`` scalars from a run's TensorBoard logs: name -> (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{log_dir}: no TensorBoard event files found")
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if tag.startswith("mixture/weight/"):
                name = tag[len("mixture/weight/") :]
                series[name].extend((e.step, e.value) for e in accumulator.Scalars(tag))
    out = {}
    for name, points in series.items():
        points = sorted(dict(points).items())
        out[name] = (np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    return out


def plot_plan(
    plan: MixturePlan,
    output: str | os.PathLike,
    actual: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Path:
    """PNG of the planned blend weight of every component over iterations (stacked), and, per
    source split by topic, the planned topic shares; actual weights (TensorBoard) as dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = plan.planned_phase_weights()
    starts = [p.start_iteration for p in plan.phases] + [plan.total_iterations]
    x = np.repeat(starts, 2)[1:-1]
    y = np.repeat(weights, 2, axis=0)
    split_sources = [n for n, r in plan.resolutions.items() if len(r.components) > 1]
    fig, axes = plt.subplots(
        1 + len(split_sources), 1, figsize=(11, 4 + 3 * len(split_sources)), squeeze=False
    )
    ax = axes[0, 0]
    ax.stackplot(x, y.T, labels=[c.name for c in plan.components], alpha=0.85)
    for s in plan.stage_starts[1:]:
        ax.axvline(s, color="k", lw=1, ls=":")
    ax.set_xlim(0, plan.total_iterations)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of samples")
    ax.set_title(f"planned blend: {Path(plan.spec.path).name}")
    ax.legend(fontsize=6, ncol=3, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for row, source in enumerate(split_sources, start=1):
        ax = axes[row, 0]
        names = [c.name for c in plan.resolutions[source].components]
        ids = [plan.component_index[n] for n in names]
        block = y[:, ids]
        share = block / np.maximum(block.sum(axis=1, keepdims=True), 1e-12)
        for j, name in enumerate(names):
            (line,) = ax.plot(x, share[:, j], label=name.split("/", 1)[-1])
            if actual and name in actual:
                steps, values = actual[name]
                total = np.zeros_like(values)
                for other in names:
                    if other in actual and len(actual[other][1]) == len(values):
                        total += actual[other][1]
                ax.plot(steps, values / np.maximum(total, 1e-12), ls="--", color=line.get_color())
        ax.set_xlim(0, plan.total_iterations)
        ax.set_ylabel(f"topic share in {source}")
        ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1, 0].set_xlabel("iteration" + (" (dashed: actual, from TensorBoard)" if actual else ""))
    fig.tight_layout()
    return save_png(fig, output, dpi=110)


def read_mixer_history(
    path: str | os.PathLike, warn: Callable[[str], None] | None = None
) -> list[dict]:
    """Records of a ``mixer_history-*.jsonl`` file (one per measurement, by iteration).

    Errors name the file and the line; a torn last line (a run killed mid-write) is skipped and
    reported through ``warn`` (default: the log).
    """
    from megatron_syne.data.mixer import read_history

    history = read_history(path, "mixer history (written to --save by the mixer)")
    for message in history.warnings:
        (warn or logger.warning)(message)
    return list(history.records)


def plot_mixer_history(history: list[dict], output: str | os.PathLike) -> Path:
    """PNG: per-topic validation loss (top) and topic weights inside their source (bottom),
    over consumed tokens, one line per component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("the mixer history is empty: no measurement was made")
    tokens = np.array([r["consumed_tokens"] for r in history], dtype=np.float64)
    names = list(history[0]["losses"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    for name in names:
        (line,) = top.plot(
            tokens, [r["losses"][name] for r in history], marker="o", ms=3, label=name
        )
        bottom.step(
            tokens,
            [r["weights_after"][name] for r in history],
            where="post",
            color=line.get_color(),
            label=name,
        )
    top.set_ylabel("held-out loss (nats/token)")
    top.set_title("per-topic validation loss and topic weights (SynE rule)")
    bottom.set_ylabel("topic weight inside its source")
    bottom.set_xlabel("consumed tokens")
    top.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save_png(fig, output, dpi=110)

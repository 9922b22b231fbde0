"""The engine shared by science QA and code QA: resume, bounded workers, filters, summary.

Per work item (one seed x one sample index):
    skip when its key is in the output or the rejects file (done before)
 -> one chat completion (transient failures retried by the client; a failure that survives
    them goes to ``<out>.errors.jsonl`` and the item is redone by the next run)
 -> truncated? -> task parse -> length -> repetition -> language -> decontamination
 -> task verification (code QA: sandbox) -> near-duplicate check against all accepted items
 -> append to ``<out>`` (accepted) or ``<out>.rejects.jsonl`` (with its reason).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_syne.synth.client import ChatBackend, ChatResult, RequestFailed
from megatron_syne.synth.filters import (
    Decontaminator,
    FilterConfig,
    NearDuplicateIndex,
    check_length,
    check_repetition,
)
from megatron_syne.synth.store import JsonlStore
from megatron_syne.synth.text import detect_lang
from megatron_syne.utils.io import atomic_open, save_png


class Reject(Exception):
    """An item that is generated but not kept; ``category`` is what the summary counts."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category
        self.detail = detail


@dataclass
class WorkItem:
    """One request to make: ``key`` is unique per seed, prompt version and sample index."""

    key: str
    seed_id: str
    messages: list[dict[str, str]]
    lang: str
    fields: dict[str, Any] = field(default_factory=dict)  # copied into the output record
    seed: int | None = None  # sampling seed sent to the server
    context: dict[str, Any] = field(default_factory=dict)  # for parse/verify, not written


# parse(item, result) -> record with at least "problem", "solution"; raises Reject.
ParseFn = Callable[[WorkItem, ChatResult], dict[str, Any]]
# verify(item, record) -> extra fields for the record; raises Reject.
VerifyFn = Callable[[WorkItem, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class RunConfig:
    """Where the output goes and how the run behaves. Paths default beside ``out``."""

    out: Path
    rejects: Path | None = None
    errors: Path | None = None
    workers: int = 64
    filters: FilterConfig = field(default_factory=FilterConfig)
    decontamination_files: list[str] = field(default_factory=list)
    repetition_fields: tuple[str, ...] = ("problem", "solution")
    language_fields: tuple[str, ...] = ("problem", "solution")
    progress: bool = True
    fsync: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.out.suffix != ".jsonl":
            raise ValueError(f"--out {self.out} must end in .jsonl")
        stem = str(self.out)[: -len(".jsonl")]
        self.rejects = Path(self.rejects or f"{stem}.rejects.jsonl")
        self.errors = Path(self.errors or f"{stem}.errors.jsonl")
        if self.workers < 1:
            raise ValueError(f"RunConfig: workers must be >= 1, got {self.workers}")


class GenerationRun:
    """Runs work items through a backend into a resumable output; see the module doc."""

    def __init__(
        self,
        config: RunConfig,
        backend: ChatBackend,
        task: str,
        parse: ParseFn,
        verify: VerifyFn | None = None,
        text_of: Callable[[dict[str, Any]], str] | None = None,
    ):
        self.config = config
        self.backend = backend
        self.task = task
        self.parse = parse
        self.verify = verify
        self.text_of = text_of or (lambda r: f"{r['problem']}\n\n{r['solution']}")
        self.accepted = JsonlStore(config.out, fsync=config.fsync)
        self.rejects = JsonlStore(config.rejects, fsync=config.fsync)
        self.counts: Counter[str] = Counter()
        self.reject_reasons: Counter[str] = Counter()
        self.error_reasons: Counter[str] = Counter()
        self.completion_tokens = 0
        fc = config.filters
        self.dedup = (
            NearDuplicateIndex(fc.dedup_threshold, fc.dedup_num_perm, fc.dedup_shingle)
            if fc.dedup
            else None
        )
        if self.dedup is not None:
            for record in self.accepted.iter_records():
                self.dedup.add(record["key"], self.text_of(record))
        self.decontaminator = Decontaminator(fc.decontamination_ngram, fc.decontamination_min_hits)
        self.decontaminator.add_files(config.decontamination_files)
        self._errors_file = None
        self._start = time.monotonic()

    def is_done(self, key: str) -> bool:
        return key in self.accepted or key in self.rejects

    def reject_input(self, key: str, reason: str, record: dict[str, Any]) -> None:
        """Record an unusable input (bad seed line) so it is counted and visible."""
        self._reject(key, Reject("bad_input", reason), {"input": record})

    def _reject(self, key: str, err: Reject, record: dict[str, Any]) -> None:
        self.reject_reasons[err.category] += 1
        self.rejects.append(
            {"key": key, "task": self.task, "reason": err.category, "detail": err.detail, **record}
        )

    def _log_error(self, item: WorkItem, err: RequestFailed) -> None:
        self.error_reasons[err.reason] += 1
        if self._errors_file is None:
            self._errors_file = open(self.config.errors, "a", encoding="utf-8")  # noqa: SIM115
        entry = {"key": item.key, "seed_id": item.seed_id, "reason": err.reason}
        entry["message"] = err.message[:500]
        entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._errors_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._errors_file.flush()

    def _filter(self, item: WorkItem, record: dict[str, Any]) -> None:
        fc = self.config.filters
        reason = check_length(record["problem"], record["solution"], fc)
        if reason:
            raise Reject(reason.split(":", 1)[0], reason.split(":", 1)[1].strip())
        for name in self.config.repetition_fields:
            reason = check_repetition(record[name], fc)
            if reason:
                raise Reject("repetition", f"{name}: {reason.split(':', 1)[1].strip()}")
        if fc.check_language:
            for name in self.config.language_fields:
                got = detect_lang(record[name])
                if got != item.lang:
                    raise Reject("wrong_language", f"{name} is {got}, seed is {item.lang}")
        reason = self.decontaminator.check(self.text_of(record))
        if reason:
            raise Reject("contaminated", reason.split(":", 1)[1].strip())

    async def _process(self, item: WorkItem) -> None:
        try:
            result = await self.backend.complete(item.messages, seed=item.seed)
        except RequestFailed as err:
            if err.retryable:
                self._log_error(item, err)
                self.counts["request_failed"] += 1
                return
            self._reject(item.key, Reject("request_rejected", str(err)), self._base(item))
            return
        self.completion_tokens += result.completion_tokens or 0
        base = self._base(item)
        base.update(finish_reason=result.finish_reason, completion_tokens=result.completion_tokens)
        record: dict[str, Any] | None = None
        try:
            if result.truncated:
                raise Reject("truncated", "finish_reason=length: the answer hit max_tokens")
            record = {**base, **self.parse(item, result)}
            self._filter(item, record)
            if self.verify is not None:
                record.update(await self.verify(item, record))
            if self.dedup is not None:
                reason = self.dedup.check_and_add(item.key, self.text_of(record))
                if reason:
                    raise Reject("near_duplicate", reason.split(":", 1)[1].strip())
        except Reject as err:
            # Keep what was parsed, or the raw answer when parsing itself failed.
            self._reject(item.key, err, record or {**base, "answer": result.text})
            return
        self.accepted.append(record)
        self.counts["accepted"] += 1

    def _base(self, item: WorkItem) -> dict[str, Any]:
        return {
            "key": item.key,
            "seed_id": item.seed_id,
            "task": self.task,
            "lang": item.lang,
            **item.fields,
            "generator": self.backend.generator_name,
        }

    async def run(self, items: Iterable[WorkItem], total: int | None = None) -> dict[str, Any]:
        """Process every item not done before; returns the summary (also written as JSON)."""
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=2 * self.config.workers)
        bar = tqdm(total=total, desc=self.task, unit="item", disable=not self.config.progress)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                try:
                    await self._process(item)
                except Exception as err:  # noqa: BLE001
                    # A bug or an OS error on one item must not stall the producer or lose
                    # the run: log it like a failed request (redone next run) and go on.
                    failure = RequestFailed(
                        "internal_error", f"{type(err).__name__}: {err}", True, 1
                    )
                    self._log_error(item, failure)
                    self.counts["request_failed"] += 1
                finally:
                    bar.update(1)

        workers = [asyncio.create_task(worker()) for _ in range(self.config.workers)]
        try:
            for item in items:
                if self.is_done(item.key):
                    self.counts["skipped_done"] += 1
                    bar.update(1)
                    continue
                self.counts["attempted"] += 1
                await queue.put(item)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            bar.close()
            self.close()
        return self.write_summary()

    def close(self) -> None:
        self.accepted.close()
        self.rejects.close()
        if self._errors_file is not None:
            self._errors_file.close()
            self._errors_file = None

    def summary(self) -> dict[str, Any]:
        summary = {
            "task": self.task,
            "output": str(self.config.out),
            "rejects_file": str(self.config.rejects),
            "errors_file": str(self.config.errors),
            "generator": self.backend.generator_name,
            "attempted": self.counts["attempted"],
            "skipped_done": self.counts["skipped_done"],
            "accepted": self.counts["accepted"],
            "rejected": sum(self.reject_reasons.values()),
            "rejected_by_reason": dict(self.reject_reasons.most_common()),
            "request_failed": self.counts["request_failed"],
            "request_failed_by_reason": dict(self.error_reasons),
            "output_items_total": len(self.accepted),
            "rejects_total": len(self.rejects),
            "torn_tail_bytes_repaired": self.accepted.repaired_bytes + self.rejects.repaired_bytes,
            "completion_tokens": self.completion_tokens,
            "decontamination_files": self.decontaminator.sources,
            "seconds": round(time.monotonic() - self._start, 2),
        }
        stats = getattr(self.backend, "stats", None)
        if stats is not None:
            summary["client"] = dict(stats)
        if hasattr(self.backend, "server_stats"):
            summary["servers"] = self.backend.server_stats()
        return summary

    def write_summary(self) -> dict[str, Any]:
        summary = self.summary()
        stem = str(self.config.out)[: -len(".jsonl")]
        with atomic_open(f"{stem}.summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        _plot_summary(summary, Path(f"{stem}.summary.png"))
        return summary


def _plot_summary(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["accepted", *summary["rejected_by_reason"], "request_failed"]
    values = [
        summary["accepted"],
        *summary["rejected_by_reason"].values(),
        summary["request_failed"],
    ]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    colors = ["tab:green"] + ["tab:red"] * (len(labels) - 2) + ["tab:gray"]
    ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    for i, v in enumerate(values[::-1]):
        ax.text(v, i, f" {v}", va="center")
    ax.set_xlabel("items (this run)")
    ax.set_title(f"{summary['task']}: {summary['output']}")
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for the end of a tool run."""
    lines = [
        f"{summary['task']}: accepted {summary['accepted']}, rejected {summary['rejected']}, "
        f"request failures {summary['request_failed']} (redone next run), skipped (done "
        f"before) {summary['skipped_done']}, in {summary['seconds']} s",
        f"  output holds {summary['output_items_total']} items: {summary['output']}",
        f"  completion tokens this run: {summary['completion_tokens']}",
    ]
    for reason, n in summary["rejected_by_reason"].items():
        lines.append(f"  rejected {reason}: {n}")
    for reason, n in summary["request_failed_by_reason"].items():
        lines.append(f"  request failed {reason}: {n}")
    if summary["torn_tail_bytes_repaired"]:
        lines.append(
            f"  repaired a torn last line ({summary['torn_tail_bytes_repaired']} bytes) left by "
            "an interrupted run"
        )
    lines.append(f"  rejects: {summary['rejects_file']}")
    return "\n".join(lines)

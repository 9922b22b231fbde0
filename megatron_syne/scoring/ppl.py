"""Per-document perplexity of an indexed dataset under a base model, written into its metadata.

What is scored: each document's text tokens (a leading BOS and trailing EOD ids stored in the
``.bin`` are removed), truncated to its first ``max_tokens`` tokens. With a BOS id (the default
when the model/tokenizer has one) the model reads ``[BOS] + tokens[:-1]`` and predicts every
document token, so ``n`` tokens give ``n`` predictions, exactly what
``transformers``' ``model(input_ids=[BOS] + tokens, labels=...)`` averages. Without BOS the
first token has no prediction (``n - 1``). Documents with fewer than ``min_tokens`` text tokens
are marked ``too_short`` (null ``nll``/``ppl``): a PPL over a handful of tokens is noise.

Columns: ``nll`` (mean token NLL in nats, float32), ``ppl`` (= exp(nll)), ``ppl_status``
("ok" | "too_short" | "nonfinite"), ``ppl_tokens`` (predictions averaged).

Batching: documents of a chunk are sorted by length and padded on the right; with causal
attention a right pad never influences an earlier position, and padded positions are masked
out of the loss. Data parallel: under torchrun each rank scores chunks ``rank::world_size``
and writes resumable parts (:mod:`megatron_syne.scoring.parts`); rank 0 merges them.
Per-token NLL comes from hidden states and the output weight: D's fused kernel
(``megatron_syne.kernels.ppl.token_nll_from_hidden``, no full logits) on CUDA when importable,
chunked fp32 torch otherwise.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from megatron_syne.data.metadata import add_columns, read_metadata
from megatron_syne.scoring.parts import PartsDir, PartsError, chunk_ranges
from megatron_syne.topics.documents import document_tokens, open_indexed_dataset, strip_special
from megatron_syne.utils.io import atomic_open

STATUS_OK, STATUS_TOO_SHORT, STATUS_NONFINITE = "ok", "too_short", "nonfinite"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PPLConfig:
    data_prefix: str
    hf_model: str | None = None  # local HF causal-LM directory
    load: str | None = None  # Megatron checkpoint (--save dir or iter_ dir)
    preset: str | None = None  # model preset of the Megatron checkpoint
    preset_overrides: dict = field(default_factory=dict)  # ModelPreset fields
    make_vocab_size_divisible_by: int = 128  # as in training: the checkpoint's padded vocab
    max_tokens: int = 1024  # tokens per document scored (its head)
    min_tokens: int = 32  # fewer text tokens -> too_short
    micro_batch_size: int = 8  # documents per forward pass
    chunk_size: int = 512  # documents per resumable part
    bos_token_id: int | None = None  # None: from the HF config / tokenizer
    eod_token_id: int | None = None  # None: from the HF config / tokenizer
    no_bos: bool = False  # score without a BOS (first token unpredicted)
    tokenizer_type: str = "Llama3Tokenizer"
    tokenizer_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"  # bf16 on CUDA, fp32 on CPU
    fused_kernel: str = "auto"  # auto | on | off
    parts_dir: str | None = None  # default: <prefix>.ppl.parts
    restart: bool = False
    keep_parts: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.hf_model is None) == (self.load is None):
            raise ValueError("give exactly one of --hf-model DIR or --load CHECKPOINT_DIR")
        if self.load is not None and self.preset is None:
            raise ValueError("--load needs --preset NAME (the model shape of the checkpoint)")
        if self.hf_model is not None and not Path(self.hf_model, "config.json").exists():
            raise FileNotFoundError(
                f"{self.hf_model}: no config.json; --hf-model must be a local directory"
            )
        if self.max_tokens < 1 or self.min_tokens < 1 or self.min_tokens > self.max_tokens:
            raise ValueError("need 1 <= --min-tokens <= --max-tokens")
        if self.micro_batch_size < 1 or self.chunk_size < 1:
            raise ValueError("--micro-batch-size and --chunk-size must be >= 1")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"--dtype must be auto or one of {sorted(DTYPES)}")
        if self.fused_kernel not in ("auto", "on", "off"):
            raise ValueError("--fused-kernel must be auto, on or off")
        if self.parts_dir is None:
            self.parts_dir = f"{self.data_prefix}.ppl.parts"


# ------------------------------------------------------------------------------ NLL
def _torch_token_nll(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor):
    """fp32 NLL per row, logits materialised ~256 MiB at a time."""
    rows = max(1, (1 << 26) // weight.shape[0])
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    w = weight.float()
    for start in range(0, hidden.shape[0], rows):
        logits = hidden[start : start + rows].float() @ w.t()
        out[start : start + rows] = torch.nn.functional.cross_entropy(
            logits, target[start : start + rows], reduction="none"
        )
    return out


def resolve_token_nll(device: torch.device, fused_kernel: str):
    """(function(hidden [N,H], weight [V,H], target [N]) -> nll [N] fp32, name)."""
    if fused_kernel == "off" or (fused_kernel == "auto" and device.type != "cuda"):
        return _torch_token_nll, "torch"
    try:
        from megatron_syne.kernels.ppl import token_nll_from_hidden
    except ImportError as e:
        if fused_kernel == "on":
            raise RuntimeError(f"--fused-kernel on but the PPL kernel does not import: {e}") from e
        return _torch_token_nll, "torch"
    return (lambda h, w, t: token_nll_from_hidden(h, w, t)), "fused"


# ------------------------------------------------------------------------------ models
class HFScorerModel:
    """A local Hugging Face causal LM; hidden states from its decoder, weight from its head."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(path)
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(hf_config, attr, None) not in (None, 1.0):
                raise ValueError(
                    f"{path}: {attr}={getattr(hf_config, attr)} transforms the logits; this "
                    "scorer computes them as hidden @ lm_head.weight (Llama-family models)"
                )
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.decoder = self.model.get_decoder()
        self.weight = self.model.get_output_embeddings().weight
        self.vocab_size = self.weight.shape[0]
        self.bos_token_id = hf_config.bos_token_id
        eos = hf_config.eos_token_id
        self.eod_token_id = eos[0] if isinstance(eos, list) else eos

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state  # [B, T, H]


class _HiddenPassthrough(torch.nn.Module):
    """Stands in for GPTModel's output layer so the forward returns final hidden states."""

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return hidden_states, None


class MegatronScorerModel:
    """A megatron-core Llama-3 GPTModel (TP = PP = 1) loaded from a torch_dist checkpoint."""

    def __init__(self, config: PPLConfig, device: torch.device, dtype: torch.dtype):
        from megatron_syne.models.llama3 import (
            build_gpt_model,
            padded_vocab_size,
            transformer_config_from_preset,
        )
        from megatron_syne.models.presets import get_preset
        from megatron_syne.training.checkpointing import load_model_weights

        preset = get_preset(config.preset)
        if config.preset_overrides:
            preset = preset.replace(**config.preset_overrides)
        tconfig = transformer_config_from_preset(
            preset,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            perform_initialization=False,
        )
        model = build_gpt_model(
            preset,
            tconfig,
            vocab_size=padded_vocab_size(preset.vocab_size, config.make_vocab_size_divisible_by, 1),
        )
        model = model.to(device)
        self.iteration = load_model_weights([model], config.load)
        model.eval()
        full = (
            model.shared_embedding_or_output_weight()
            if model.share_embeddings_and_output_weights
            else model.output_layer.weight
        )
        # Rows past the tokenizer's vocabulary are padding: never a target, and they must not
        # enter the softmax's normaliser either (transformers' model has no such rows).
        self.weight = full[: preset.vocab_size]
        self.vocab_size = preset.vocab_size
        model.output_layer = _HiddenPassthrough()
        self.model = model
        self.bos_token_id = self.eod_token_id = None

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = positions.unsqueeze(0).expand_as(input_ids)
        # attention_mask None -> causal attention; right padding needs no more than that.
        return self.model(input_ids, positions, None)  # [B, T, H]


# ------------------------------------------------------------------------------ scoring
@dataclass
class DocumentScore:
    nll: float | None
    status: str
    tokens: int


def score_documents(
    model,
    token_nll,
    documents: list[np.ndarray],
    bos: int | None,
    config: PPLConfig,
    device: torch.device,
) -> list[DocumentScore]:
    """Score documents that are already stripped of BOS/EOD (token ids, any length)."""
    scores: list[DocumentScore | None] = [None] * len(documents)
    work = []
    for i, doc in enumerate(documents):
        doc = doc[: config.max_tokens]
        if len(doc) < config.min_tokens or (bos is None and len(doc) < 2):
            scores[i] = DocumentScore(None, STATUS_TOO_SHORT, 0)
            continue
        seq = np.concatenate([[bos], doc]) if bos is not None else doc
        work.append((i, seq.astype(np.int64)))
    work.sort(key=lambda item: -len(item[1]))
    weight = model.weight
    for start in range(0, len(work), config.micro_batch_size):
        batch = work[start : start + config.micro_batch_size]
        length = max(len(seq) for _, seq in batch) - 1
        inputs = torch.zeros((len(batch), length), dtype=torch.long)
        targets = torch.zeros((len(batch), length), dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, (_, seq) in enumerate(batch):
            n = len(seq) - 1
            inputs[row, :n] = torch.from_numpy(seq[:-1])
            targets[row, :n] = torch.from_numpy(seq[1:])
            mask[row, :n] = True
        inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
        hidden = model.hidden(inputs, mask.long())
        nll = token_nll(hidden[mask], weight, targets[mask])
        rows = torch.nonzero(mask, as_tuple=True)[0]
        totals = torch.zeros(len(batch), dtype=torch.float64, device=device)
        totals.index_add_(0, rows, nll.double())
        counts = mask.sum(dim=1)
        means = (totals / counts).cpu().tolist()
        for (i, _), mean, count in zip(batch, means, counts.cpu().tolist()):
            status = STATUS_OK if math.isfinite(mean) else STATUS_NONFINITE
            scores[i] = DocumentScore(mean if status == STATUS_OK else None, status, int(count))
    return scores


def _scores_table(scores: list[DocumentScore]) -> pa.Table:
    nll = [s.nll for s in scores]
    return pa.table(
        {
            "nll": pa.array(nll, pa.float32()),
            "ppl": pa.array([math.exp(x) if x is not None else None for x in nll], pa.float32()),
            "ppl_status": pa.array([s.status for s in scores], pa.string()),
            "ppl_tokens": pa.array([s.tokens for s in scores], pa.int32()),
        }
    )


@dataclass
class PPLSummary:
    n_documents: int
    rank_chunks: int
    chunks_reused: int
    documents_scored: int  # by this rank in this run
    tokens_scored: int  # predictions, by this rank in this run
    seconds: float  # whole run, model loading included
    world_size: int
    nll_impl: str
    scoring_seconds: float = 0.0
    merged: bool = False
    status_counts: dict[str, int] = field(default_factory=dict)
    total_tokens: int = 0  # all ranks, all runs (after merge)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_scored / self.scoring_seconds if self.scoring_seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second_this_rank": self.tokens_per_second}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _init_distributed_hf(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def score_dataset(config: PPLConfig) -> PPLSummary:
    """Score this rank's pending chunks; rank 0 merges and writes the columns."""
    from tqdm import tqdm

    t0 = time.time()
    device = _resolve_device(config.device)
    dtype = (
        DTYPES[config.dtype]
        if config.dtype != "auto"
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    if config.hf_model is not None:
        _init_distributed_hf(device)
    else:
        from megatron_syne.training.distributed import initialize_distributed

        initialize_distributed(device.type, 1, 1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    meta = read_metadata(config.data_prefix, columns=["n_tokens"])  # row count vs .idx
    n_docs = meta.num_rows
    # Load (and so validate) the model before any resume state is written: a run that cannot
    # start (wrong --load, wrong shape) must not leave a manifest that refuses the fixed rerun.
    model = (
        HFScorerModel(config.hf_model, device, dtype)
        if config.hf_model is not None
        else MegatronScorerModel(config, device, dtype)
    )
    bos, eod = _special_ids(config, model)
    token_nll, impl = resolve_token_nll(device, config.fused_kernel)
    ranges = chunk_ranges(n_docs, config.chunk_size)
    manifest = {
        "job": "ppl-scoring",
        "n_documents": n_docs,
        "chunk_size": config.chunk_size,
        "model": str(Path(config.hf_model or config.load).resolve()),
        "preset": config.preset,
        "preset_overrides": config.preset_overrides,
        "max_tokens": config.max_tokens,
        "min_tokens": config.min_tokens,
        "no_bos": config.no_bos,
        "bos_token_id": config.bos_token_id,
        "dtype": str(dtype),
    }
    # Rank 0 creates (or clears) the parts directory; its verdict on existing parts (e.g. a
    # manifest of another model) reaches every rank, so none waits forever at a barrier.
    error = None
    if rank == 0:
        try:
            parts = PartsDir(config.parts_dir, manifest, restart=config.restart)
        except PartsError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise PartsError(error)
    if rank != 0:
        parts = PartsDir(config.parts_dir, manifest)
    mine = ranges[rank::world]
    pending = parts.missing(mine)
    summary = PPLSummary(
        n_documents=n_docs,
        rank_chunks=len(mine),
        chunks_reused=len(mine) - len(pending),
        documents_scored=0,
        tokens_scored=0,
        seconds=0.0,
        world_size=world,
        nll_impl=impl,
    )
    dataset = open_indexed_dataset(config.data_prefix)
    bar = tqdm(
        total=sum(e - s for s, e in pending),
        unit="doc",
        desc=f"ppl (rank 0 of {world})",
        disable=not config.progress or rank != 0,
    )
    t_score = time.time()
    for start, end in pending:
        # A stored leading BOS is dropped (the scorer prepends its own), trailing EODs too.
        docs = [strip_special(document_tokens(dataset, i), bos, eod) for i in range(start, end)]
        _check_vocabulary(docs, start, model.vocab_size, config)
        scores = score_documents(
            model, token_nll, docs, None if config.no_bos else bos, config, device
        )
        parts.write_part(start, end, _scores_table(scores))
        summary.documents_scored += end - start
        summary.tokens_scored += sum(s.tokens for s in scores)
        bar.update(end - start)
        elapsed = max(time.time() - t_score, 1e-9)
        bar.set_postfix(tokens_per_s=f"{summary.tokens_scored / elapsed:.0f}")
    bar.close()
    summary.scoring_seconds = time.time() - t_score
    summary.seconds = time.time() - t0

    if dist.is_initialized():
        dist.barrier()  # every rank's parts are on disk
    if rank == 0:
        table = parts.merge(ranges)
        add_columns(config.data_prefix, {name: table.column(name) for name in table.column_names})
        statuses = table.column("ppl_status").to_pylist()
        summary.status_counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        summary.total_tokens = int(pc.sum(table.column("ppl_tokens")).as_py() or 0)
        summary.merged = True
        if not config.keep_parts:
            parts.remove()
        with atomic_open(f"{config.data_prefix}.ppl.summary.json", "w") as f:
            json.dump(summary.to_dict(), f, indent=2)
    if dist.is_initialized():
        dist.barrier()  # nobody exits (and tears down the group) before the merge is written
    return summary


def _check_vocabulary(docs: list[np.ndarray], start: int, vocab_size: int, config: PPLConfig):
    for offset, doc in enumerate(docs):
        if len(doc) and (int(doc.max()) >= vocab_size or int(doc.min()) < 0):
            raise ValueError(
                f"{config.data_prefix}: document {start + offset} has token id {int(doc.max())} "
                f"outside the model's vocabulary [0, {vocab_size}); score with the model whose "
                "tokenizer produced the dataset (or re-tokenize with the model's tokenizer)"
            )


def _special_ids(config: PPLConfig, model) -> tuple[int | None, int | None]:
    bos, eod = config.bos_token_id, config.eod_token_id
    if bos is None and model.bos_token_id is not None:
        bos = model.bos_token_id
    if eod is None and model.eod_token_id is not None:
        eod = model.eod_token_id
    if (bos is None and not config.no_bos) or eod is None:
        from megatron_syne.preprocess.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer_type, config.tokenizer_model)
        bos = bos if bos is not None else tokenizer.bos
        eod = eod if eod is not None else tokenizer.eod
    for name, value in (("BOS", bos), ("EOD", eod)):
        if value is not None and not 0 <= value < model.vocab_size:
            raise ValueError(
                f"{name} id {value} is outside the model's vocabulary [0, {model.vocab_size}); "
                f"pass --{name.lower()}-token-id"
            )
    return bos, eod


def format_summary(summary: PPLSummary) -> str:
    lines = [
        f"documents: {summary.n_documents}; this rank scored {summary.documents_scored} "
        f"({summary.chunks_reused} of {summary.rank_chunks} chunks reused from an earlier run)",
        f"tokens predicted by this rank: {summary.tokens_scored} in {summary.seconds:.1f} s "
        f"({summary.tokens_per_second:.0f} tokens/s, {summary.world_size} rank(s), "
        f"NLL via {summary.nll_impl})",
    ]
    if summary.merged:
        lines.append(
            f"status: {summary.status_counts}; tokens scored in total: {summary.total_tokens}"
        )
    return "\n".join(lines)

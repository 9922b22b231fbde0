"""Hugging Face Llama (safetensors) -> megatron-core ``torch_dist`` checkpoint, tensor by tensor.

The result is what the training loop's ``--load DIR --no-load-optim --no-load-rng`` starts
continual pre-training from: ``DIR/iter_0000000`` plus the ``latest`` marker, model weights
only. ``torch_dist`` stores global tensors, so the checkpoint loads under any TP/PP layout;
the target sizes given here are checked against the model shape (heads, query groups, FFN and
vocabulary must split over TP, layers over PP) and set the vocabulary padding.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_syne.convert import layout as L
from megatron_syne.convert.arch import ConversionError, LlamaArch, dtype_from_name
from megatron_syne.convert.hf_checkpoint import HFCheckpointReader
from megatron_syne.convert.megatron_checkpoint import (
    ScratchTensorStore,
    checkpoint_iteration_dir,
    save_torch_dist,
    scratch_dir_beside,
    sharded_state_dict_for,
    single_process_group,
    write_tracker,
)
from megatron_syne.convert.memory import MemoryPeak, PeakMemoryMonitor

CONVERSION_FORMAT_VERSION = 1


@dataclass
class HFToMegatronConfig:
    """Settings of one HF -> Megatron conversion.

    ``make_vocab_size_divisible_by`` pads the embedding rows as the training run does
    (to a multiple of lcm(divisible_by, TP)); ``dtype`` None keeps the checkpoint's dtype.
    """

    hf_dir: Path
    save: Path
    target_tensor_parallel_size: int = 1
    target_pipeline_parallel_size: int = 1
    preset: str | None = None
    make_vocab_size_divisible_by: int = 128
    dtype: str | None = None
    scratch_dir: Path | None = None
    overwrite: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.hf_dir = Path(self.hf_dir)
        self.save = Path(self.save)
        for name in (
            "target_tensor_parallel_size",
            "target_pipeline_parallel_size",
            "make_vocab_size_divisible_by",
        ):
            if getattr(self, name) < 1:
                raise ConversionError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype is not None:
            dtype_from_name(self.dtype)


@dataclass
class ConversionSummary:
    """What a conversion wrote. Sizes in bytes, time in seconds."""

    output: Path
    arch: LlamaArch
    num_tensors: int
    num_parameters: int
    bytes_written: int
    seconds: float
    memory: MemoryPeak | None
    ignored_tensors: list[str] = field(default_factory=list)
    padded_vocab_size: int | None = None

    def lines(self) -> list[str]:
        out = [
            f"output:      {self.output}",
            f"tensors:     {self.num_tensors} ({self.num_parameters:,} parameters, "
            f"{self.bytes_written / 2**30:.2f} GiB, {self.arch.dtype})",
            f"time:        {self.seconds:.1f} s",
        ]
        if self.padded_vocab_size is not None and self.padded_vocab_size != self.arch.vocab_size:
            out.append(
                f"vocab:       {self.arch.vocab_size} padded to {self.padded_vocab_size} rows (zeros)"
            )
        if self.ignored_tensors:
            out.append(
                f"skipped:     {len(self.ignored_tensors)} recomputed buffers "
                f"(e.g. {self.ignored_tensors[0]})"
            )
        if self.memory is not None:
            out.append(f"memory:      {self.memory.summary()}")
        return out


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Rows of the embedding as the training run pads them (same rule as the model builder)."""
    from megatron_syne.models.llama3 import padded_vocab_size as _padded

    return _padded(vocab_size, divisible_by, tensor_parallel_size)


def check_parallel_layout(arch: LlamaArch, tp: int, pp: int, padded_vocab: int) -> None:
    """ConversionError listing every way ``arch`` cannot be split into TP x PP."""
    problems = []
    for name, value, size, flag in (
        ("num_attention_heads", arch.num_attention_heads, tp, "tensor"),
        ("num_query_groups", arch.num_query_groups, tp, "tensor"),
        ("ffn_hidden_size", arch.ffn_hidden_size, tp, "tensor"),
        ("padded vocab size", padded_vocab, tp, "tensor"),
        ("num_layers", arch.num_layers, pp, "pipeline"),
    ):
        if value % size:
            problems.append(
                f"{name}={value} is not divisible by --target-{flag}-parallel-size {size}"
            )
    if problems:
        raise ConversionError(
            "cannot lay the model out as requested:\n  - " + "\n  - ".join(problems)
        )


def _prepare_output(save: Path, overwrite: bool) -> Path:
    iter_dir = checkpoint_iteration_dir(save, 0)
    if save.exists() and any(save.iterdir()):
        if not overwrite:
            raise ConversionError(
                f"--save {save} is not empty; choose a new directory or pass --overwrite "
                "(which deletes the checkpoint there)"
            )
        for child in save.iterdir():
            if child.name.startswith("iter_") or child.name == "latest_checkpointed_iteration.txt":
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    save.mkdir(parents=True, exist_ok=True)
    return iter_dir


def convert_hf_to_megatron(config: HFToMegatronConfig) -> ConversionSummary:
    """Convert ``config.hf_dir`` into ``config.save`` (see the module docstring).

    Memory: one HF tensor plus its converted form at a time (the largest is the embedding,
    vocab x hidden); converted tensors go to a scratch file of the checkpoint's size that
    ``dist_checkpointing.save`` reads through memory maps.
    """
    start = time.perf_counter()
    arch = LlamaArch.from_hf_dir(config.hf_dir)
    if config.dtype is not None:
        arch = arch.replace(dtype=config.dtype)
    if config.preset is not None:
        from megatron_syne.models.presets import get_preset

        try:
            preset = get_preset(config.preset)
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
        arch.check_against_preset(preset)
    tp, pp = config.target_tensor_parallel_size, config.target_pipeline_parallel_size
    padded_vocab = padded_vocab_size(arch.vocab_size, config.make_vocab_size_divisible_by, tp)
    check_parallel_layout(arch, tp, pp, padded_vocab)

    reader = HFCheckpointReader(config.hf_dir)
    ignored = reader.validate(L.hf_tensor_shapes(arch))
    iter_dir = _prepare_output(config.save, config.overwrite)
    dtype = arch.torch_dtype
    num_layers = arch.num_layers

    def get(name: str) -> torch.Tensor:
        return reader.get(name).to(dtype)

    tensors: list[tuple[str, int | None, int, torch.Tensor]] = []
    monitor = PeakMemoryMonitor()
    with (
        monitor,
        single_process_group(),
        scratch_dir_beside(iter_dir, config.scratch_dir) as scratch,
    ):
        store = ScratchTensorStore(scratch)

        def add(key: str, layer: int | None, tensor: torch.Tensor) -> None:
            tensors.append((key, layer, num_layers, store.put(tensor)))

        steps = tqdm(
            total=num_layers + 2,
            desc="hf->megatron",
            unit="layer",
            disable=not config.show_progress,
        )
        add(L.EMBEDDING, None, L.pad_vocab(get(L.HF_EMBEDDING), padded_vocab))
        steps.update()
        for layer in range(num_layers):
            n = L.hf_layer_names(layer)
            add(L.QKV_NORM, layer, get(n["input_norm"]))
            add(L.QKV, layer, L.fuse_qkv(get(n["q"]), get(n["k"]), get(n["v"]), arch))
            add(L.PROJ, layer, get(n["o"]))
            add(L.FC1_NORM, layer, get(n["post_norm"]))
            add(L.FC1, layer, L.fuse_gate_up(get(n["gate"]), get(n["up"])))
            add(L.FC2, layer, get(n["down"]))
            steps.update()
        add(L.FINAL_NORM, None, get(L.HF_FINAL_NORM))
        if arch.untie_embeddings_and_output_weights:
            add(L.OUTPUT_LAYER, None, L.pad_vocab(get(L.HF_LM_HEAD), padded_vocab))
        store.close()

        state = sharded_state_dict_for(tensors, [(m, num_layers) for m in L.EXTRA_STATE_MODULES])
        # Counters the training loop reads on --load (a fresh start at iteration 0).
        state.update(
            iteration=0,
            checkpoint_version=1,
            has_optimizer=False,
            consumed_samples=0,
            consumed_tokens=0,
            skipped_steps=0,
            hooks={},
            conversion={
                "format_version": CONVERSION_FORMAT_VERSION,
                "source": "huggingface",
                "hf_dir": str(config.hf_dir.resolve()),
                "arch": arch.to_dict(),
                "padded_vocab_size": padded_vocab,
                "make_vocab_size_divisible_by": config.make_vocab_size_divisible_by,
                "target_tensor_parallel_size": tp,
                "target_pipeline_parallel_size": pp,
            },
        )
        # Written under a temporary name and renamed, then the marker: an interrupted
        # conversion never looks like a checkpoint.
        partial = iter_dir.with_name(iter_dir.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        try:
            save_torch_dist(partial, state)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        steps.update()
        steps.close()
        tensors.clear()
        del state
        os.replace(partial, iter_dir)
        write_tracker(config.save, 0)
        bytes_written = store.nbytes
    return ConversionSummary(
        output=iter_dir,
        arch=arch,
        num_tensors=len(L.megatron_tensor_specs(arch, padded_vocab)),
        num_parameters=arch.num_parameters,
        bytes_written=bytes_written,
        seconds=time.perf_counter() - start,
        memory=monitor.peak,
        ignored_tensors=ignored,
        padded_vocab_size=padded_vocab,
    )

"""megatron-core ``torch_dist`` checkpoint -> Hugging Face Llama directory, one layer at a time.

Reads any checkpoint this project writes (converted or trained, any TP/PP layout it was saved
with) and writes safetensors shards + index, ``config.json`` and ``generation_config.json`` that
``transformers.LlamaForCausalLM.from_pretrained`` loads. Memory holds one layer's tensors: the
safetensors headers are computed up front and every tensor is appended to its shard as soon as
it is converted.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_syne.convert import layout as L
from megatron_syne.convert.arch import ConversionError, LlamaArch, dtype_from_name, dtype_name
from megatron_syne.convert.hf_checkpoint import streaming_safetensors_writer, write_json
from megatron_syne.convert.hf_to_megatron import ConversionSummary
from megatron_syne.convert.megatron_checkpoint import MegatronCheckpointReader, single_process_group
from megatron_syne.convert.memory import PeakMemoryMonitor

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)


def parse_size(text: str) -> int:
    """``"2GB"`` / ``"500MB"`` / ``"1GiB"`` / ``"123"`` -> bytes (HF's max_shard_size syntax)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", text.upper())
    if not match:
        raise ConversionError(f"invalid size {text!r}; use e.g. 2GB, 500MB, 1GiB")
    value, unit = float(match.group(1)), match.group(2) or "B"
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(value * powers[unit])


@dataclass
class MegatronToHFConfig:
    """Settings of one Megatron -> HF conversion.

    ``load`` is a save root (its latest checkpoint) or an ``iter_*`` directory. The
    architecture comes from the checkpoint (conversion record or the training run's flags);
    ``preset`` or ``hf_config`` (a ``config.json`` to take it from) override that.
    ``dtype`` None writes the checkpoint's dtype.
    """

    load: Path
    save: Path
    preset: str | None = None
    hf_config: Path | None = None
    dtype: str | None = None
    max_shard_size: str = "2GB"
    tokenizer_dir: Path | None = None
    overwrite: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.load = Path(self.load)
        self.save = Path(self.save)
        if self.dtype is not None:
            dtype_from_name(self.dtype)
        if parse_size(self.max_shard_size) <= 0:
            raise ConversionError("--max-shard-size must be > 0")


def _arch_from_run_args(args: Any) -> LlamaArch | None:
    """The architecture from a training run's saved flags (``args`` in the common state).

    The run records its ``--model`` preset and the shape flags that overrode it (None when
    not given), so the shape is the preset with those overrides.
    """
    if args is None:
        return None
    values = dict(args) if isinstance(args, dict) else dict(vars(args))
    if "model" not in values:
        return None
    from megatron_syne.models.presets import get_preset
    from megatron_syne.training.arguments import SHAPE_FIELDS

    try:
        preset = get_preset(values["model"])
        overrides = {k: values[k] for k in SHAPE_FIELDS if values.get(k) is not None}
        preset = preset.replace(**overrides)
    except ValueError as exc:
        raise ConversionError(f"the checkpoint's recorded model flags are invalid: {exc}") from None
    return LlamaArch.from_preset(preset, dtype="bfloat16" if values.get("bf16") else "float32")


def resolve_arch(reader: MegatronCheckpointReader, config: MegatronToHFConfig) -> LlamaArch:
    """Architecture of the checkpoint, checked against its tensor shapes."""
    common = reader.common
    arch: LlamaArch | None = None
    if config.hf_config is not None:
        path = Path(config.hf_config)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConversionError(f"--hf-config {path}: cannot read it as JSON ({exc})") from None
        arch = LlamaArch.from_hf_config(data, str(path))
    elif config.preset is not None:
        from megatron_syne.models.presets import get_preset

        try:
            preset = get_preset(config.preset)
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
        arch = LlamaArch.from_preset(preset, dtype=dtype_name(reader.dtype(L.EMBEDDING)))
    elif isinstance(common.get("conversion"), dict) and "arch" in common["conversion"]:
        arch = LlamaArch.from_dict(common["conversion"]["arch"])
    else:
        arch = _arch_from_run_args(common.get("args"))
    if arch is None:
        raise ConversionError(
            f"{reader.checkpoint_dir}: the checkpoint does not record the model shape; pass "
            "--preset NAME (and shape overrides in a --hf-config config.json if the run used any)"
        )
    if config.dtype is not None:
        arch = arch.replace(dtype=config.dtype)
    _check_shapes(reader, arch)
    return arch


def _check_shapes(reader: MegatronCheckpointReader, arch: LlamaArch) -> None:
    problems = []
    emb_shape = reader.global_shape(L.EMBEDDING)
    if emb_shape[1] != arch.hidden_size or emb_shape[0] < arch.vocab_size:
        problems.append(
            f"{L.EMBEDDING}: shape {list(emb_shape)}, expected [>= {arch.vocab_size}, {arch.hidden_size}]"
        )
    for spec in L.megatron_tensor_specs(arch, emb_shape[0]):
        if not reader.has(spec.key):
            problems.append(f"missing tensor {spec.key}")
            continue
        expected = ((arch.num_layers,) if spec.stacked else ()) + spec.shape
        found = reader.global_shape(spec.key)
        if found != expected:
            problems.append(f"{spec.key}: shape {list(found)}, expected {list(expected)}")
    if not arch.untie_embeddings_and_output_weights and reader.has(L.OUTPUT_LAYER):
        problems.append(
            f"{L.OUTPUT_LAYER} present but the architecture ties embeddings; check --preset"
        )
    if problems:
        raise ConversionError(
            f"{reader.checkpoint_dir}: the checkpoint does not match the model shape:\n  - "
            + "\n  - ".join(problems)
        )


def _prepare_output(save: Path, overwrite: bool) -> None:
    if save.exists() and any(save.iterdir()):
        if not overwrite:
            raise ConversionError(
                f"--save {save} is not empty; choose a new directory or pass --overwrite"
            )
        for child in save.iterdir():
            if child.name.endswith(".safetensors") or child.name in (
                "model.safetensors.index.json",
                "config.json",
                "generation_config.json",
            ):
                child.unlink()
    save.mkdir(parents=True, exist_ok=True)


def convert_megatron_to_hf(config: MegatronToHFConfig) -> ConversionSummary:
    """Convert ``config.load`` into an HF directory ``config.save``."""
    start = time.perf_counter()
    monitor = PeakMemoryMonitor()
    with monitor, single_process_group():
        reader = MegatronCheckpointReader(config.load)
        arch = resolve_arch(reader, config)
        _prepare_output(config.save, config.overwrite)
        dtype = arch.torch_dtype
        shapes = L.hf_tensor_shapes(arch)
        entries = [(name, shape, dtype) for name, shape in shapes.items()]
        vocab = arch.vocab_size
        max_shard = parse_size(config.max_shard_size)
        steps = tqdm(
            total=arch.num_layers + 2,
            desc="megatron->hf",
            unit="layer",
            disable=not config.show_progress,
        )
        with streaming_safetensors_writer(config.save, entries, max_shard) as writer:

            def read(key: str, layer: int | None = None) -> torch.Tensor:
                return reader.read(key, layer, dtype=dtype)

            writer.write(L.HF_EMBEDDING, read(L.EMBEDDING)[:vocab].contiguous())
            steps.update()
            for layer in range(arch.num_layers):
                n = L.hf_layer_names(layer)
                writer.write(n["input_norm"], read(L.QKV_NORM, layer))
                q, k, v = L.split_qkv(read(L.QKV, layer), arch)
                writer.write(n["q"], q)
                writer.write(n["k"], k)
                writer.write(n["v"], v)
                del q, k, v
                writer.write(n["o"], read(L.PROJ, layer))
                writer.write(n["post_norm"], read(L.FC1_NORM, layer))
                gate, up = L.split_gate_up(read(L.FC1, layer))
                writer.write(n["gate"], gate)
                writer.write(n["up"], up)
                del gate, up
                writer.write(n["down"], read(L.FC2, layer))
                steps.update()
            writer.write(L.HF_FINAL_NORM, read(L.FINAL_NORM))
            if arch.untie_embeddings_and_output_weights:
                writer.write(L.HF_LM_HEAD, read(L.OUTPUT_LAYER)[:vocab].contiguous())
            steps.update()
        steps.close()
        write_json(config.save / "config.json", arch.to_hf_config())
        write_json(config.save / "generation_config.json", arch.hf_generation_config())
        if config.tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                source = Path(config.tokenizer_dir) / name
                if source.is_file():
                    shutil.copyfile(source, config.save / name)
    return ConversionSummary(
        output=config.save,
        arch=arch,
        num_tensors=len(entries),
        num_parameters=arch.num_parameters,
        bytes_written=writer.total_bytes,
        seconds=time.perf_counter() - start,
        memory=monitor.peak,
    )

"""The Llama architecture both checkpoint formats describe, and the checks between them.

``LlamaArch`` is the single description of a Llama-3-style decoder that the converter works
from. It is read from a Hugging Face ``config.json`` (refusing features the Megatron model here
cannot express, rather than converting them into a model that silently computes something
else), compared with a ``megatron_syne`` model preset, written back as an HF config, and stored
in the Megatron checkpoint's common state so that the reverse conversion needs no extra input.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_syne.models.presets import SHAPE_FIELDS, DecoderShape


class ConversionError(ValueError):
    """Bad input to a checkpoint conversion: the message names the file and the fix."""


# Llama-3.1 RoPE scaling as megatron-core implements it (RotaryEmbedding._apply_scaling): only
# ``factor`` is configurable there; the other three are fixed to these values.
MEGATRON_LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the names HF configs and our CLI use)."""
    try:
        return _DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ConversionError(
            f"unsupported dtype {name!r}; choose one of {sorted(_DTYPES)}"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ConversionError(f"unsupported dtype {dtype}; choose one of {sorted(_DTYPES)}")


@dataclass(frozen=True, kw_only=True)
class LlamaArch(DecoderShape):
    """A checkpoint's decoder: the shared :class:`DecoderShape` (Megatron's field names, as
    ``ModelPreset``) plus what only a checkpoint carries: its dtype and BOS/EOS ids.

    ``vocab_size`` is the tokenizer's vocabulary (unpadded).
    """

    dtype: str = "bfloat16"
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001

    def _invalid(self, message: str) -> Exception:
        return ConversionError(message)

    def __post_init__(self) -> None:
        super().__post_init__()
        dtype_from_name(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def replace(self, **changes: Any) -> LlamaArch:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaArch:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> LlamaArch:
        """Parse an HF ``LlamaConfig`` dict; ConversionError for anything not convertible.

        ``source`` names the file in error messages.
        """
        problems: list[str] = []
        model_type = config.get("model_type")
        if model_type != "llama":
            problems.append(
                f"model_type is {model_type!r}; only 'llama' (LlamaForCausalLM) is supported"
            )
        act = config.get("hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act={act!r}; the Megatron model uses SwiGLU (silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag, False):
                problems.append(
                    f"{flag}=true; the Megatron Llama model has no biases (add_bias_linear=False)"
                )
        if config.get("attention_dropout", 0.0):
            problems.append("attention_dropout != 0 is not supported")
        # transformers >= 5 writes ``rope_parameters`` (theta inside); older configs (and Meta's
        # released ones) carry ``rope_theta`` and ``rope_scaling``.
        rope_parameters = config.get("rope_parameters") or {}
        rope_scaling = config.get("rope_scaling") or rope_parameters
        rope_theta = config.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
        rope_factor = _parse_rope_scaling(rope_scaling, problems)
        if problems:
            raise ConversionError(
                f"{source}: cannot convert this model:\n  - " + "\n  - ".join(problems)
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            head_dim = config.get("head_dim") or hidden // heads
            dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
            return cls(
                num_layers=int(config["num_hidden_layers"]),
                hidden_size=hidden,
                ffn_hidden_size=int(config["intermediate_size"]),
                num_attention_heads=heads,
                num_query_groups=int(config.get("num_key_value_heads") or heads),
                kv_channels=int(head_dim),
                vocab_size=int(config["vocab_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
                rotary_base=float(rope_theta),
                norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
                untie_embeddings_and_output_weights=not bool(
                    config.get("tie_word_embeddings", False)
                ),
                rope_scaling_factor=rope_factor,
                dtype=str(dtype).removeprefix("torch."),
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
            )
        except KeyError as exc:
            raise ConversionError(f"{source}: required field {exc.args[0]!r} is missing") from None

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> LlamaArch:
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise ConversionError(
                f"{path}: not found; --hf-dir must hold an HF model's config.json"
            )
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{path}: invalid JSON ({exc})") from None
        return cls.from_hf_config(config, source=str(path))

    def to_hf_config(self) -> dict[str, Any]:
        """A ``LlamaConfig`` dict that ``transformers`` loads as ``LlamaForCausalLM``."""
        rope_scaling = None
        if self.rope_scaling_factor is not None:
            rope_scaling = {
                "rope_type": "llama3",
                "factor": self.rope_scaling_factor,
                **MEGATRON_LLAMA3_ROPE_FIXED,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "head_dim": self.kv_channels,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.ffn_hidden_size,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": False,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_query_groups,
            "pretraining_tp": 1,
            "rms_norm_eps": self.norm_epsilon,
            "rope_scaling": rope_scaling,
            "rope_theta": self.rotary_base,
            "tie_word_embeddings": not self.untie_embeddings_and_output_weights,
            "torch_dtype": self.dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def hf_generation_config(self) -> dict[str, Any]:
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}

    # ---- megatron_syne model presets ----
    def check_against_preset(self, preset: Any) -> None:
        """ConversionError listing every field where the checkpoint contradicts ``preset``.

        ``preset`` is a ``megatron_syne.models.presets.ModelPreset``; its ``seq_length`` (a
        training setting) and ``max_position_embeddings`` (the RoPE table size) are not
        compared.
        """
        mismatches = []
        for name in SHAPE_FIELDS:
            if name == "max_position_embeddings":
                continue
            mine, theirs = getattr(self, name), getattr(preset, name)
            if isinstance(mine, float) or isinstance(theirs, float):
                same = (mine is None) == (theirs is None) and (
                    mine is None or math.isclose(float(mine), float(theirs), rel_tol=1e-9)
                )
            else:
                same = mine == theirs
            if not same:
                mismatches.append(f"{name}: checkpoint {mine}, preset {theirs}")
        if mismatches:
            raise ConversionError(
                f"the checkpoint does not match preset {preset.name!r}:\n  - "
                + "\n  - ".join(mismatches)
                + "\nDrop --preset (the checkpoint's own shape is used) or pick the matching preset."
            )

    @classmethod
    def from_preset(cls, preset: DecoderShape, dtype: str = "bfloat16") -> LlamaArch:
        return cls(**preset.shape(), dtype=dtype)

    def to_preset_overrides(self) -> dict[str, Any]:
        """``ModelPreset`` fields for a model of this shape (``preset.replace(**overrides)``)."""
        return self.shape()


def _parse_rope_scaling(rope_scaling: dict[str, Any] | None, problems: list[str]) -> float | None:
    """Llama-3.1 ("llama3") scaling factor, None for no scaling; other kinds are refused."""
    if not rope_scaling:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        problems.append(
            f"rope_scaling type {kind!r} is not supported (megatron-core implements only the "
            "Llama-3.1 'llama3' frequency scaling)"
        )
        return None
    for name, fixed in MEGATRON_LLAMA3_ROPE_FIXED.items():
        value = rope_scaling.get(name, fixed)
        if float(value) != float(fixed):
            problems.append(
                f"rope_scaling.{name}={value}: megatron-core's llama3 RoPE scaling fixes it to "
                f"{fixed}, so the converted model would compute different positions"
            )
    factor = rope_scaling.get("factor")
    if factor is None:
        problems.append("rope_scaling of type 'llama3' has no 'factor'")
        return None
    return float(factor)

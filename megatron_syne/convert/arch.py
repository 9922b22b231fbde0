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


@dataclass(frozen=True)
class LlamaArch:
    """Shape and numerics of a Llama-3-style decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases).

    Field names follow megatron_syne's ``ModelPreset`` (Megatron's flag names).
    ``vocab_size`` is the tokenizer's vocabulary (unpadded); ``rope_scaling_factor`` is the
    Llama-3.1 RoPE frequency scaling factor (None: no scaling).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    norm_epsilon: float
    untie_embeddings_and_output_weights: bool
    rope_scaling_factor: float | None = None
    dtype: str = "bfloat16"
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "vocab_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConversionError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConversionError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}: grouped-query attention needs whole groups"
            )
        if self.rotary_base <= 0 or self.norm_epsilon <= 0:
            raise ConversionError("rotary_base and norm_epsilon must be > 0")
        if self.rope_scaling_factor is not None and self.rope_scaling_factor <= 0:
            raise ConversionError(
                f"rope_scaling_factor must be > 0, got {self.rope_scaling_factor}"
            )
        dtype_from_name(self.dtype)

    # ---- derived sizes (rows of the fused Megatron weights) ----
    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        """Output features of the fused QKV projection: (heads + 2 * groups) * head_dim."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def num_parameters(self) -> int:
        """Parameters of the unpadded model, embeddings included."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q = self.num_attention_heads * self.kv_channels
        per_layer = h * self.qkv_rows + q * h + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (2 if self.untie_embeddings_and_output_weights else 1)
        return self.num_layers * per_layer + emb + h

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
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "vocab_size",
            "untie_embeddings_and_output_weights",
        ):
            if getattr(preset, name) != getattr(self, name):
                mismatches.append(
                    f"{name}: checkpoint {getattr(self, name)}, preset {getattr(preset, name)}"
                )
        for name in ("rotary_base", "norm_epsilon"):
            if not math.isclose(
                float(getattr(preset, name)), float(getattr(self, name)), rel_tol=1e-9
            ):
                mismatches.append(
                    f"{name}: checkpoint {getattr(self, name)}, preset {getattr(preset, name)}"
                )
        preset_factor = getattr(preset, "rope_scaling_factor", None)
        if preset_factor != self.rope_scaling_factor:
            mismatches.append(
                f"rope_scaling_factor: checkpoint {self.rope_scaling_factor}, preset {preset_factor}"
            )
        if mismatches:
            raise ConversionError(
                f"the checkpoint does not match preset {preset.name!r}:\n  - "
                + "\n  - ".join(mismatches)
                + "\nDrop --preset (the checkpoint's own shape is used) or pick the matching preset."
            )

    @classmethod
    def from_preset(cls, preset: Any, dtype: str = "bfloat16") -> LlamaArch:
        return cls(
            num_layers=preset.num_layers,
            hidden_size=preset.hidden_size,
            ffn_hidden_size=preset.ffn_hidden_size,
            num_attention_heads=preset.num_attention_heads,
            num_query_groups=preset.num_query_groups,
            kv_channels=preset.kv_channels,
            vocab_size=preset.vocab_size,
            max_position_embeddings=preset.max_position_embeddings,
            rotary_base=float(preset.rotary_base),
            norm_epsilon=float(preset.norm_epsilon),
            untie_embeddings_and_output_weights=preset.untie_embeddings_and_output_weights,
            rope_scaling_factor=getattr(preset, "rope_scaling_factor", None),
            dtype=dtype,
        )

    def to_preset_overrides(self) -> dict[str, Any]:
        """``ModelPreset`` fields for a model of this shape (``preset.replace(**overrides)``)."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "kv_channels": self.kv_channels,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rotary_base": self.rotary_base,
            "norm_epsilon": self.norm_epsilon,
            "untie_embeddings_and_output_weights": self.untie_embeddings_and_output_weights,
            "rope_scaling_factor": self.rope_scaling_factor,
        }


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

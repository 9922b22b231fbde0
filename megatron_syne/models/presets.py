"""Published Llama-3-family shapes as typed presets.

Field names follow Megatron's ``TransformerConfig`` / command-line flags, so a preset field ``x``
is overridden on the command line by ``--x`` with dashes (``--num-query-groups``,
``--rotary-base``, ...).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

# The fields that fix a decoder's shape and numerics, in Megatron's flag names.
SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "max_position_embeddings",
    "rotary_base",
    "norm_epsilon",
    "untie_embeddings_and_output_weights",
    "rope_scaling_factor",
)
_POSITIVE_INTS = SHAPE_FIELDS[:8]


@dataclass(frozen=True, kw_only=True)
class DecoderShape:
    """Shape of a Llama-3-style decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases).

    The one description shared by the model presets (:class:`ModelPreset`) and the checkpoint
    converter (``megatron_syne.convert.arch.LlamaArch``). ``max_position_embeddings`` is the
    longest context the RoPE tables are built for; ``rope_scaling_factor`` the Llama-3.1/3.2
    RoPE frequency scaling (None: no scaling).
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

    def _invalid(self, message: str) -> Exception:
        """The exception for an invalid shape (subclasses add context and their error type)."""
        return ValueError(message)

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise self._invalid(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise self._invalid(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups} (grouped-query attention needs whole "
                "groups)"
            )
        if self.rotary_base <= 0 or self.norm_epsilon <= 0:
            raise self._invalid("rotary_base and norm_epsilon must be > 0")
        if self.rope_scaling_factor is not None and self.rope_scaling_factor <= 0:
            raise self._invalid(f"rope_scaling_factor must be > 0, got {self.rope_scaling_factor}")

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        """Output features of the fused QKV projection: (heads + 2 * groups) * head_dim."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    @property
    def num_parameters(self) -> int:
        """Exact parameter count of the unpadded model (embeddings included)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q = self.num_attention_heads * self.kv_channels
        per_layer = h * self.qkv_rows + q * h + 3 * h * f + 2 * h
        embeddings = self.vocab_size * h * (2 if self.untie_embeddings_and_output_weights else 1)
        return self.num_layers * per_layer + embeddings + h

    def shape(self) -> dict:
        """The :data:`SHAPE_FIELDS` of this object, e.g. to build another kind from them."""
        return {name: getattr(self, name) for name in SHAPE_FIELDS}


@dataclass(frozen=True, kw_only=True)
class ModelPreset(DecoderShape):
    """A named decoder shape plus its training context ``seq_length`` (tokens)."""

    name: str
    seq_length: int

    def _invalid(self, message: str) -> Exception:
        return ValueError(f"preset {self.name!r}: {message}")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seq_length, bool) or not isinstance(self.seq_length, numbers.Integral):
            raise self._invalid(f"seq_length must be a positive integer, got {self.seq_length!r}")
        if self.seq_length <= 0:
            raise self._invalid(f"seq_length must be > 0, got {self.seq_length}")
        if self.seq_length > self.max_position_embeddings:
            raise self._invalid(
                f"seq_length={self.seq_length} exceeds max_position_embeddings="
                f"{self.max_position_embeddings}; raise --max-position-embeddings or shorten "
                "--seq-length"
            )

    def replace(self, **overrides) -> ModelPreset:
        """A copy with some fields changed (validated again). Unknown names raise ValueError.

        When ``hidden_size`` or ``num_attention_heads`` change and ``kv_channels`` is not given,
        ``kv_channels`` follows as hidden_size // num_attention_heads (the Llama convention).
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown ModelPreset field(s) {unknown}; valid: {sorted(names)}")
        if ("hidden_size" in overrides or "num_attention_heads" in overrides) and (
            "kv_channels" not in overrides
        ):
            hidden = overrides.get("hidden_size", self.hidden_size)
            heads = overrides.get("num_attention_heads", self.num_attention_heads)
            if hidden % heads:
                raise ValueError(
                    f"hidden_size={hidden} is not divisible by num_attention_heads={heads}; "
                    "pass --kv-channels explicitly if the head dimension is meant to differ"
                )
            overrides["kv_channels"] = hidden // heads
        return dataclasses.replace(self, **overrides)


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="llama3-8b",
            num_layers=32,
            hidden_size=4096,
            ffn_hidden_size=14336,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=128,
            vocab_size=128256,
            seq_length=8192,
            max_position_embeddings=8192,
            rotary_base=500000.0,
            norm_epsilon=1e-5,
            untie_embeddings_and_output_weights=True,
        ),
        ModelPreset(
            name="llama3-70b",
            num_layers=80,
            hidden_size=8192,
            ffn_hidden_size=28672,
            num_attention_heads=64,
            num_query_groups=8,
            kv_channels=128,
            vocab_size=128256,
            seq_length=8192,
            max_position_embeddings=8192,
            rotary_base=500000.0,
            norm_epsilon=1e-5,
            untie_embeddings_and_output_weights=True,
        ),
        # The paper's 1.1B proxy (TinyLlama): Llama-2 tokenizer, RoPE base 10000.
        ModelPreset(
            name="tinyllama-1.1b",
            num_layers=22,
            hidden_size=2048,
            ffn_hidden_size=5632,
            num_attention_heads=32,
            num_query_groups=4,
            kv_channels=64,
            vocab_size=32000,
            seq_length=2048,
            max_position_embeddings=2048,
            rotary_base=10000.0,
            norm_epsilon=1e-5,
            untie_embeddings_and_output_weights=True,
        ),
        # Llama-3.2-1B: tied embeddings and Llama-3.1 RoPE scaling (factor 32).
        ModelPreset(
            name="llama3-1b",
            num_layers=16,
            hidden_size=2048,
            ffn_hidden_size=8192,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=64,
            vocab_size=128256,
            seq_length=8192,
            max_position_embeddings=131072,
            rotary_base=500000.0,
            norm_epsilon=1e-5,
            untie_embeddings_and_output_weights=False,
            rope_scaling_factor=32.0,
        ),
        # For tests and the CPU quick-start: Llama-3 vocabulary so real tokenized data fits;
        # tests shrink vocab_size with --vocab-size for speed.
        ModelPreset(
            name="tiny",
            num_layers=4,
            hidden_size=128,
            ffn_hidden_size=352,
            num_attention_heads=4,
            num_query_groups=2,
            kv_channels=32,
            vocab_size=128256,
            seq_length=256,
            max_position_embeddings=4096,
            rotary_base=500000.0,
            norm_epsilon=1e-5,
            untie_embeddings_and_output_weights=True,
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None

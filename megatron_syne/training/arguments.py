"""Training arguments: one typed, validated dataclass whose fields are Megatron's flag names.

``--tensor-model-parallel-size`` is the field ``tensor_model_parallel_size``, and so on, so code
written against Megatron-LM's ``args`` (and the dataset builders of other engineers) reads the
same attribute names. The parser is generated from the fields (help text in ``metadata``), so a
flag cannot exist without its typed field, its default and its validation.

Units: ``*_iters`` are optimizer steps (one global batch each), ``*_tokens`` are tokens
(``global_batch_size * seq_length`` per step), ``*_samples`` are sequences.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

from megatron_syne.models.presets import PRESETS, ModelPreset, get_preset
from megatron_syne.models.presets import SHAPE_FIELDS as PRESET_SHAPE_FIELDS

# Shape fields without a flag of their own: they come from the preset.
NON_FLAG_SHAPE_FIELDS = ("untie_embeddings_and_output_weights", "rope_scaling_factor")

# Preset fields that a flag of the same name overrides: the numeric shape fields, and the
# training context.
SHAPE_FIELDS = (
    *(f for f in PRESET_SHAPE_FIELDS if f not in NON_FLAG_SHAPE_FIELDS),
    "seq_length",
)

LLAMA3_EOD_TOKEN_ID = 128001


class ArgumentError(ValueError):
    """A flag value or combination that cannot work; the message says which flags and the fix."""


def _arg(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainArgs:
    # ---- model -------------------------------------------------------------------------------
    model: str = _arg("tiny", "model preset", choices=sorted(PRESETS))
    num_layers: int | None = _arg(None, "override the preset's number of transformer layers")
    hidden_size: int | None = _arg(None, "override the preset's hidden size")
    ffn_hidden_size: int | None = _arg(None, "override the preset's SwiGLU inner size")
    num_attention_heads: int | None = _arg(None, "override the preset's query heads")
    num_query_groups: int | None = _arg(None, "override the preset's KV heads (GQA groups)")
    kv_channels: int | None = _arg(None, "override the preset's head dimension")
    vocab_size: int | None = _arg(None, "override the preset's vocabulary size (before padding)")
    max_position_embeddings: int | None = _arg(None, "override the preset's RoPE table length")
    rotary_base: float | None = _arg(None, "override the preset's RoPE base")
    norm_epsilon: float | None = _arg(None, "override the preset's RMSNorm epsilon")
    make_vocab_size_divisible_by: int = _arg(
        128, "pad the vocabulary to a multiple of lcm(this, TP) (layout-independent padding)"
    )
    transformer_impl: str = _arg(
        "local",
        "layer spec: local (torch SDPA) or transformer_engine",
        choices=["local", "transformer_engine"],
    )
    # ---- parallelism and device --------------------------------------------------------------
    device: str | None = _arg(
        None, "cpu (gloo) or cuda (NCCL); default: cuda if available", choices=["cpu", "cuda"]
    )
    tensor_model_parallel_size: int = _arg(1, "tensor-parallel ranks")
    pipeline_model_parallel_size: int = _arg(1, "pipeline stages")
    context_parallel_size: int = _arg(1, "context-parallel ranks (needs the TE layer spec)")
    sequence_parallel: bool = _arg(False, "shard norms/dropout activations over the TP group")
    use_distributed_optimizer: bool = _arg(
        False, "shard optimizer state over data-parallel ranks (ZeRO-1)"
    )
    # ---- precision ---------------------------------------------------------------------------
    bf16: bool = _arg(False, "bf16 parameters and activations, fp32 main weights and grads")
    fp8_format: str | None = _arg(
        None, "FP8 through Transformer Engine", choices=["hybrid", "e4m3"]
    )
    # ---- batch and length --------------------------------------------------------------------
    micro_batch_size: int = _arg(1, "sequences per micro batch per data-parallel rank")
    global_batch_size: int | None = _arg(None, "sequences per optimizer step (default micro x DP)")
    seq_length: int | None = _arg(None, "tokens per sequence (default: the preset's)")
    train_iters: int | None = _arg(None, "optimizer steps to train for")
    train_tokens: int | None = _arg(None, "tokens to train for (alternative to --train-iters)")
    # ---- optimizer ---------------------------------------------------------------------------
    lr: float = _arg(1e-5, "peak learning rate")
    min_lr: float = _arg(0.0, "learning rate at the end of the decay phase")
    lr_warmup_init: float = _arg(0.0, "learning rate at step 0 (warmup start)")
    lr_warmup_iters: int = _arg(0, "warmup length in steps")
    lr_warmup_tokens: int | None = _arg(
        None, "warmup length in tokens (wins over --lr-warmup-iters)"
    )
    lr_decay_style: str = _arg(
        "WSD",
        "schedule after warmup",
        choices=["constant", "linear", "cosine", "WSD", "inverse-square-root"],
    )
    lr_decay_iters: int | None = _arg(
        None, "steps over which the decay style runs (default: train iters)"
    )
    lr_wsd_decay_iters: int = _arg(0, "WSD: length of the final decay phase in steps (0: no decay)")
    lr_wsd_decay_tokens: int | None = _arg(None, "WSD: decay phase length in tokens")
    lr_wsd_decay_style: str = _arg(
        "linear", "WSD decay shape", choices=["linear", "cosine", "exponential", "minus_sqrt"]
    )
    weight_decay: float = _arg(0.1, "AdamW decoupled weight decay")
    adam_beta1: float = _arg(0.9, "AdamW beta1")
    adam_beta2: float = _arg(0.95, "AdamW beta2")
    adam_eps: float = _arg(1e-8, "AdamW epsilon")
    clip_grad: float = _arg(1.0, "clip the global gradient L2 norm to this (0: off)")
    max_consecutive_skipped_steps: int = _arg(
        10, "stop after this many steps in a row skipped for a non-finite loss or gradient"
    )
    # ---- loss --------------------------------------------------------------------------------
    cross_entropy_loss_fusion: bool = _arg(False, "use a fused vocab-parallel cross entropy")
    cross_entropy_fusion_impl: str = _arg(
        "native",
        "fused cross-entropy implementation (syne-linear: output layer fused into the loss)",
        choices=["native", "te", "syne", "syne-linear"],
    )
    # ---- data --------------------------------------------------------------------------------
    data_path: list[str] | None = _arg(
        None, "static blend: [weight] prefix [weight prefix ...]", nargs="+"
    )
    split: str = _arg("969,30,1", "train,valid,test split of --data-path documents")
    data_cache_path: str | None = _arg(None, "where dataset index caches go (default beside data)")
    mock_data: bool = _arg(False, "synthetic token sequences (megatron-core MockGPTDataset)")
    data_config: str | None = _arg(None, "mixture spec YAML (dynamic mixture and curriculum)")
    data_root: str | None = _arg(
        None,
        "root of relative source paths in --data-config (default: the spec's data_root, else "
        "the spec file's directory)",
    )
    eod_token_id: int | None = _arg(
        None,
        "end-of-document token (default: Llama-3's 128001, or vocab_size-1 for smaller vocabs)",
    )
    # ---- checkpointing -----------------------------------------------------------------------
    save: str | None = _arg(None, "checkpoint directory to save to")
    load: str | None = _arg(None, "checkpoint directory to resume or start from")
    save_interval: int | None = _arg(None, "save every N steps (and at the end)")
    dist_ckpt_optim_fully_reshardable: bool = _arg(
        False, "save distributed-optimizer state loadable with another TP/PP (gathers on save)"
    )
    no_load_optim: bool = _arg(
        False, "do not restore optimizer state (start CPT from base weights)"
    )
    no_load_rng: bool = _arg(False, "do not restore RNG states")
    finetune: bool = _arg(
        False, "load weights only and start at iteration 0 (implies --no-load-optim --no-load-rng)"
    )
    # ---- evaluation and logging --------------------------------------------------------------
    eval_interval: int | None = _arg(None, "validation loss every N steps")
    eval_iters: int = _arg(10, "global batches per validation")
    log_interval: int = _arg(10, "print and record metrics every N steps")
    tensorboard_dir: str | None = _arg(None, "TensorBoard event directory")
    metrics_jsonl: str | None = _arg(None, "also append every logged record as JSON lines here")
    peak_tflops: float | None = _arg(
        None, "per-device peak TFLOP/s for MFU (default: known GPUs in bf16; none on CPU)"
    )
    seed: int = _arg(1234, "random seed (weights, data order)")
    exit_interval: int | None = _arg(None, "stop after this step (the run can be resumed)")

    # Derived (set in __post_init__, not flags).
    preset: ModelPreset = field(init=False, repr=False, metadata={"derived": True})
    data_parallel_size: int = field(init=False, default=1, metadata={"derived": True})
    world_size: int = field(default=1, metadata={"derived": True})
    padded_vocab_size: int = field(init=False, default=0, metadata={"derived": True})

    def __post_init__(self) -> None:
        self._resolve_model()
        self._resolve_parallel()
        self._resolve_batch_and_schedule()
        self._check_data_and_checkpoint()

    # -- validation, one concern per method ----------------------------------------------------
    def _resolve_model(self) -> None:
        base = get_preset(self.model)
        overrides = {
            name: getattr(self, name) for name in SHAPE_FIELDS if getattr(self, name) is not None
        }
        try:
            self.preset = base.replace(**overrides)
        except ValueError as err:
            given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
            raise ArgumentError(f"--model {self.model} with {given}: {err}") from None
        self.seq_length = self.preset.seq_length
        from megatron_syne.models.llama3 import padded_vocab_size

        self.padded_vocab_size = padded_vocab_size(
            self.preset.vocab_size,
            self.make_vocab_size_divisible_by,
            self.tensor_model_parallel_size,
        )
        if self.eod_token_id is None:
            vocab = self.preset.vocab_size
            self.eod_token_id = LLAMA3_EOD_TOKEN_ID if vocab > LLAMA3_EOD_TOKEN_ID else vocab - 1
        if not 0 <= self.eod_token_id < self.preset.vocab_size:
            raise ArgumentError(
                f"--eod-token-id {self.eod_token_id} is outside the vocabulary [0, {self.preset.vocab_size})"
            )

    def _resolve_parallel(self) -> None:
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        tp, pp, cp = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.context_parallel_size,
        )
        if min(tp, pp, cp) < 1:
            raise ArgumentError("parallel sizes must be >= 1")
        if self.world_size % (tp * pp * cp):
            raise ArgumentError(
                f"{self.world_size} processes cannot be split into TP={tp} x PP={pp} x CP={cp}; "
                "make the process count a multiple of their product"
            )
        self.data_parallel_size = self.world_size // (tp * pp * cp)
        p = self.preset
        if p.num_attention_heads % tp or p.num_query_groups % tp:
            raise ArgumentError(
                f"--tensor-model-parallel-size {tp} must divide num_attention_heads="
                f"{p.num_attention_heads} and num_query_groups={p.num_query_groups}"
            )
        if p.num_layers % pp:
            raise ArgumentError(
                f"--pipeline-model-parallel-size {pp} must divide num_layers={p.num_layers}"
            )
        if self.sequence_parallel and tp == 1:
            raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.sequence_parallel and self.seq_length % tp:
            raise ArgumentError(f"--sequence-parallel needs --seq-length divisible by TP={tp}")
        if cp > 1 and self.transformer_impl != "transformer_engine":
            raise ArgumentError(
                "--context-parallel-size > 1 needs --transformer-impl transformer_engine "
                "(the local SDPA spec has no ring attention)"
            )
        if self.fp8_format is not None:
            from megatron_syne.models.llama3 import transformer_engine_available

            if not transformer_engine_available():
                raise ArgumentError(
                    f"--fp8-format {self.fp8_format} needs Transformer Engine, which does not import "
                    "here; FP8 is never silently ignored. Drop --fp8-format or run in a container "
                    "with TE (e.g. NGC PyTorch)"
                )
            if self.transformer_impl != "transformer_engine":
                raise ArgumentError("--fp8-format needs --transformer-impl transformer_engine")
        if self.transformer_impl == "transformer_engine":
            from megatron_syne.models.llama3 import transformer_engine_available

            if not transformer_engine_available():
                raise ArgumentError(
                    "--transformer-impl transformer_engine: Transformer Engine does not import "
                    "here; use --transformer-impl local"
                )
        if self.cross_entropy_loss_fusion and self.cross_entropy_fusion_impl == "te":
            from megatron_syne.models.llama3 import transformer_engine_available

            if not transformer_engine_available():
                raise ArgumentError(
                    "--cross-entropy-fusion-impl te needs Transformer Engine; use native or syne"
                )

    def _resolve_batch_and_schedule(self) -> None:
        mbs, dp = self.micro_batch_size, self.data_parallel_size
        if mbs < 1:
            raise ArgumentError("--micro-batch-size must be >= 1")
        if self.global_batch_size is None:
            self.global_batch_size = mbs * dp
        if self.global_batch_size % (mbs * dp):
            raise ArgumentError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {mbs} x data-parallel size {dp} = {mbs * dp}; choose a global "
                f"batch that is a multiple of {mbs * dp} (e.g. {mbs * dp * max(1, self.global_batch_size // (mbs * dp))})"
            )
        tokens_per_step = self.tokens_per_step
        if self.train_iters is not None and self.train_tokens is not None:
            raise ArgumentError("give exactly one of --train-iters and --train-tokens, not both")
        if self.train_iters is None and self.train_tokens is None:
            if self.data_config is None:
                raise ArgumentError(
                    "give exactly one of --train-iters and --train-tokens (with --data-config, "
                    "leave both out to train the spec's stages)"
                )
            # A mixture spec states its own length (stage budgets): train exactly that.
            self.train_iters = self._mixture_plan_iterations()
        if self.train_tokens is not None:
            self.train_iters = math.ceil(self.train_tokens / tokens_per_step)
        if self.train_iters < 1:
            raise ArgumentError("--train-iters must be >= 1")
        if self.lr_warmup_tokens is not None:
            self.lr_warmup_iters = math.ceil(self.lr_warmup_tokens / tokens_per_step)
        if self.lr_wsd_decay_tokens is not None:
            self.lr_wsd_decay_iters = math.ceil(self.lr_wsd_decay_tokens / tokens_per_step)
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.train_iters
        if not 0.0 <= self.min_lr <= self.lr or not 0.0 <= self.lr_warmup_init <= self.lr:
            raise ArgumentError("need 0 <= --min-lr <= --lr and 0 <= --lr-warmup-init <= --lr")
        if self.lr_decay_style != "constant" and self.lr_decay_iters <= self.lr_warmup_iters:
            raise ArgumentError(
                f"--lr-decay-iters ({self.lr_decay_iters}, default --train-iters) must exceed "
                f"--lr-warmup-iters ({self.lr_warmup_iters})"
            )
        if (
            self.lr_decay_style == "WSD"
            and self.lr_wsd_decay_iters > self.lr_decay_iters - self.lr_warmup_iters
        ):
            raise ArgumentError(
                f"--lr-wsd-decay-iters {self.lr_wsd_decay_iters} is longer than the time after "
                f"warmup ({self.lr_decay_iters - self.lr_warmup_iters} steps)"
            )
        if self.log_interval < 1 or self.eval_iters < 0:
            raise ArgumentError("--log-interval must be >= 1 and --eval-iters >= 0")
        if self.max_consecutive_skipped_steps < 1:
            raise ArgumentError("--max-consecutive-skipped-steps must be >= 1")

    def _check_data_and_checkpoint(self) -> None:
        sources = [self.data_path is not None, self.mock_data, self.data_config is not None]
        if sum(sources) != 1:
            raise ArgumentError(
                "give exactly one data source: --data-path, --mock-data or --data-config"
            )
        if self.save_interval is not None and self.save is None:
            raise ArgumentError("--save-interval needs --save DIR")
        if self.load is not None and not os.path.isdir(self.load):
            same_as_save = self.save is not None and os.path.abspath(self.load) == os.path.abspath(
                self.save
            )
            if not same_as_save:  # --load = --save on a first run means "resume if possible"
                raise ArgumentError(
                    f"--load {self.load}: no such directory; pass a directory written by --save "
                    "(or one of its iter_XXXXXXX directories)"
                )
        if self.finetune:
            self.no_load_optim = True
            self.no_load_rng = True

    # -- derived quantities --------------------------------------------------------------------
    @property
    def num_microbatches(self) -> int:
        """Micro batches per optimizer step on each data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step over all ranks."""
        return self.global_batch_size * self.seq_length

    def _mixture_plan_iterations(self) -> int:
        """Optimizer steps the --data-config spec's stages add up to (its data is checked too)."""
        from megatron_syne.data.mixture_training import plan_from_spec
        from megatron_syne.data.spec import SpecError

        try:
            plan = plan_from_spec(
                self.data_config, self.data_root, self.seq_length, self.global_batch_size
            )
        except SpecError as err:
            raise ArgumentError(str(err)) from err
        return plan.total_iterations


def _flag_type(annotation):
    """(argparse type, is_bool, is_list) for a field annotation string like 'int | None'."""
    text = str(annotation)
    if text.startswith("bool"):
        return None, True, False
    if text.startswith("list[str]"):
        return str, False, True
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return typ, False, False
    raise TypeError(f"unsupported flag annotation {annotation!r}")


def _int_or_sci(text: str) -> int:
    # Token budgets are written like 92.5e9 on command lines.
    value = float(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one ``--flag-name`` per ``TrainArgs`` field."""
    parser = argparse.ArgumentParser(
        description="Continual pre-training of Llama-3 on megatron-core (megatron-syne).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainArgs):
        if f.metadata.get("derived"):
            continue
        typ, is_bool, is_list = _flag_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": f.metadata["help"], "default": f.default, "dest": f.name}
        if is_bool:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        if typ is int:
            typ = _int_or_sci
        if is_list:
            kwargs["nargs"] = f.metadata.get("nargs", "+")
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, type=typ, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> TrainArgs:
    """Parse and validate flags. ``world_size`` defaults to $WORLD_SIZE (torchrun) or 1.

    Raises :class:`ArgumentError` with a message naming the flags at fault.
    """
    namespace = build_parser().parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return TrainArgs(**vars(namespace), world_size=world_size)


def args_to_dict(args: TrainArgs) -> dict:
    """Flag values as a plain dict (for checkpoints and logs)."""
    out = {}
    for f in dataclasses.fields(args):
        if f.name == "preset":
            continue
        out[f.name] = getattr(args, f.name)
    return out

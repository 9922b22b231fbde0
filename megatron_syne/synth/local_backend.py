"""A local ``transformers`` generator with the same interface as the HTTP client.

For small models in a local directory (a laptop check of the prompts, a CI smoke test, a
cluster node without a server). Requests are batched: whatever is waiting when the model
becomes free (up to ``batch_size``) is generated together with left padding. Nothing is
downloaded: ``model_dir`` must hold the weights and the tokenizer.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from megatron_syne.synth.client import ChatResult, RequestFailed

_FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class LocalConfig:
    """``max_new_tokens`` and ``max_prompt_tokens`` are in tokens of the model's tokenizer."""

    model_dir: str
    device: str = "cpu"
    dtype: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 4096
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not Path(self.model_dir).is_dir():
            raise FileNotFoundError(
                f"--local-model {self.model_dir} is not a directory (a local model directory "
                "with config.json, weights and tokenizer files is required; nothing is downloaded)"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"--local-dtype {self.dtype!r}: use auto, float32, bfloat16 or float16"
            )
        if min(self.max_new_tokens, self.max_prompt_tokens, self.batch_size) < 1:
            raise ValueError("LocalConfig: token limits and batch_size must be >= 1")


class TransformersBackend:
    """Chat completions from a local causal LM (``AutoModelForCausalLM``)."""

    def __init__(self, config: LocalConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        dtype = {
            "auto": torch.bfloat16 if config.device.startswith("cuda") else torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[config.dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = _FALLBACK_TEMPLATE
        self.model = AutoModelForCausalLM.from_pretrained(
            config.model_dir, dtype=dtype, local_files_only=True
        ).to(config.device)
        self.model.eval()
        self._torch = torch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.stats: Counter[str] = Counter()

    @property
    def generator_name(self) -> str:
        return f"local:{Path(self.config.model_dir).name}"

    def _generate_batch(
        self, batch: list[tuple[list[dict[str, str]], int, float, int | None]]
    ) -> list[tuple[str, str, int, int]]:
        torch = self._torch
        prompts = [
            self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            for m, _, _, _ in batch
        ]
        enc = self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(self.config.device)
        max_new = max(b[1] for b in batch)
        temperature = batch[0][2]
        seed = batch[0][3]
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=self.config.top_p if temperature > 0 else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        eos = self.tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        results = []
        prompt_len = enc["input_ids"].shape[1]
        for i, (_, limit, _, _) in enumerate(batch):
            new = out[i, prompt_len:].tolist()
            ended = next((j for j, t in enumerate(new) if t in eos_ids), None)
            if ended is not None:
                new, finish = new[:ended], "stop"
            elif len(new) >= limit:
                new, finish = new[:limit], "length"
            else:
                finish = "stop"
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            n_prompt = int(enc["attention_mask"][i].sum())
            results.append((text, finish, n_prompt, len(new)))
        return results

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self.config.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                outs = await asyncio.to_thread(
                    self._generate_batch, [(m, n, t, s) for m, n, t, s, _ in batch]
                )
                for (*_, fut), out in zip(batch, outs):
                    if not fut.done():
                        fut.set_result(out)
            except Exception as err:  # a failed batch fails its requests, not the worker
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> ChatResult:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._serve())
        prompt = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt > self.config.max_prompt_tokens:
            # Cutting either end would drop the instructions or the seed: refuse instead,
            # like a server answering HTTP 400 for a prompt longer than its context.
            self.stats["failed_prompt_too_long"] += 1
            raise RequestFailed(
                "prompt_too_long",
                f"prompt has {n_prompt} tokens > --local-max-prompt-tokens "
                f"{self.config.max_prompt_tokens}",
                retryable=False,
                attempts=1,
            )
        future = asyncio.get_running_loop().create_future()
        temp = self.config.temperature if temperature is None else temperature
        limit = max_tokens or self.config.max_new_tokens
        start = time.monotonic()
        await self._queue.put((messages, limit, temp, seed, future))
        text, finish, n_prompt, n_new = await future
        self.stats["requests"] += 1
        self.stats["completed"] += 1
        if finish == "length":
            self.stats["truncated"] += 1
        return ChatResult(
            text=text,
            finish_reason=finish,
            model=self.generator_name,
            server="local",
            attempts=1,
            latency_s=time.monotonic() - start,
            prompt_tokens=n_prompt,
            completion_tokens=n_new,
        )

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
            self._queue = None

"""Async client for OpenAI-compatible chat-completions servers (vLLM, SGLang, TGI, ...).

One :class:`ChatClient` spreads requests over a fleet of ``--api-base`` servers, bounds the
number of requests in flight, enforces a total per-request deadline and retries transient
failures (HTTP 429/408/5xx, dropped connections, timeouts, malformed JSON) with exponential
backoff and full jitter, honouring ``Retry-After``. A ``finish_reason == "length"`` answer is
not an error of the transport: it is returned with ``truncated=True`` for the caller's filters.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from megatron_syne.synth.http import HttpPool

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class RequestFailed(Exception):
    """A request that could not be completed.

    ``retryable`` says whether running the item again later may succeed (the retries of this
    run were exhausted on a transient error) or not (the server rejected the request itself,
    e.g. HTTP 400 for a prompt longer than the context).
    """

    def __init__(self, reason: str, message: str, retryable: bool, attempts: int):
        super().__init__(f"{reason}: {message} (after {attempts} attempt(s))")
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.attempts = attempts


@dataclass
class ChatResult:
    """One completed chat completion."""

    text: str
    finish_reason: str | None
    model: str
    server: str
    attempts: int
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def truncated(self) -> bool:
        """True when generation stopped at ``max_tokens`` rather than at an end of turn."""
        return self.finish_reason == "length"


class ChatBackend(Protocol):
    """What the synthesis pipelines need from a generator (HTTP fleet or local model)."""

    @property
    def generator_name(self) -> str: ...

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> ChatResult: ...

    async def aclose(self) -> None: ...


@dataclass
class ClientConfig:
    """Settings of :class:`ChatClient`. Times are in seconds, token counts in tokens."""

    api_bases: list[str]
    model: str
    api_key: str | None = None
    max_concurrency: int = 64
    request_timeout: float = 300.0
    connect_timeout: float = 10.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 0.95
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.api_bases, str):
            self.api_bases = [self.api_bases]
        if not self.api_bases:
            raise ValueError(
                "ClientConfig: give at least one --api-base (e.g. http://host:8000/v1)"
            )
        for base in self.api_bases:
            if not base.startswith(("http://", "https://")):
                raise ValueError(
                    f"ClientConfig: --api-base {base!r} must start with http:// or https://"
                )
        self.api_bases = [b.rstrip("/") for b in self.api_bases]
        if not self.model:
            raise ValueError("ClientConfig: --model is required (the served model name)")
        if self.max_concurrency < 1:
            raise ValueError(
                f"ClientConfig: max_concurrency must be >= 1, got {self.max_concurrency}"
            )
        if self.request_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("ClientConfig: timeouts must be positive seconds")
        if self.max_retries < 0:
            raise ValueError(f"ClientConfig: max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_base < 0 or self.backoff_max < self.backoff_base:
            raise ValueError("ClientConfig: need 0 <= backoff_base <= backoff_max")
        if not isinstance(self.extra_body, dict):
            raise ValueError("ClientConfig: extra_body (--extra-body) must be a JSON object")
        if self.max_tokens < 1:
            raise ValueError(f"ClientConfig: max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class _Server:
    base: str
    pool: HttpPool
    in_flight: int = 0
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    requests: int = 0
    failures: int = 0


class _Retryable(Exception):
    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatClient:
    """Chat completions over one or more OpenAI-compatible servers.

    Use as ``async with ChatClient(config) as client: await client.complete(messages)``.
    ``stats`` counts requests, retries by reason and final failures for the run summary.
    """

    def __init__(self, config: ClientConfig, rng: random.Random | None = None):
        self.config = config
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._servers = [
            _Server(base, HttpPool(base, headers, config.connect_timeout))
            for base in config.api_bases
        ]
        self._rr = 0
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._rng = rng or random.Random()
        self.stats: Counter[str] = Counter()

    @property
    def generator_name(self) -> str:
        return self.config.model

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for server in self._servers:
            server.pool.close()

    def server_stats(self) -> list[dict[str, Any]]:
        """Per-server request and failure counts (for the summary)."""
        return [
            {"api_base": s.base, "requests": s.requests, "failures": s.failures}
            for s in self._servers
        ]

    def _pick_server(self, avoid: _Server | None) -> _Server:
        # Least outstanding requests among healthy servers; round-robin breaks ties so equal
        # replicas get equal load. A server that just failed is avoided for the retry.
        now = time.monotonic()
        healthy = [s for s in self._servers if s.cooldown_until <= now] or self._servers
        if avoid is not None and len(healthy) > 1:
            healthy = [s for s in healthy if s is not avoid] or healthy
        self._rr += 1
        n = len(healthy)
        return min(
            (healthy[(self._rr + i) % n] for i in range(n)),
            key=lambda s: s.in_flight,
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.config.backoff_max, self.config.backoff_base * (2**attempt))
        delay = self._rng.uniform(0.0, cap)  # full jitter: spreads a thundering herd
        if retry_after is not None:
            delay = min(self.config.backoff_max, retry_after) + self._rng.uniform(
                0.0, 0.1 * max(retry_after, self.config.backoff_base)
            )
        return delay

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> ChatResult:
        """One chat completion; raises :class:`RequestFailed` when it cannot be had."""
        payload: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "max_tokens": max_tokens or self.config.max_tokens,
            "temperature": self.config.temperature if temperature is None else temperature,
            "top_p": self.config.top_p,
            **self.config.extra_body,
        }
        if seed is not None:
            payload["seed"] = seed
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        start = time.monotonic()
        last: _Retryable | None = None
        server: _Server | None = None
        for attempt in range(self.config.max_retries + 1):
            if attempt > 0:
                self.stats["retries"] += 1
                self.stats[f"retry_{last.reason}"] += 1
                await asyncio.sleep(self._backoff(attempt - 1, last.retry_after))
            async with self._slots:
                server = self._pick_server(avoid=server if last is not None else None)
                server.in_flight += 1
                server.requests += 1
                self.stats["requests"] += 1
                try:
                    result = await self._attempt(server, body)
                except _Retryable as err:
                    last = err
                    server.failures += 1
                    server.consecutive_failures += 1
                    cooldown = err.retry_after
                    if cooldown is None:
                        cooldown = min(
                            self.config.backoff_max,
                            self.config.backoff_base * 2 ** (server.consecutive_failures - 1),
                        )
                    server.cooldown_until = time.monotonic() + cooldown
                    continue
                except RequestFailed as err:
                    server.failures += 1
                    self.stats[f"failed_{err.reason}"] += 1
                    err.attempts = attempt + 1
                    raise
                finally:
                    server.in_flight -= 1
            server.consecutive_failures = 0
            server.cooldown_until = 0.0
            result.attempts = attempt + 1
            result.latency_s = time.monotonic() - start
            self.stats["completed"] += 1
            if result.truncated:
                self.stats["truncated"] += 1
            return result
        self.stats[f"failed_{last.reason}"] += 1
        raise RequestFailed(last.reason, last.message, True, self.config.max_retries + 1)

    async def _attempt(self, server: _Server, body: bytes) -> ChatResult:
        url = f"{server.base}/chat/completions"
        try:
            # The deadline covers connect, send and the whole answer, so a server that
            # trickles bytes cannot hold a slot forever.
            async with asyncio.timeout(self.config.request_timeout):
                response = await server.pool.post("/chat/completions", body)
        except TimeoutError as err:
            raise _Retryable(
                "timeout", f"{url}: no answer within {self.config.request_timeout}s"
            ) from err
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            raise _Retryable("connection", f"{url}: {type(err).__name__}: {err}") from err
        status = response.status
        if status in RETRYABLE_STATUS:
            raise _Retryable(
                f"http_{status}",
                f"{url}: HTTP {status}: {response.text[:200]}",
                parse_retry_after(response.headers.get("retry-after")),
            )
        if status != 200:
            raise RequestFailed(
                f"http_{status}", f"{url}: HTTP {status}: {response.text[:500]}", False, 1
            )
        try:
            data = json.loads(response.body)
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message.content is {type(text).__name__}, not a string")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise _Retryable(
                "malformed_response",
                f"{url}: answer is not a chat completion ({type(err).__name__}: {err}); "
                f"body starts {response.text[:120]!r}",
            ) from err
        usage = data.get("usage") or {}
        return ChatResult(
            text=text,
            finish_reason=choice.get("finish_reason"),
            model=data.get("model", self.config.model),
            server=server.base,
            attempts=1,
            latency_s=0.0,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )

"""The chat client against a real HTTP server process on 127.0.0.1 (scripted answers)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from megatron_syne.synth.client import ChatClient, ClientConfig, RequestFailed, parse_retry_after
from megatron_syne.synth.testing_server import scripted_server

SCRIPT = {
    "rules": [
        {
            "match": "case-429-500",
            "actions": [{"status": 429, "retry_after": 0.3}, {"status": 500}],
        },
        {"match": "case-hang-once", "actions": [{"hang": 5}]},
        {"match": "case-hang-always", "actions": [{"hang": 5}], "repeat_last": True},
        {"match": "case-malformed-once", "actions": [{"malformed": True}]},
        {"match": "case-malformed-always", "actions": [{"malformed": True}], "repeat_last": True},
        {"match": "case-drop", "actions": [{"drop": True}, {"drop": True}]},
        {"match": "case-400", "actions": [{"status": 400}], "repeat_last": True},
        {
            "match": "case-truncated",
            "actions": [{"content": "[Problem]\nWhat is", "finish_reason": "length"}],
        },
    ]
}


@pytest.fixture(scope="module")
def server():
    with scripted_server(SCRIPT) as base:
        yield base


def _stats(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/stats", timeout=5) as r:
        return json.loads(r.read())


def _client(bases, **kw) -> ChatClient:
    cfg = dict(model="scripted", request_timeout=5.0, max_retries=3, backoff_base=0.05)
    cfg.update(kw)
    return ChatClient(ClientConfig(api_bases=bases if isinstance(bases, list) else [bases], **cfg))


def _ask(client: ChatClient, text: str):
    return client.complete([{"role": "user", "content": text}])


def run(coro):
    return asyncio.run(coro)


def test_normal_answer(server):
    async def go():
        async with _client(server) as c:
            return await _ask(c, "-----\nThe speed of light is 299792458 m/s.")

    r = run(go())
    assert r.finish_reason == "stop" and not r.truncated
    assert r.attempts == 1
    assert "[Problem]" in r.text and "299792458" in r.text
    assert r.completion_tokens > 0


def test_429_then_500_are_retried_honouring_retry_after(server):
    async def go():
        async with _client(server) as c:
            t0 = time.monotonic()
            r = await _ask(c, "case-429-500")
            return r, time.monotonic() - t0, dict(c.stats)

    r, elapsed, stats = run(go())
    assert r.attempts == 3
    assert stats["retry_http_429"] == 1 and stats["retry_http_500"] == 1
    assert elapsed >= 0.3  # Retry-After: 0.3 was waited out
    assert "[Problem]" in r.text


def test_hang_past_timeout_is_abandoned_and_retried(server):
    async def go():
        async with _client(server, request_timeout=0.5) as c:
            t0 = time.monotonic()
            r = await _ask(c, "case-hang-once")
            return r, time.monotonic() - t0, dict(c.stats)

    r, elapsed, stats = run(go())
    assert r.attempts == 2 and stats["retry_timeout"] == 1
    assert 0.5 <= elapsed < 3.0


def test_hang_every_time_fails_as_retryable_timeout(server):
    async def go():
        async with _client(server, request_timeout=0.3, max_retries=1) as c:
            await _ask(c, "case-hang-always")

    with pytest.raises(RequestFailed) as info:
        run(go())
    assert info.value.reason == "timeout" and info.value.retryable
    assert info.value.attempts == 2


def test_malformed_json_retried_then_reported(server):
    async def go():
        async with _client(server) as c:
            ok = await _ask(c, "case-malformed-once")
        async with _client(server, max_retries=2) as c:
            try:
                await _ask(c, "case-malformed-always")
            except RequestFailed as err:
                return ok, err
        raise AssertionError("malformed answers must not be accepted")

    ok, err = run(go())
    assert ok.attempts == 2 and "[Problem]" in ok.text
    assert err.reason == "malformed_response" and err.retryable and err.attempts == 3


def test_dropped_connection_is_retried(server):
    async def go():
        async with _client(server) as c:
            return await _ask(c, "case-drop")

    r = run(go())
    assert r.attempts == 3


def test_client_error_is_not_retried(server):
    async def go():
        async with _client(server) as c:
            await _ask(c, "case-400")

    with pytest.raises(RequestFailed) as info:
        run(go())
    assert info.value.reason == "http_400" and not info.value.retryable
    assert info.value.attempts == 1


def test_truncated_answer_is_flagged(server):
    async def go():
        async with _client(server) as c:
            return await _ask(c, "case-truncated")

    r = run(go())
    assert r.truncated and r.finish_reason == "length" and r.attempts == 1


def test_load_spreads_over_servers_and_avoids_a_failing_one():
    broken = {"rules": [{"match": "", "actions": [{"status": 503}], "repeat_last": True}]}
    with scripted_server({"latency": 0.05}) as a, scripted_server({"latency": 0.05}) as b:
        with scripted_server(broken) as bad:

            async def go():
                async with _client([a, b], max_concurrency=8) as c:
                    await asyncio.gather(*(_ask(c, f"even {i}") for i in range(40)))
                async with _client([a, bad], max_concurrency=4, backoff_base=0.02) as c:
                    rs = await asyncio.gather(*(_ask(c, f"fail {i}") for i in range(20)))
                    return rs, c.server_stats()

            rs, servers = run(go())
            n_a, n_b = _stats(a)["counts"]["chat"], _stats(b)["counts"]["chat"]
            assert n_a + n_b >= 60  # 40 + the 20 of the second client on a
            assert abs(_stats(b)["counts"]["chat"] - 20) <= 6  # ~half of the first 40
            assert all(r.server == a for r in rs)  # every answer came from the healthy one
            assert servers[1]["failures"] >= 1
            # after a failure the broken server cools down: far fewer than 20 tries there
            assert _stats(bad)["counts"]["chat"] < 20


def test_parse_retry_after():
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(later) <= 31


def test_config_validation():
    with pytest.raises(ValueError, match="api-base"):
        ClientConfig(api_bases=["localhost:8000"], model="m")
    with pytest.raises(ValueError, match="max_concurrency"):
        ClientConfig(api_bases=["http://127.0.0.1:1/v1"], model="m", max_concurrency=0)


def test_transport_reads_chunked_and_close_delimited_answers():
    """Proxies in front of a fleet may answer chunked or close-delimited; both must parse."""
    answer = json.dumps(
        {"choices": [{"message": {"content": "[Problem] chunked"}, "finish_reason": "stop"}]}
    ).encode()

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        await reader.readexactly(length)
        half = len(answer) // 2
        chunks = b"".join(
            f"{len(part):x}\r\n".encode() + part + b"\r\n"
            for part in (answer[:half], answer[half:])
        )
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        )
        await writer.drain()
        # second request on the same connection: close-delimited body
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + answer)
        await writer.drain()
        writer.close()

    async def go():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, _client(f"http://127.0.0.1:{port}/v1", max_concurrency=1) as c:
            first = await _ask(c, "one")
            second = await _ask(c, "one")
            return first, second

    first, second = run(go())
    assert first.text == second.text == "[Problem] chunked"
    assert first.attempts == second.attempts == 1

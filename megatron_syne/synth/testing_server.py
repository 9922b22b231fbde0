"""A scripted OpenAI-compatible chat-completions server for tests, demos and benchmarks.

It speaks real HTTP/1.1 (keep-alive, Content-Length) over a real socket on a loopback address,
so the client is exercised exactly as against vLLM; only the answers are scripted. A script is
JSON::

    {"latency": 0.0,                      # seconds added to every chat completion
     "rules": [{"match": "seed-7",         # substring of the last user message
                "actions": [{"status": 429, "retry_after": 0.1},
                            {"status": 500},
                            {"hang": 30},                 # sleep (past the client's deadline)
                            {"drop": true},               # close the connection, no answer
                            {"malformed": true},          # HTTP 200 with broken JSON
                            {"content": "...", "finish_reason": "length"}],
                "repeat_last": false}]}

The n-th request matching a rule gets ``actions[n]``; once the list is used up (unless
``repeat_last``) it gets the default answer, which echoes the prompt's seed section as a
[Problem]/[Solution] pair so each seed yields a distinct answer. ``GET /stats`` returns the
request counts. Run: ``python -m megatron_syne.synth.testing_server --port 0 --port-file p``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_syne.synth.prompts import SEED_DELIMITER

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def default_answer(user_message: str) -> str:
    """A deterministic, prompt-specific [Problem]/[Solution] answer."""
    seed = user_message.split(SEED_DELIMITER)[-1].strip()[:1200]
    tag = hashlib.sha1(user_message.encode("utf-8")).hexdigest()[:8]
    return (
        f"[Problem]\nQuestion {tag}: using the material below, explain the central claim and "
        f"derive its main consequence.\n{seed}\n\n[Solution]\nStep 1: restate the material: "
        f"{seed[:400]}\nStep 2: reason about it carefully.\nStep 3: the answer is {tag}."
    )


class ScriptedServer:
    def __init__(self, script: dict[str, Any]):
        self.latency = float(script.get("latency", 0.0))
        self.rules = script.get("rules", [])
        self.rule_hits = [0] * len(self.rules)
        self.counts: Counter[str] = Counter()

    def _choose_action(self, user_message: str) -> dict[str, Any] | None:
        for i, rule in enumerate(self.rules):
            if rule["match"] in user_message:
                n = self.rule_hits[i]
                self.rule_hits[i] += 1
                actions = rule.get("actions", [])
                if n < len(actions):
                    return actions[n]
                if rule.get("repeat_last") and actions:
                    return actions[-1]
                return None
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                # Latency counts from arrival, so the server's own CPU time per request
                # does not add to it (a real server's latency is what a client sees).
                arrived = asyncio.get_running_loop().time()
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self._respond(method, path, body, writer, arrived)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests"}.get(status, "Status")
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
        head.append("Content-Type: application/json")
        for k, v in (extra_headers or {}).items():
            head.append(f"{k}: {v}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _respond(
        self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter, arrived: float
    ) -> bool:
        self.counts["requests"] += 1
        if method == "GET" and path.endswith("/stats"):
            stats = {"counts": dict(self.counts), "rule_hits": self.rule_hits}
            await self._send(writer, 200, json.dumps(stats).encode())
            return True
        if method == "GET" and path.endswith("/models"):
            data = {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
            await self._send(writer, 200, json.dumps(data).encode())
            return True
        if method != "POST" or not path.endswith("/chat/completions"):
            await self._send(writer, 404, b'{"error": "not found"}')
            return True
        request = json.loads(body)
        user = next(
            (m["content"] for m in reversed(request["messages"]) if m["role"] == "user"), ""
        )
        self.counts["chat"] += 1
        action = self._choose_action(user) or {}
        if self.latency:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(max(0.0, self.latency - (loop.time() - arrived)))
        if "hang" in action:
            self.counts["hang"] += 1
            await asyncio.sleep(float(action["hang"]))
            return False
        if action.get("drop"):
            self.counts["drop"] += 1
            return False
        if "status" in action and action["status"] != 200:
            self.counts[f"status_{action['status']}"] += 1
            headers = {}
            if "retry_after" in action:
                headers["Retry-After"] = str(action["retry_after"])
            await self._send(writer, int(action["status"]), b'{"error": "scripted"}', headers)
            return True
        if action.get("malformed"):
            self.counts["malformed"] += 1
            await self._send(writer, 200, b'{"id": "x", "choices": [{"message": {"conte')
            return True
        content = action.get("content", default_answer(user))
        finish = action.get("finish_reason", "stop")
        self.counts["ok"] += 1
        answer = {
            "id": f"chatcmpl-{self.counts['chat']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "scripted"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": len(user.split()),
                "completion_tokens": len(content.split()),
            },
        }
        await self._send(writer, 200, json.dumps(answer, ensure_ascii=False).encode("utf-8"))
        return True


async def serve(host: str, port: int, script: dict[str, Any], port_file: str | None) -> None:
    if host not in LOOPBACK_HOSTS:
        raise SystemExit(f"testing_server: refusing to listen on non-loopback host {host!r}")
    server = ScriptedServer(script)
    srv = await asyncio.start_server(server.handle, host, port, backlog=1024)
    bound = srv.sockets[0].getsockname()[1]
    if port_file:
        tmp = f"{port_file}.tmp"
        Path(tmp).write_text(str(bound))
        os.replace(tmp, port_file)
    print(f"LISTENING {host}:{bound}", flush=True)
    async with srv:
        await srv.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", default=None, help="write the bound port here")
    parser.add_argument("--script", default=None, help="JSON script file (see module doc)")
    parser.add_argument("--latency", type=float, default=None, help="seconds per completion")
    args = parser.parse_args(argv)
    script = json.loads(Path(args.script).read_text()) if args.script else {}
    if args.latency is not None:
        script["latency"] = args.latency
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, script, args.port_file))


@contextlib.contextmanager
def scripted_server(
    script: dict[str, Any] | None = None, startup_timeout: float = 20.0
) -> Iterator[str]:
    """Start the server as a child process on 127.0.0.1; yield its ``http://.../v1`` base."""
    with tempfile.TemporaryDirectory(prefix="synth-server-") as tmp:
        script_path = Path(tmp) / "script.json"
        script_path.write_text(json.dumps(script or {}))
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megatron_syne.synth.testing_server",
                "--port-file",
                str(port_file),
                "--script",
                str(script_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while not port_file.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"testing_server exited: {proc.stderr.read().decode()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("testing_server did not start in time")
                time.sleep(0.02)
            yield f"http://127.0.0.1:{int(port_file.read_text())}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stderr.close()


if __name__ == "__main__":
    main()

"""The code sandbox: right and wrong solutions, and each escape attempt stopped and reported."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from megatron_syne.synth.sandbox import SandboxConfig, netns_available, run_tests

CFG = SandboxConfig(timeout_s=3.0, cpu_s=1, memory_mb=256)
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


def _solution(body: str, imports: str = "") -> str:
    return f"{imports}\ndef add(a, b):\n" + "".join(f"    {line}\n" for line in body.splitlines())


def test_correct_solution_passes():
    r = run_tests(_solution("return a + b"), TESTS, CFG)
    assert r.ok and r.status == "passed" and (r.passed, r.total) == (3, 3)


def test_wrong_solution_fails_with_counts():
    r = run_tests(_solution("return a + b if a != 10 else 0"), TESTS, CFG)
    assert not r.ok and r.status == "failed"
    assert (r.passed, r.total) == (2, 3)
    assert r.to_dict()["details"][0]["test"] == "test_2"


def test_solution_that_raises_is_an_error():
    r = run_tests(_solution("return a + c"), TESTS, CFG)
    assert r.status == "error" and r.passed == 0
    assert "NameError" in r.details[0]["message"]


def test_infinite_loop_is_stopped():
    r = run_tests(_solution("while True:\n    pass"), TESTS, CFG)
    assert r.status in ("cpu_limit", "timeout") and not r.ok
    assert r.seconds < CFG.timeout_s + 2


def test_sleeping_forever_hits_the_wall_clock_timeout():
    cfg = SandboxConfig(timeout_s=1.0, cpu_s=5, memory_mb=256)
    r = run_tests(_solution("time.sleep(60)", "import time"), TESTS, cfg)
    assert r.status == "timeout" and r.seconds < 3


def test_memory_bomb_is_stopped():
    bomb = "hoard = []\nwhile True:\n    hoard.append(bytearray(10_000_000))"
    r = run_tests(_solution(bomb), TESTS, CFG)
    assert r.status == "memory_limit" and not r.ok


@pytest.fixture()
def listener():
    """A TCP server on the host's loopback that records whether anyone connected."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(0.2)
    connected = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                connected.append(True)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield sock.getsockname()[1], connected
    stop.set()
    t.join(2)
    sock.close()


def test_network_call_is_blocked(listener):
    port, connected = listener
    code = _solution(
        f"socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\nreturn a + b",
        "import socket",
    )
    r = run_tests(code, TESTS, CFG)
    assert r.status == "blocked"
    assert r.violations and r.violations[0]["kind"] == "network"
    assert connected == []


@pytest.mark.skipif(not netns_available(), reason="unshare --net not permitted here")
def test_network_namespace_alone_isolates(listener):
    """Without the audit hook, the namespace by itself keeps the host unreachable."""
    port, connected = listener
    cfg = SandboxConfig(timeout_s=3.0, cpu_s=1, memory_mb=256, network="netns", block_sockets=False)
    code = _solution(
        f"socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\nreturn a + b",
        "import socket",
    )
    r = run_tests(code, TESTS, cfg)
    assert r.isolation == "netns"
    assert r.status == "error" and not r.ok
    assert connected == []


def test_write_outside_the_workdir_is_blocked(tmp_path: Path):
    target = tmp_path / "escaped.txt"
    code = _solution(f"open({str(target)!r}, 'w').write('x')\nreturn a + b")
    r = run_tests(code, TESTS, CFG)
    assert r.status == "blocked" and r.violations[0]["kind"] == "write_outside_workdir"
    assert not target.exists()


def test_write_inside_the_workdir_is_allowed():
    code = _solution("open('scratch.txt', 'w').write(str(a))\nreturn a + b")
    assert run_tests(code, TESTS, CFG).ok


def test_starting_a_process_is_blocked():
    code = _solution("os.system('echo escaped')\nreturn a + b", "import os")
    r = run_tests(code, TESTS, CFG)
    assert r.status == "blocked" and r.violations[0]["kind"] == "process"

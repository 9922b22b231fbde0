"""Run generated Python solutions against assert-style tests in a constrained subprocess.

Layers, outermost first:

* a fresh temporary working directory per run, deleted afterwards;
* wall-clock timeout enforced by the parent, which kills the whole process group;
* rlimits set by the runner before any generated code runs: address space (memory), CPU
  seconds, size of files written, open files, no core dumps;
* network: when ``unshare --net --map-root-user`` works on this machine the child runs in a
  new network namespace with no interface up (nothing, not even the host's loopback, can be
  reached); in any case a ``sys.addaudithook`` hook refuses socket creation/connection;
* filesystem and processes: the same audit hook refuses opening for writing, creating,
  renaming or removing any path outside the working directory, starting processes and loading
  ``ctypes``.

The audit hook stops accidents of generated code (the point here: a model that writes
``open('/etc/x', 'w')``), not a determined attacker with native code; for hostile code run the
whole tool inside a container or gVisor. ``SandboxResult.isolation`` records which network
layer was active.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

_RUNNER = r"""
import json, os, resource, sys, time
sys.dont_write_bytecode = True
workdir, spec_path, result_path = sys.argv[1], sys.argv[2], sys.argv[3]
with open(spec_path, encoding="utf-8") as f:
    spec = json.load(f)
result_file = open(result_path, "w", encoding="utf-8")
os.remove(spec_path)

mb = 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (spec["memory_mb"] * mb, spec["memory_mb"] * mb))
resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (spec["max_file_mb"] * mb, spec["max_file_mb"] * mb))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

WORKDIR = os.path.realpath(workdir)
violations = []
_realpath, _fspath, _isinstance, _str, _bytes = os.path.realpath, os.fspath, isinstance, str, bytes
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
               "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,),
               "os.chown": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,),
               "shutil.move": (0, 1), "os.mkfifo": (0,), "os.mknod": (0,)}
PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                  "os.fork", "os.forkpty", "pty.spawn", "os.kill", "os.killpg"}
SOCKET_EVENTS = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
                 "socket.sendto", "socket.sendmsg", "socket.gethostbyname", "socket.gethostbyaddr"}
BLOCK_SOCKETS = spec["block_sockets"]

def _outside(path):
    if _isinstance(path, int) or path is None:
        return False
    try:
        p = _fspath(path)
        if _isinstance(p, _bytes):
            p = p.decode("utf-8", "surrogateescape")
        if p == "/dev/null":
            return False
        full = _realpath(p)
    except Exception:
        return True
    return not (full == WORKDIR or full.startswith(WORKDIR + os.sep))

def _deny(kind, detail):
    violations.append({"kind": kind, "detail": detail[:200]})
    raise PermissionError(f"sandbox: {kind} blocked: {detail[:200]}")

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and (flags or 0) & WRITE_FLAGS)
        if writing and _outside(path):
            _deny("write_outside_workdir", f"open({path!r}, {mode or flags!r})")
    elif event in PATH_EVENTS:
        for i in PATH_EVENTS[event]:
            if i < len(args) and _outside(args[i]):
                _deny("write_outside_workdir", f"{event}({args[i]!r})")
    elif event in PROCESS_EVENTS:
        _deny("process", event)
    elif BLOCK_SOCKETS and event in SOCKET_EVENTS:
        _deny("network", f"{event}{args!r}")
    elif event in ("ctypes.dlopen", "ctypes.dlsym") or (
            event == "import" and args[0] in ("ctypes", "_ctypes")):
        _deny("native_code", f"{event} {args[0]!r}")

results = []
status = "passed"
def _record(name, outcome, message=""):
    results.append({"test": name, "outcome": outcome, "message": message[:300]})

def _run(name, source, namespace):
    global status
    try:
        exec(compile(source, name, "exec"), namespace)
        return True
    except AssertionError as err:
        _record(name, "failed", repr(err))
        status = "failed" if status == "passed" else status
    except MemoryError:
        _record(name, "memory_limit", "MemoryError")
        status = "memory_limit"
    except PermissionError as err:
        _record(name, "blocked", str(err))
    except RecursionError as err:
        _record(name, "error", repr(err))
        status = "error" if status in ("passed", "failed") else status
    except BaseException as err:
        _record(name, "error", f"{type(err).__name__}: {err}")
        status = "error" if status in ("passed", "failed") else status
    return False

sys.addaudithook(_hook)
namespace = {"__name__": "__main__"}
start = time.perf_counter()
if _run("solution.py", spec["code"], namespace):
    for i, test in enumerate(spec["tests"]):
        if _run(f"test_{i}", test, namespace):
            _record(f"test_{i}", "passed")
else:
    status = status if status != "passed" else "error"
if violations:
    status = "blocked"
passed = sum(r["outcome"] == "passed" for r in results)
result_file.write(json.dumps({"status": status, "passed": passed, "total": len(spec["tests"]),
    "results": results, "violations": violations, "seconds": time.perf_counter() - start}))
result_file.close()
"""


@dataclass
class SandboxConfig:
    """Limits of one run: seconds of wall clock and CPU, MiB of address space and file size."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 512
    max_file_mb: int = 16
    max_log_bytes: int = 4000
    network: str = "auto"  # "auto": netns when available; "netns": require it; "audit": hook only
    block_sockets: bool = True  # the audit-hook socket guard (on top of the namespace)
    python: str = field(default_factory=lambda: sys.executable)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.cpu_s < 1:
            raise ValueError("SandboxConfig: timeout_s must be > 0 and cpu_s >= 1")
        if self.memory_mb < 64:
            raise ValueError("SandboxConfig: memory_mb must be >= 64 (Python itself needs ~30)")
        if self.network not in ("auto", "netns", "audit"):
            raise ValueError("SandboxConfig: network must be 'auto', 'netns' or 'audit'")
        if self.network == "netns" and not netns_available():
            raise RuntimeError(
                "SandboxConfig: network='netns' but `unshare --net --map-root-user` does not "
                "work here (no user namespaces?); use network='audit' or 'auto'"
            )
        if self.network == "audit" and not self.block_sockets:
            raise ValueError("SandboxConfig: network='audit' needs block_sockets=True")


@dataclass
class SandboxResult:
    """Outcome of one run. ``status`` is one of passed, failed, error, timeout, cpu_limit,
    memory_limit, output_limit, blocked, crashed."""

    status: str
    passed: int
    total: int
    seconds: float
    isolation: str
    details: list[dict] = field(default_factory=list)
    violations: list[dict] = field(default_factory=list)
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "passed" and self.total > 0 and self.passed == self.total

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "passed": self.passed,
            "total": self.total,
            "seconds": round(self.seconds, 3),
            "isolation": self.isolation,
            "violations": self.violations,
            "details": [d for d in self.details if d["outcome"] != "passed"][:5],
        }


@lru_cache(maxsize=1)
def netns_available() -> bool:
    """Whether ``unshare --net --map-root-user`` can start a process on this machine."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        proc = subprocess.run(
            [exe, "--net", "--map-root-user", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _isolation(config: SandboxConfig) -> tuple[list[str], str]:
    use_netns = config.network == "netns" or (config.network == "auto" and netns_available())
    layers = []
    prefix: list[str] = []
    if use_netns:
        prefix = [shutil.which("unshare") or "unshare", "--net", "--map-root-user", "--"]
        layers.append("netns")
    if config.block_sockets:
        layers.append("audit")
    return prefix, "+".join(layers)


def run_tests(code: str, tests: list[str], config: SandboxConfig | None = None) -> SandboxResult:
    """Execute ``code`` then each assert statement of ``tests`` in a sandboxed subprocess.

    A test passes when its statement runs without raising. Blocking call; run it in a thread
    (``asyncio.to_thread``) from async code.
    """
    config = config or SandboxConfig()
    prefix, isolation = _isolation(config)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="synth-sbx-") as outer:
        workdir = Path(outer) / "work"
        workdir.mkdir()
        spec = {
            "code": code,
            "tests": tests,
            "memory_mb": config.memory_mb,
            "cpu_s": config.cpu_s,
            "max_file_mb": config.max_file_mb,
            "block_sockets": config.block_sockets,
        }
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        runner_path = Path(outer) / "runner.py"
        runner_path.write_text(_RUNNER, encoding="utf-8")
        result_path = Path(outer) / "result.json"
        log_path = Path(outer) / "log.txt"
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            # BLAS thread pools reserve address space per thread and would trip RLIMIT_AS.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        cmd = [
            *prefix,
            config.python,
            "-I",
            str(runner_path),
            str(workdir),
            str(spec_path),
            str(result_path),
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: one kill reaches everything
            )
            timed_out = False
            try:
                returncode = proc.wait(timeout=config.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                returncode = proc.wait()
        with open(log_path, "rb") as f:
            log_text = f.read(config.max_log_bytes).decode("utf-8", errors="replace")
        seconds = time.monotonic() - start
        payload = None
        if result_path.exists():
            try:
                payload = json.loads(result_path.read_text(encoding="utf-8"))
            except ValueError:
                payload = None
    if payload is not None and not timed_out:
        return SandboxResult(
            status=payload["status"],
            passed=payload["passed"],
            total=payload["total"],
            seconds=seconds,
            isolation=isolation,
            details=payload["results"],
            violations=payload["violations"],
            log=log_text,
        )
    if timed_out:
        status = "timeout"
    elif returncode in (-signal.SIGXCPU, -signal.SIGKILL) and seconds >= config.cpu_s * 0.9:
        status = "cpu_limit"
    elif returncode == -signal.SIGXFSZ:
        status = "output_limit"
    elif "MemoryError" in log_text:
        status = "memory_limit"
    else:
        status = "crashed"
    return SandboxResult(
        status=status,
        passed=0,
        total=len(tests),
        seconds=seconds,
        isolation=isolation,
        details=[{"test": "process", "outcome": status, "message": f"exit {returncode}"}],
        log=log_text,
    )

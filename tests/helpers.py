"""Shared test utilities: launching multi-process (torchrun over gloo) runs on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_DISTRIBUTED_ENV_VARS = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
}


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for a CPU child process: one thread per rank, no GPU, repo importable."""
    # A process-group launch in the parent (initialize_distributed in a test) leaves its rank and
    # rendezvous in os.environ; a child that inherits them would collide on the same port.
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def run_torchrun(
    args: list[str],
    nproc: int = 2,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node nproc <args>`` (a free port is picked).

    Raises AssertionError with the child's output when it fails.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    proc = subprocess.run(
        cmd,
        env=env or cpu_env(),
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc

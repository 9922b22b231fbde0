"""Dockerfile and Slurm scripts: shell syntax, flags the tools accept, and the launch they build."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

PRETRAIN = REPO_ROOT / "examples/slurm/pretrain_llama3_8b.sbatch"
CONVERT = REPO_ROOT / "examples/slurm/convert_llama3_8b.sbatch"


@pytest.mark.parametrize("script", [PRETRAIN, CONVERT], ids=lambda p: p.name)
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    """PATH with ``srun`` that records its arguments and ``scontrol`` that lists two nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$SRUN_RECORD"\n'
    )
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SRUN_RECORD=str(tmp_path / "srun_args.txt"),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_NNODES="2",
        REPO=str(REPO_ROOT),
    )
    return env


def _run(script: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, cwd=cwd, capture_output=True, text=True)


def test_pretrain_launch_from_base_then_resume(tmp_path):
    env = _fake_slurm(tmp_path)
    env.update(RUN_DIR=str(tmp_path / "run"), BASE_CKPT="/ckpt/llama3-8b-mcore")
    proc = _run(PRETRAIN, env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun_args.txt").read_text().splitlines()
    command = " ".join(args)
    assert "--rdzv-endpoint gpu-node-07:" in command  # rendezvous on the first node
    assert "--nnodes 2" in command and "--nproc-per-node 8" in command
    assert "--load /ckpt/llama3-8b-mcore --no-load-optim --no-load-rng" in command
    for expected in (
        "--bf16",
        "--tensor-model-parallel-size 2",
        "--seq-length 8192",
        "--lr 1e-5",
        "--lr-warmup-init 1e-7",
        "--lr-warmup-tokens 10000000000",
        "--lr-decay-style WSD",
        "--adam-beta2 0.95",
        "--clip-grad 1.0",
    ):
        assert expected in command, expected
    assert (tmp_path / "run/logs/4242/command.txt").is_file()

    # A checkpoint of the run exists: the next job resumes from it, not from the base weights.
    ckpt = tmp_path / "run/checkpoints"
    (ckpt / "latest_checkpointed_iteration.txt").write_text("500\n")
    proc = _run(PRETRAIN, env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    command = " ".join((tmp_path / "srun_args.txt").read_text().splitlines())
    assert f"--load {ckpt}" in command and "--no-load-optim" not in command
    assert "resuming from" in proc.stdout and "iteration 500" in proc.stdout


def test_pretrain_refuses_to_start_without_weights(tmp_path):
    env = _fake_slurm(tmp_path)
    env.update(RUN_DIR=str(tmp_path / "run"))
    env.pop("BASE_CKPT", None)
    proc = _run(PRETRAIN, env, tmp_path)
    assert proc.returncode == 2
    assert "BASE_CKPT is not set" in proc.stderr
    assert not (tmp_path / "srun_args.txt").exists()


def test_pretrain_flags_are_training_flags(tmp_path):
    """Every flag the sbatch passes to pretrain_llama3_syne.py exists in its parser."""
    from megatron_syne.training.arguments import build_parser

    known = {s for action in build_parser()._actions for s in action.option_strings}
    env = _fake_slurm(tmp_path)
    env.update(
        RUN_DIR=str(tmp_path / "run"), BASE_CKPT="/ckpt/base", LR_WSD_DECAY_TOKENS="5000000000"
    )
    assert _run(PRETRAIN, env, tmp_path).returncode == 0
    args = (tmp_path / "srun_args.txt").read_text().splitlines()
    train_args = args[args.index("pretrain_llama3_syne.py") + 1 :]
    flags = {a for a in train_args if a.startswith("--")}
    assert "--lr-wsd-decay-tokens" in flags
    assert flags <= known, sorted(flags - known)


@pytest.mark.parametrize("direction", ["hf-to-megatron", "megatron-to-hf"])
def test_convert_sbatch_builds_a_valid_command(tmp_path, direction):
    from megatron_syne.convert.cli import build_parser

    env = _fake_slurm(tmp_path)
    env.update(HF_DIR="/models/llama3-8b", MEGATRON_DIR="/ckpt/mcore", DIRECTION=direction)
    proc = _run(CONVERT, env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun_args.txt").read_text().splitlines()
    tool_args = args[args.index("tools/checkpoint/convert.py") + 1 :]
    parsed = build_parser().parse_args(tool_args)  # exits (SystemExit) on an unknown flag
    assert parsed.command == direction


def test_dockerfile_pins_match_requirements():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    requirements = (REPO_ROOT / "requirements.txt").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base.startswith("nvcr.io/nvidia/pytorch:") and base.endswith("-py3")
    pinned = re.search(r"^megatron-core==(\S+)", requirements, re.M).group(1)
    assert re.search(rf"^ARG MEGATRON_CORE_VERSION={re.escape(pinned)}$", dockerfile, re.M)
    # The image's torch/triton/numpy are never replaced by the CPU pins.
    install = re.search(r"grep -viE '(\S+)' requirements.txt", dockerfile).group(1)
    for package in ("torch==2.13.0", "triton==3.9.0", "megatron-core==0.16.1"):
        assert re.match(install, package, re.I), package
    assert 'pip install --no-deps "megatron-core==' in dockerfile

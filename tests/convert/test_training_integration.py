"""The converted checkpoint through the real training entry point, and the trained one back to HF."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from megatron_syne.convert.hf_to_megatron import HFToMegatronConfig, convert_hf_to_megatron
from megatron_syne.convert.megatron_to_hf import MegatronToHFConfig, convert_megatron_to_hf
from tests.convert._models import VOCAB, make_hf_llama
from tests.helpers import REPO_ROOT, cpu_env


def _tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_train_from_converted_weights_and_export(tmp_path):
    """HF -> Megatron -> pretrain_llama3_syne.py (--load --no-load-optim --no-load-rng, 2 steps
    at lr 0, saves with the run's flags) -> HF: the exported weights equal the original ones
    bit for bit, and the export needed no shape flags (they come from the run's saved args)."""
    make_hf_llama(tmp_path / "hf", num_hidden_layers=2)
    convert_hf_to_megatron(
        HFToMegatronConfig(hf_dir=tmp_path / "hf", save=tmp_path / "base", show_progress=False)
    )
    # fmt: off
    cmd = [
        sys.executable, "pretrain_llama3_syne.py", "--device", "cpu", "--model", "tiny",
        "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96",
        "--num-attention-heads", "8", "--num-query-groups", "2", "--kv-channels", "8",
        "--vocab-size", str(VOCAB), "--max-position-embeddings", "256", "--seq-length", "32",
        "--rotary-base", "500000", "--norm-epsilon", "1e-5", "--mock-data",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
        "--lr", "0", "--min-lr", "0", "--lr-decay-style", "constant", "--log-interval", "1",
        "--load", str(tmp_path / "base"), "--no-load-optim", "--no-load-rng",
        "--save", str(tmp_path / "run"), "--save-interval", "2",
    ]
    # fmt: on
    # A model built earlier in this pytest process (initialize_distributed) leaves RANK,
    # MASTER_PORT, ... in os.environ; the child must pick its own port.
    env = {
        k: v
        for k, v in cpu_env().items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run/latest_checkpointed_iteration.txt").read_text().strip() == "2"

    convert_megatron_to_hf(
        MegatronToHFConfig(load=tmp_path / "run", save=tmp_path / "exported", show_progress=False)
    )
    original, exported = _tensors(tmp_path / "hf"), _tensors(tmp_path / "exported")
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], tensor), name

"""torchrun worker: logits of a converted checkpoint with tensor parallelism (rank 0 saves)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.convert._models import megatron_logits  # noqa: E402


def main() -> None:
    load_dir, tokens_path, out_path, tp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tokens = torch.load(tokens_path)
    logits = megatron_logits(Path(load_dir), tokens, tensor_parallel_size=tp)
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out_path)


if __name__ == "__main__":
    main()

"""Convert Llama-3 checkpoints: Hugging Face safetensors <-> megatron-core torch_dist.

    python tools/checkpoint/convert.py hf-to-megatron --hf-dir Meta-Llama-3-8B \
        --save ckpt/llama3-8b --target-tensor-parallel-size 2 --preset llama3-8b
    python tools/checkpoint/convert.py megatron-to-hf --load runs/syne/checkpoints \
        --save hf/llama3-syne --tokenizer-dir Meta-Llama-3-8B

See docs/readme/conversion.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_syne.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

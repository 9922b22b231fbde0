"""megatron-syne: continual pre-training of Llama-3 on Megatron-Core (the Llama-3-SynE recipe)."""

__version__ = "0.1.0"

"""HF <-> Megatron checkpoint conversion for Llama-3 (streaming, tensor by tensor).

Entry points: :func:`megatron_syne.convert.hf_to_megatron.convert_hf_to_megatron`,
:func:`megatron_syne.convert.megatron_to_hf.convert_megatron_to_hf`; command line:
``tools/checkpoint/convert.py``.
"""

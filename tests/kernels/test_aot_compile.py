"""The Triton kernels compile for H100/H200 (sm_90) on this CPU-only machine.

The interpreter tests check what the kernels compute; this checks that the same kernels lower to
a real GPU binary with the launch parameters the dispatcher uses for Llama-3's vocabulary, so a
kernel that would only fail on the card fails here first.
"""

from __future__ import annotations

import pytest

from megatron_syne.kernels import aot

pytestmark = pytest.mark.skipif(
    not aot.aot_available(),
    reason="triton's CUDA backend (ptxas) is not installed, or TRITON_INTERPRET=1 is set",
)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_kernel_compiles_for_sm90(dtype):
    results = aot.compile_all(arch=90, dtypes=(dtype,))
    assert [(r.kernel, r.has_logit_sum) for r in results] == [
        (v.name, v.has_logit_sum) for v in aot.VARIANTS
    ]
    for r in results:
        assert r.cubin_bytes > 0
        assert (r.block, r.num_warps) == (8192, 8)  # 128256 columns: the largest block
        if aot._nvidia_tool("cuobjdump") is not None:
            # Resource usage read back from the cubin: the kernel exists in it, no local-memory
            # arrays, and the 256-thread launch leaves room for two programs per SM (at most
            # 128 of the 65,536 registers a thread).
            assert r.registers is not None and 0 < r.registers <= 128
            assert r.local_bytes == 0
    table = aot.format_table(results, 90, aot.LLAMA3_VOCAB)
    assert "`_ce_fused_kernel`" in table and "sm_90" in table


def test_small_vocabulary_launch_and_errors():
    result = aot.compile_variant(aot.VARIANTS[0], "fp16", arch=90, n_cols=1000)
    assert (result.block, result.num_warps) == (1024, 4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        aot.compile_variant(aot.VARIANTS[0], "int8")

"""Triton bitpack kernels under the interpreter, checked against the CPU path byte for byte.

The interpreter must be switched on before triton is imported, so the checks run in a
fresh Python process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from diffq_triton import bitpack
    from diffq_triton.kernels import bitpack as kernels
    from diffq_triton.reference import expand_groups, num_groups

    gen = torch.Generator().manual_seed(0)
    cases = [(1, 0, 4, 4), (100, 0, 13, 13), (1151, 1, 1, 15), (1151, 3, 1, 15),
             (2048, 8, 2, 8), (3001, 16, 1, 15), (999, 24, 9, 15), (4097, 0, 1, 1)]
    for numel, group_size, low, high in cases:
        n_groups = num_groups(numel, group_size)
        bits = torch.randint(low, high + 1, (n_groups,), generator=gen).to(torch.uint8)
        top = (1 << expand_groups(bits.long(), numel, group_size)) - 1
        levels = (torch.rand(numel, generator=gen, dtype=torch.float64) * (top + 1)).long()
        levels = levels.clamp(max=top).to(torch.int16)
        expected = bitpack.pack_levels(levels, bits, group_size)
        packed = kernels.pack(levels, bits, group_size)
        assert torch.equal(packed, expected), (numel, group_size)
        out = kernels.unpack(expected, bits, group_size, numel)
        assert torch.equal(out, levels), (numel, group_size)
    excess = torch.randint(0, 8, (777,), generator=gen)
    fields = kernels.pack_fixed(excess, 3)
    assert torch.equal(fields, bitpack.pack_widths(excess.to(torch.uint8) + 2, 2)[0])
    assert torch.equal(kernels.unpack_fixed(fields, 3, 777), excess.to(torch.int16))
    print("KERNELS-OK")
    """
)


def test_kernels_match_cpu_path_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KERNELS-OK" in result.stdout


COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from diffq_triton.kernels import bitpack as kb

    signatures = [
        (kb.bitpack_fwd_kernel, {"p_levels": "*i16", "p_bits": "*u8", "p_goff": "*i64",
                                 "p_words": "*i32", "numel": "i64", "group_size": "i64"}),
        (kb.bitunpack_fwd_kernel, {"p_packed": "*u8", "p_bits": "*u8", "p_goff": "*i64",
                                   "p_levels": "*i16", "numel": "i64", "nbytes": "i64",
                                   "group_size": "i64"}),
    ]
    for fn, sig in signatures:
        sig["BLOCK"] = "constexpr"
        compiled = triton.compile(ASTSource(fn, sig, {"BLOCK": kb.BLOCK}),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert "atom" in compiled.asm["ptx"] or fn is kb.bitunpack_fwd_kernel
    print("COMPILE-OK")
    """
)


def test_kernels_compile_for_sm90():
    # The interpreter accepts code a GPU build would reject: compile ahead of time too.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    if "COMPILE-OK" not in result.stdout and "ptxas" in result.stderr.lower():
        pytest.skip("no ptxas available to compile for sm_90")
    assert result.returncode == 0, result.stderr[-3000:]

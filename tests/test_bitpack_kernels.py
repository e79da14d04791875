"""Triton bitpack kernels, checked against the CPU path byte for byte.

On the test device (:data:`tests.conftest.DEVICE`): under the interpreter on a CPU machine,
compiled on a GPU. The interpreter must be switched on before triton is imported, so the
checks run in a fresh Python process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import TEST_DEVICE

pytest.importorskip("triton")

# Run at the start of each script: torch.empty gives poisoned buffers, so that an entry a
# kernel forgets to write shows (the kernels allocate their outputs with torch.empty).
POISON = textwrap.dedent(
    """
    import torch
    _empty = torch.empty

    def _poisoned(*args, **kwargs):
        t = _empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -23130 if t.dtype in (
            torch.int16, torch.int32, torch.int64) else 0xA5 if t.dtype == torch.uint8 else 0)

    torch.empty = _poisoned
    """
)

SCRIPT = POISON + textwrap.dedent(
    """
    import torch
    from diffq_triton.ops import bitpack
    from diffq_triton.kernels import bitpack as kernels
    from diffq_triton.ops.reference import expand_groups, num_groups

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
        packed = kernels.pack(levels.to(DEVICE), bits.to(DEVICE), group_size)
        assert torch.equal(packed.cpu(), expected), (numel, group_size)
        out = kernels.unpack(expected.to(DEVICE), bits.to(DEVICE), group_size, numel)
        assert torch.equal(out.cpu(), levels), (numel, group_size)
    excess = torch.randint(0, 8, (777,), generator=gen)
    fields = kernels.pack_fixed(excess.to(DEVICE), 3).cpu()
    assert torch.equal(fields, bitpack.pack_widths(excess.to(torch.uint8) + 2, 2)[0])
    assert torch.equal(kernels.unpack_fixed(fields.to(DEVICE), 3, 777).cpu(),
                       excess.to(torch.int16))
    print("KERNELS-OK")
    """
)


def run_interpreted(script: str, marker: str) -> None:
    """Run ``script`` in a fresh process on the test device (interpreted on the CPU)."""
    script = f"DEVICE = {TEST_DEVICE!r}\n" + script
    interpret = "0" if TEST_DEVICE.startswith("cuda") else "1"
    env = dict(os.environ, TRITON_INTERPRET=interpret, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("DIFFQ_TRITON_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker in result.stdout


def test_kernels_match_cpu_path_under_interpreter():
    run_interpreted(SCRIPT, "KERNELS-OK")


# The GPU file paths run on the CPU: with the triton backend forced under the interpreter,
# saving quantizes with torch and packs with the kernels, loading unpacks with the kernels
# and dequantizes with torch, as on a CUDA device.
LOAD_SCRIPT = POISON + textwrap.dedent(
    """
    import torch
    import diffq_triton as dq
    from diffq_triton.ops.dispatch import use_backend
    from diffq_triton.kernels import bitpack as kernels
    from tests.models import TiedLM, conv_net

    calls, packs = [], []
    unpack, pack = kernels.unpack, kernels.pack
    kernels.unpack = lambda *args: calls.append(1) or unpack(*args)
    kernels.pack = lambda *args: packs.append(1) or pack(*args)
    cases = [(TiedLM, dq.DiffQuantizer, dict(min_size=0.001, group_size=8)),
             (conv_net, dq.DiffQuantizer, dict(min_size=0.0001, group_size=0)),
             (conv_net, dq.UniformQuantizer, dict(bits=3, min_size=0.0001)),
             (conv_net, dq.LSQ, dict(bits=4, min_size=0.0001))]
    for make, quantizer_cls, kwargs in cases:
        torch.manual_seed(0)
        model = make().to(DEVICE)
        quantizer = quantizer_cls(model, **kwargs)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_diffq"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 3)
        data = dq.serialization.file_bytes(quantizer)
        with use_backend("triton"):
            assert dq.serialization.file_bytes(quantizer) == data, quantizer_cls
        assert packs, quantizer_cls
        packs.clear()
        on_host, on_kernels = make(), make().to(DEVICE)
        dq.load_quantized(on_host, data)
        before = len(calls)
        with use_backend("triton"):
            dq.load_quantized(on_kernels, data)
        # One kernel call per level stream, and one per width stream (mixed widths only).
        records = quantizer.export_quantized()
        mixed = sum(int(qt.bits.min()) != int(qt.bits.max()) for qt in records)
        assert len(calls) - before == len(records) + mixed, quantizer_cls
        for (name, a), b in zip(on_host.named_parameters(), on_kernels.parameters()):
            assert torch.equal(a, b.cpu()), (quantizer_cls.__name__, name)
    print("LOAD-OK")
    """
)


def test_file_saves_and_loads_through_the_kernels_as_on_the_host():
    run_interpreted(LOAD_SCRIPT, "LOAD-OK")


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

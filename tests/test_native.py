"""The native solve kernels (csrc/) against the PyTorch reference and dense linear algebra.

The CPU kernel is built on first use (once per cache; about a minute on two cores). These tests
fail when it does not build on a machine with a C++ compiler: a broken native build must not
pass unseen as a silent fallback to PyTorch. CUDA tests run where a GPU is present; the `.cu`
sources are compiled with nvcc wherever nvcc exists, GPU or not.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import HAS_CXX, dense_conv_matrix, random_causal_weight, require_native_cpu, solve_gradcheck

import layers
from layers import causal, native
from layers.causal import (
    ORIENTATIONS,
    adjoint_reference,
    assemble_weight,
    causal_conv2d,
    solve,
    solve_reference,
)

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def cpu_kernels():
    require_native_cpu()
    return native.kernels_for("cpu", torch.float64)


#: Every SIMD path of the CPU kernel, narrowest first (INVCONV_CPU_ISA names).
ALL_ISAS = ("generic", "avx2", "avx512")
_SUPPORTED_NAMES = {"generic": "generic", "avx2+fma": "avx2", "avx512": "avx512"}


def _isas():
    """Every CPU SIMD path this machine can run: the portable one always, AVX2+FMA and AVX-512
    where the CPU has them (the tests for the others are skipped with the reason, see isa)."""
    if not HAS_CXX or not native.load("cpu").available:
        return ["auto"]
    return [_SUPPORTED_NAMES[name] for name in torch.ops.invconv_cpu.supported_isas()]


@pytest.fixture(params=ALL_ISAS)
def isa(request, cpu_kernels):
    """One SIMD path per test instance; skipped (with the reason) where this CPU lacks it."""
    if request.param not in _isas():
        pytest.skip(f"this CPU has no {request.param} (supported here: {', '.join(_isas())})")
    return request.param


def _cpu(y, w, orientation, unit, adjoint=False, isa="auto"):
    code = native._CPU_ISAS[isa]
    return torch.ops.invconv_cpu.solve(y, w, native.ORIENTATION_CODES[orientation], unit, adjoint, code)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("c", [1, 3, 12, 28, 48])  # output blocks: quarter; half+quarter; 1+1+1 / 3 full
@pytest.mark.parametrize("unit", [True, False], ids=["unit", "general"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cpu_solve_matches_reference(isa, orientation, unit, c, k):
    """Solve and adjoint solve, each SIMD path, B in {1, 3}, non-square images (one smaller than k)."""
    for b, (h, w) in [(1, (5, 8)), (3, (6, 3))]:
        weight = random_causal_weight(c, k, orientation, unit, scale=0.3 / max(1.0, c**0.5 * k / 3))
        y = torch.randn(b, c, h, w, dtype=torch.float64)
        ref = solve_reference(y, weight, orientation, unit)
        ref_adj = adjoint_reference(y, weight, orientation, unit)
        torch.testing.assert_close(_cpu(y, weight, orientation, unit, False, isa), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(_cpu(y, weight, orientation, unit, True, isa), ref_adj, rtol=1e-10, atol=1e-10)
        x32 = _cpu(y.float(), weight.float(), orientation, unit, False, isa)
        torch.testing.assert_close(x32, ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unit", [True, False], ids=["unit", "general"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cpu_solve_matches_dense_solve(isa, k, orientation, unit):
    b, c, h, w = 2, 4, 4, 5
    weight = random_causal_weight(c, k, orientation, unit)
    y = torch.randn(b, c, h, w, dtype=torch.float64)
    t = dense_conv_matrix(weight, orientation, h, w)
    expected = torch.linalg.solve(t, y.reshape(b, -1).t()).t().reshape(y.shape)
    expected_adj = torch.linalg.solve(t.t(), y.reshape(b, -1).t()).t().reshape(y.shape)
    x = _cpu(y, weight, orientation, unit, False, isa)
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(causal_conv2d(x, weight, orientation), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_cpu(y, weight, orientation, unit, True, isa), expected_adj, rtol=1e-10, atol=1e-10)


def test_cpu_solve_larger_image_and_odd_layouts(isa):
    """Rows longer than the register blocks, many rows through the ring, non-contiguous input."""
    weight = random_causal_weight(12, 3, "BL", unit=False, scale=0.05)
    y = torch.randn(2, 40, 12, 37, dtype=torch.float64).transpose(1, 2)  # (2, 12, 40, 37), strided
    ref = solve_reference(y.contiguous(), weight, "BL", False)
    torch.testing.assert_close(_cpu(y, weight, "BL", False, False, isa), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("c", [1, 5, 12, 16, 24, 48])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cpu_weight_grad_matches_convolution_weight_grad(isa, orientation, c, k):
    """The native backward's weight gradient against oneDNN's, each SIMD path, B in {1, 3}."""
    for shape in [(1, c, 4, 9), (3, c, 6, 5)]:
        x = torch.randn(shape, dtype=torch.float64)
        lam = torch.randn(shape, dtype=torch.float64)
        ref = causal.conv_weight_grad(x, lam, k, orientation)
        code = native._CPU_ISAS[isa]
        got = torch.ops.invconv_cpu.weight_grad(x, lam, k, native.ORIENTATION_CODES[orientation], code)
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
        got32 = torch.ops.invconv_cpu.weight_grad(x.float(), lam.float(), k, native.ORIENTATION_CODES[orientation],
                                                  code)
        torch.testing.assert_close(got32, ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cpu_fused_backward_matches_adjoint_and_weight_grad(isa, orientation):
    """solve_backward (adjoint solve + weight gradient in one pass) against the reference pieces."""
    weight = random_causal_weight(5, 3, orientation, unit=False)
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    g = torch.randn_like(x)
    lam_ref = adjoint_reference(g, weight, orientation, False)
    gw_ref = -causal.conv_weight_grad(x, lam_ref, 3, orientation)
    code = native._CPU_ISAS[isa]
    lam, gw = torch.ops.invconv_cpu.solve_backward(g, weight, x, native.ORIENTATION_CODES[orientation], False, True,
                                                   code)
    torch.testing.assert_close(lam, lam_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)
    lam, gw = torch.ops.invconv_cpu.solve_backward(g, weight, x, native.ORIENTATION_CODES[orientation], False, False,
                                                   code)
    torch.testing.assert_close(lam, lam_ref, rtol=1e-10, atol=1e-10)
    assert gw is None


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("c,k,b", [(12, 3, 1), (3, 5, 1), (24, 2, 1), (12, 3, 2), (3, 11, 1)])
def test_cpu_strip_split_inside_an_image(isa, orientation, c, k, b):
    """Fewer images than threads: column strips of one image on several threads (solve, adjoint,
    backward and weight gradient) give the single-thread results exactly, and match the reference."""
    weight = random_causal_weight(c, k, orientation, unit=False, scale=0.3 / max(1.0, c**0.5 * k / 3))
    y = torch.randn(b, c, 24, 40, dtype=torch.float64)
    g = torch.randn_like(y)
    code, o = native._CPU_ISAS[isa], native.ORIENTATION_CODES[orientation]
    ops = torch.ops.invconv_cpu

    def run():
        return (ops.solve(y, weight, o, False, False, code), ops.solve(y.float(), weight.float(), o, False, False, code),
                ops.solve(y, weight, o, False, True, code), *ops.solve_backward(g, weight, y, o, False, True, code),
                ops.weight_grad(y, g, k, o, code))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        results = {}
        for n in (2, 3, 4):
            torch.set_num_threads(n)
            results[n] = run()
    finally:
        torch.set_num_threads(threads)
    for n, split in results.items():
        for i, (got, want) in enumerate(zip(split[:4], single[:4])):
            assert torch.equal(got, want), f"{n} threads, result {i} differs from one thread"
        for got, want in zip(split[4:], single[4:]):  # weight gradients: summed over images in another order
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(single[0], solve_reference(y, weight, orientation, False), rtol=1e-10, atol=1e-10)
    lam_ref = adjoint_reference(g, weight, orientation, False)
    torch.testing.assert_close(single[3], lam_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[2][4], -causal.conv_weight_grad(y, lam_ref, k, orientation), rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("c", [1, 5, 8, 9, 13, 48])  # full and narrower output blocks of the 1x1 path
def test_cpu_pointwise_1x1_solve(isa, c):
    """k = 1 is a per-pixel triangular product over NCHW pixel runs: pixel counts that leave a
    partial block, runs split inside one image on several threads (bit-identical to one thread),
    solve and adjoint against the reference."""
    weight = random_causal_weight(c, 1, "TL", unit=False, scale=0.3 / max(1.0, c**0.5))
    code = native._CPU_ISAS[isa]
    threads = torch.get_num_threads()
    try:
        for b, h, w in [(1, 33, 31), (3, 7, 9), (2, 32, 32)]:
            y = torch.randn(b, c, h, w, dtype=torch.float64)
            for adjoint, ref in ((False, solve_reference(y, weight, "TL", False)),
                                 (True, adjoint_reference(y, weight, "TL", False))):
                got = {}
                for n in (1, 2):
                    torch.set_num_threads(n)
                    got[n] = (torch.ops.invconv_cpu.solve(y, weight, 0, False, adjoint, code),
                              torch.ops.invconv_cpu.solve(y.float(), weight.float(), 0, False, adjoint, code))
                assert torch.equal(got[1][0], got[2][0]) and torch.equal(got[1][1], got[2][1])
                torch.testing.assert_close(got[1][0], ref, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(got[1][1], ref.float(), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cpu_weight_grad_split_over_taps_and_unpadded_rows(isa, orientation, k):
    """The weight gradient's two layouts (rows a multiple of the vector width are read in place,
    others from a zero-padded copy) and its split of one image over (tap, output block) units."""
    code, o = native._CPU_ISAS[isa], native.ORIENTATION_CODES[orientation]
    threads = torch.get_num_threads()
    try:
        for shape in [(1, 12, 24, 32), (1, 13, 20, 48), (1, 7, 24, 40)]:
            x = torch.randn(shape, dtype=torch.float64)
            lam = torch.randn(shape, dtype=torch.float64)
            ref = causal.conv_weight_grad(x, lam, k, orientation)
            for n in (1, 2):
                torch.set_num_threads(n)
                got = torch.ops.invconv_cpu.weight_grad(x, lam, k, o, code)
                torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    finally:
        torch.set_num_threads(threads)


def test_cpu_isa_list_and_forcing(cpu_kernels):
    """The ISA list is what the CPU has, auto is the widest of it, and forcing a missing one fails."""
    supported = [_SUPPORTED_NAMES[n] for n in torch.ops.invconv_cpu.supported_isas()]
    assert supported[0] == "generic" and supported == [i for i in ALL_ISAS if i in supported]
    assert _SUPPORTED_NAMES[torch.ops.invconv_cpu.isa()] == supported[-1]
    y = torch.randn(1, 3, 4, 4)
    w = random_causal_weight(3, 2, "TL", unit=True).float()
    for name in ALL_ISAS:
        if name not in supported:
            with pytest.raises(RuntimeError, match=f"isa={name} requested but this CPU"):
                _cpu(y, w, "TL", True, False, name)
    with pytest.raises(RuntimeError, match=r"isa must be 0 \(auto\), 1 \(generic\), 2 \(avx2\) or 3 \(avx512\)"):
        torch.ops.invconv_cpu.solve(y, w, 0, True, False, 7)


def test_cpu_isa_env(monkeypatch, cpu_kernels):
    for name in _isas():
        monkeypatch.setenv(native.CPU_ISA_ENV, name)
        assert _SUPPORTED_NAMES[native.cpu_isa()] == name
    monkeypatch.setenv(native.CPU_ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="accepted values: auto, generic, avx2, avx512"):
        native.cpu_isa()


def test_cpu_clock_and_peak_probes(cpu_kernels):
    """The probes behind the arithmetic floor of `bench kernels` give plausible numbers."""
    ghz = torch.ops.invconv_cpu.clock_ghz(3)
    assert ghz == 0.0 or 0.3 < ghz < 8.0
    for name in _isas():
        flops = torch.ops.invconv_cpu.peak_flops(native._CPU_ISAS[name], False, 2)
        assert 1e8 < flops < 1e12


def test_cpu_handover_probe(cpu_kernels):
    """The threads' hand-over latency behind the flag of `bench kernels`: 0 with one thread (no
    partner), a plausible latency with two."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.ops.invconv_cpu.handover_ns(2) == 0.0
        torch.set_num_threads(2)
        ns = torch.ops.invconv_cpu.handover_ns(3)
        assert 1.0 < ns < 1e6  # a descheduled partner makes it long, never zero or negative
    finally:
        torch.set_num_threads(old)


def test_cpu_solve_rejects_bad_arguments(cpu_kernels):
    w = random_causal_weight(3, 3, "TL", unit=True)
    y = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _cpu(y.half(), w.half(), "TL", True)
    with pytest.raises(RuntimeError, match="weight must be"):
        _cpu(y[:, :2], w, "TL", True)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        _cpu(y.float(), w, "TL", True)


# ----------------------------------------------------------------------------------------------
# Through the public, differentiable solve with INVCONV_SOLVER=native


@pytest.fixture
def native_mode(monkeypatch, cpu_kernels, isa):
    """INVCONV_SOLVER=native, under each SIMD path (INVCONV_CPU_ISA) the CPU has."""
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    monkeypatch.setenv(native.CPU_ISA_ENV, isa)
    return cpu_kernels


def test_native_mode_dispatches_to_the_native_kernels(native_mode):
    y = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    assert causal.solver_for(y) is native_mode.solve
    assert causal.adjoint_solver_for(y) is native_mode.adjoint
    assert causal.solver_for(y.float()) is native_mode.solve
    assert causal._implementation(y).weight_grad is native_mode.weight_grad is not None
    assert causal._implementation(y).backward is native_mode.backward is not None


@pytest.mark.parametrize("unit", [True, False], ids=["unit", "general"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_native_gradients_match_autograd_through_dense_solve(native_mode, orientation, unit):
    b, c, h, w, k = 2, 3, 4, 5, 3
    weight = random_causal_weight(c, k, orientation, unit).requires_grad_()
    y = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(b, c, h, w, dtype=torch.float64)
    x = solve(y, weight, orientation, unit_diagonal=unit)
    gy, gw = torch.autograd.grad((x * upstream).sum(), (y, weight))
    t = dense_conv_matrix(weight, orientation, h, w)
    x_dense = torch.linalg.solve(t, y.reshape(b, -1).t()).t().reshape(b, c, h, w)
    gy_dense, gw_dense = torch.autograd.grad((x_dense * upstream).sum(), (y, weight))
    torch.testing.assert_close(x, x_dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gy, gy_dense, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, gw_dense, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("unit", [True, False], ids=["unit", "general"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_native_gradcheck(native_mode, orientation, unit):
    assert solve_gradcheck(orientation, unit, channels=4)


@pytest.mark.parametrize("name", ["inverse-flow", "finc"])
def test_layers_native_equals_torch_float32(monkeypatch, isa, name):
    """INVCONV_SOLVER=native gives the same results as =torch through the layers, in both
    directions and in the gradients of a training step."""
    torch.manual_seed(1)
    layer = layers.create(name, channels=12, kernel_size=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(3, 12, 10, 7)
    monkeypatch.setenv(native.CPU_ISA_ENV, isa)
    results = {}
    for mode in ("torch", "native"):
        monkeypatch.setenv(native.SOLVER_ENV, mode)
        layer.zero_grad()
        z, logdet = layer(x)
        ((z**2).sum() + logdet.sum()).backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        with torch.no_grad():
            back = layer.inverse(z)
        results[mode] = (z.detach(), back, grads)
    z_t, back_t, grads_t = results["torch"]
    z_n, back_n, grads_n = results["native"]
    torch.testing.assert_close(z_n, z_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back_n, back_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back_n, x, rtol=1e-4, atol=1e-4)
    for gn, gt in zip(grads_n, grads_t):
        torch.testing.assert_close(gn, gt, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# INVCONV_SOLVER semantics and the status report


def test_solver_env_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(native.SOLVER_ENV, "fast")
    y = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    w = random_causal_weight(2, 2, "TL", unit=True)
    with pytest.raises(ValueError, match="INVCONV_SOLVER='fast' is not valid; accepted values: auto, torch, native"):
        solve(y, w)
    assert native.solver_status()["cpu"]["solver"] == "error"


def test_solver_env_is_read_on_every_call(monkeypatch):
    """Each raw value is parsed once, but the variable is read per call: a change takes effect at
    the next solve, and a bad value fails every time (it is never remembered as valid)."""
    for raw, mode in [(" Native ", "native"), ("torch", "torch"), ("", "auto"), (" Native ", "native")]:
        monkeypatch.setenv(native.SOLVER_ENV, raw)
        assert native.requested_mode() == mode
    monkeypatch.delenv(native.SOLVER_ENV)
    assert native.requested_mode() == "auto"
    for _ in range(2):
        monkeypatch.setenv(native.SOLVER_ENV, "fast")
        with pytest.raises(ValueError, match="INVCONV_SOLVER='fast' is not valid"):
            native.requested_mode()
    monkeypatch.setenv(native.CPU_ISA_ENV, "generic")
    assert native.cpu_isa_code() == 1
    monkeypatch.setenv(native.CPU_ISA_ENV, " AVX2")
    assert native.cpu_isa_code() == 2
    monkeypatch.delenv(native.CPU_ISA_ENV)
    assert native.cpu_isa_code() == 0
    for _ in range(2):
        monkeypatch.setenv(native.CPU_ISA_ENV, "sse9")
        with pytest.raises(ValueError, match="accepted values: auto, generic, avx2, avx512"):
            native.cpu_isa_code()


def test_solver_env_torch_uses_the_reference(monkeypatch):
    monkeypatch.setenv(native.SOLVER_ENV, "torch")
    y = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    assert causal.solver_for(y) is solve_reference
    assert causal.adjoint_solver_for(y) is adjoint_reference
    assert native.solver_status(build=False)["cpu"]["solver"] == "torch"


@pytest.fixture
def cpu_unavailable(monkeypatch):
    """Simulate a failed build (as if the compiler had rejected the sources)."""
    reason = "build failed: RuntimeError: solve_cpu.cpp:1:1: error: simulated compiler error"
    monkeypatch.setitem(native._status, "cpu", native.BuildStatus(False, reason))
    return reason


def test_solver_env_native_errors_with_the_reason_when_unavailable(monkeypatch, cpu_unavailable):
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    w = random_causal_weight(2, 2, "TL", unit=True)
    y = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(native.NativeUnavailableError, match="simulated compiler error"):
        solve(y, w)
    status = native.solver_status()["cpu"]
    assert status["solver"] == "error" and "simulated compiler error" in status["reason"]


@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on PATH")
def test_a_real_build_failure_reports_the_compiler_output(monkeypatch, tmp_path, capfd):
    """A broken source (here: a missing header, which stops the compiler at once) makes
    INVCONV_SOLVER=native fail with the compiler's own message, and `auto` fall back."""
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    source = csrc / "solve_cpu.cpp"
    source.write_text('#include "invconv_missing_header.h"\n' + source.read_text())
    monkeypatch.setattr(native, "source_dir", lambda: csrc)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_status", {})  # a fresh per-process cache, restored afterwards
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    y = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(native.NativeUnavailableError, match="invconv_missing_header.h"):
        causal.solver_for(y)
    assert "compiling the native CPU solver" in capfd.readouterr().err
    monkeypatch.setenv(native.SOLVER_ENV, "auto")
    assert causal.solver_for(y) is solve_reference


def test_solver_env_auto_falls_back_with_the_reason(monkeypatch, cpu_unavailable):
    monkeypatch.setenv(native.SOLVER_ENV, "auto")
    w = random_causal_weight(2, 2, "TL", unit=True)
    y = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    assert causal.solver_for(y) is solve_reference
    torch.testing.assert_close(solve(y, w, unit_diagonal=True), solve_reference(y, w, "TL", True))
    status = native.solver_status()["cpu"]
    assert status["solver"] == "torch" and "simulated compiler error" in status["reason"]
    assert "cpu: torch (INVCONV_SOLVER=auto) — native unavailable: build failed" in native.describe()


def test_unsupported_dtype(monkeypatch, cpu_kernels):
    y = torch.randn(1, 2, 3, 3, dtype=torch.bfloat16)
    monkeypatch.setenv(native.SOLVER_ENV, "auto")
    assert causal.solver_for(y) is solve_reference
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    with pytest.raises(native.NativeUnavailableError, match="float32 and float64"):
        causal.solver_for(y)


def test_default_mode_is_native_when_it_builds(monkeypatch, cpu_kernels):
    monkeypatch.delenv(native.SOLVER_ENV, raising=False)
    assert causal.solver_for(torch.zeros(1, 1, 1, 1)) is cpu_kernels.solve
    status = native.solver_status()["cpu"]
    assert status["solver"] == "native-cpu" and "C++ kernel" in status["reason"]


def test_import_builds_nothing():
    """Importing the package (and solving with INVCONV_SOLVER=torch) compiles and loads no native code."""
    code = textwrap.dedent(
        """
        import os, torch
        os.environ["INVCONV_SOLVER"] = "torch"
        import layers, layers.causal, layers.native
        layers.causal.solve(torch.randn(1, 2, 3, 3), torch.eye(2).reshape(2, 2, 1, 1))
        loaded = [lib for lib in torch.ops.loaded_libraries if "invconv" in lib]
        print(layers.native._status, loaded)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["{}", "[]"], out
    assert "compiling" not in out.stderr


def test_another_checkout_loads_the_cached_build_without_compiling(cpu_kernels, tmp_path):
    """The build cache is keyed by the sources' contents: a copy of the code elsewhere (a fresh
    clone, the base worktree of ``bench ab``) loads the existing library instead of recompiling
    it for its own source paths."""
    for part in ("layers", "csrc"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import layers.native as n; print(n.solver_status()['cpu']['reason'])"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", native.SOLVER_ENV)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         check=True, timeout=120)
    assert "loaded from cache" in out.stdout, out.stdout + out.stderr
    assert "compiling" not in out.stderr


# ----------------------------------------------------------------------------------------------
# CUDA: compiled wherever nvcc exists, emulated on the host everywhere, run where a GPU is present


@pytest.fixture(scope="session")
def cuda_emulator(tmp_path_factory):
    """csrc/solve_cuda.cu compiled as host C++ through tests/cuda_emulation/shim.h (32 threads per
    block, so every loop over a block's work runs several rounds)."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path_factory.mktemp("emulator") / "emulate"
    src = ROOT / "tests" / "cuda_emulation" / "emulate.cpp"
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", "-pthread", "-DINVCONV_CUDA_THREADS=32",
           "-Wno-unknown-pragmas", str(src), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return exe


def _emulate(exe, tmp_path, y, w, orientation, unit, adjoint, max_rows=0, ring=False, dtype=torch.float64,
             smem_limit=None):
    import numpy as np

    b, c, h, wd = y.shape
    y.double().numpy().tofile(tmp_path / "y")
    w.double().numpy().tofile(tmp_path / "w")
    args = [str(exe), "0" if dtype == torch.float32 else "1", str(b), str(c), str(h), str(wd), str(w.shape[-1]),
            str(native.ORIENTATION_CODES[orientation]), str(int(unit)), str(int(adjoint)), str(max_rows),
            str(int(ring)), str(tmp_path / "y"), str(tmp_path / "w"), str(tmp_path / "x")]
    env = dict(os.environ, **({"EMU_SMEM_LIMIT": str(smem_limit)} if smem_limit else {}))
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    x = torch.from_numpy(np.fromfile(tmp_path / "x", dtype=np.float64)).reshape(y.shape)
    plan = dict(item.split("=") for item in out.stdout.split())
    return x, {key: int(v) for key, v in plan.items()}


# (shape, k, max_rows, force_ring, smem_limit, what the plan must show)
_EMULATED = [
    ((2, 3, 5, 8), 3, 0, False, None, {"strips": 1, "ring": 0}),
    ((1, 48, 6, 7), 2, 0, False, None, {"strips": 1, "n_ob": 3}),
    ((2, 12, 23, 9), 3, 6, False, None, {"strips": 4, "ring": 0}),
    ((1, 4, 13, 11), 5, 4, True, None, {"strips": 4, "ring": 1}),
    ((1, 12, 9, 30), 3, 3, True, None, {"strips": 3, "ring": 1}),
    ((1, 24, 20, 9), 3, 0, False, 20000, {"ring": 1, "weights_in_smem": 0}),
    ((2, 1, 4, 3), 1, 0, False, None, {"strips": 1}),
    ((1, 48, 24, 9), 3, 4, True, None, {"strips": 6, "ring": 1, "n_ob": 3}),  # column > registers
    ((1, 5, 7, 1), 3, 3, True, None, {"strips": 3}),
    ((2, 5, 1, 7), 2, 0, False, None, {"strips": 1}),
]


@pytest.mark.parametrize("case", range(len(_EMULATED)))
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cuda_kernel_emulated_on_host(cuda_emulator, tmp_path, orientation, case):
    """The CUDA kernels' indexing, orientations, adjoint, strips with progress flags, column ring
    and shared-memory planning, run on the host (see tests/cuda_emulation/shim.h for what this
    does not check)."""
    shape, k, max_rows, ring, smem_limit, expect_plan = _EMULATED[case]
    unit = case % 2 == 0
    adjoint = orientation in ("TR", "BR")
    weight = random_causal_weight(shape[1], k, orientation, unit, scale=0.05)
    y = torch.randn(shape, dtype=torch.float64)
    ref = (adjoint_reference if adjoint else solve_reference)(y, weight, orientation, unit)
    x, plan = _emulate(cuda_emulator, tmp_path, y, weight, orientation, unit, adjoint, max_rows, ring,
                       smem_limit=smem_limit)
    assert {key: plan[key] for key in expect_plan} == expect_plan, plan
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    if case == 0:
        x32, _ = _emulate(cuda_emulator, tmp_path, y, weight, orientation, unit, adjoint, dtype=torch.float32)
        torch.testing.assert_close(x32, ref, rtol=1e-5, atol=1e-5)


# k = 1 with the column ring: the ring needs a column more than R + k - 1 there (a slot committed
# during a step must not be one the step writes). (shape, k, max_rows, force_ring, dtype, plan)
_EMULATED_K1_RING = [
    ((1, 12, 16, 200), 1, 0, False, torch.float64, {"strips": 1, "ring": 1}),  # the planner's own choice
    ((1, 12, 64, 256), 1, 0, False, torch.float32, {"strips": 2, "ring": 1}),
    ((1, 4, 8, 20), 1, 4, True, torch.float64, {"strips": 2, "ring": 1, "ring_cols": 5}),
    ((2, 3, 5, 13), 1, 0, True, torch.float64, {"strips": 1, "ring": 1}),
]


@pytest.mark.parametrize("adjoint", [False, True], ids=["solve", "adjoint"])
@pytest.mark.parametrize("case", range(len(_EMULATED_K1_RING)))
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cuda_kernel_emulated_k1_with_column_ring(cuda_emulator, tmp_path, orientation, case, adjoint):
    shape, k, max_rows, ring, dtype, expect_plan = _EMULATED_K1_RING[case]
    unit = case % 2 == 1
    weight = random_causal_weight(shape[1], k, orientation, unit, scale=0.05)
    y = torch.randn(shape, dtype=torch.float64)
    ref = (adjoint_reference if adjoint else solve_reference)(y, weight, orientation, unit)
    x, plan = _emulate(cuda_emulator, tmp_path, y, weight, orientation, unit, adjoint, max_rows, ring, dtype=dtype)
    assert {key: plan[key] for key in expect_plan} == expect_plan, plan
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(x, ref, rtol=tol, atol=tol)


@pytest.fixture(scope="session")
def cuda_emulator_tsan(tmp_path_factory):
    """The emulator built with ThreadSanitizer: the CUDA threads of a block are host threads, so a
    shared-memory race between two steps' barriers is a data race TSan reports (it found the k = 1
    ring race at the eviction read against the x write). Skipped, with the reason, where the
    compiler cannot build or run it."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path_factory.mktemp("emulator_tsan") / "emulate"
    src = ROOT / "tests" / "cuda_emulation" / "emulate.cpp"
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread",
           "-DINVCONV_CUDA_THREADS=32", "-Wno-unknown-pragmas", str(src), "-o", str(exe)]
    out = subprocess.run(cmd + ["-Wno-tsan"], capture_output=True, text=True)
    if out.returncode != 0:  # -Wno-tsan is GCC's; retry without it before giving up
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"the compiler cannot build with -fsanitize=thread: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    probe = subprocess.run([str(exe)], capture_output=True, text=True)  # usage message: rc 1 unless TSan cannot start
    if probe.returncode != 1:
        pytest.skip(f"ThreadSanitizer binaries do not run here: {(probe.stderr.strip().splitlines() or ['?'])[0]}")
    return exe


# (shape, k, max_rows, force_ring): the ring at k = 1 and k = 3, strips with progress flags
_TSAN_CASES = [((1, 4, 8, 20), 1, 4, True), ((2, 3, 5, 13), 1, 0, True), ((1, 12, 9, 30), 3, 3, True),
               ((1, 4, 13, 11), 5, 4, True), ((2, 12, 23, 9), 3, 6, False)]


@pytest.mark.parametrize("case", range(len(_TSAN_CASES)))
def test_cuda_kernel_emulated_under_thread_sanitizer(cuda_emulator_tsan, tmp_path, monkeypatch, case):
    """No data race between the CUDA threads of a block (solve and adjoint), and exact results."""
    shape, k, max_rows, ring = _TSAN_CASES[case]
    monkeypatch.setenv("TSAN_OPTIONS", "halt_on_error=1:exitcode=66")
    for orientation, adjoint in [("TL", False), ("BR", True)]:
        weight = random_causal_weight(shape[1], k, orientation, False, scale=0.05)
        y = torch.randn(shape, dtype=torch.float64)
        ref = (adjoint_reference if adjoint else solve_reference)(y, weight, orientation, False)
        x, _ = _emulate(cuda_emulator_tsan, tmp_path, y, weight, orientation, False, adjoint, max_rows, ring)
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)


def test_cuda_planner_reports_shapes_that_do_not_fit(cuda_emulator, tmp_path):
    weight = random_causal_weight(12, 7, "TL", True)
    y = torch.randn(1, 12, 8, 8, dtype=torch.float64)
    with pytest.raises(AssertionError, match="does not fit in shared memory"):
        _emulate(cuda_emulator, tmp_path, y, weight, "TL", True, False, smem_limit=8000)


def test_cuda_kernel_attribute_is_set_once(cuda_emulator, tmp_path, monkeypatch):
    """cudaFuncSetAttribute runs once per device and kernel instantiation, not per solve (two host
    threads could otherwise interleave it with each other's launches)."""
    weight = random_causal_weight(4, 3, "TL", True)
    y = torch.randn(1, 4, 8, 20, dtype=torch.float64)
    monkeypatch.setenv("EMU_REPEAT", "3")
    x, plan = _emulate(cuda_emulator, tmp_path, y, weight, "TL", True, False, 4, True)
    assert plan["attribute_calls"] == 1
    torch.testing.assert_close(x, solve_reference(y, weight, "TL", True), rtol=1e-10, atol=1e-10)


def test_cuda_errors_carry_cuda_text_and_clear_the_error_state(cuda_emulator, tmp_path, monkeypatch):
    weight = random_causal_weight(4, 3, "TL", True)
    y = torch.randn(1, 4, 8, 20, dtype=torch.float64)
    monkeypatch.setenv("EMU_FAIL_ATTRIBUTE", "1")
    with pytest.raises(AssertionError) as info:
        _emulate(cuda_emulator, tmp_path, y, weight, "TL", True, False)
    text = str(info.value)
    assert "invconv_cuda: cannot reserve the planned shared memory: cudaErrorInvalidValue: invalid argument" in text
    assert "error state afterwards: cudaSuccess" in text


def test_cuda_planner_counts_the_fold_kernels_shared_memory(cuda_emulator, tmp_path):
    """The fold kernel holds the C×C inverse of the centre block in shared memory: a C too large
    for it is a planning error (so INVCONV_SOLVER=auto falls back), not a failed launch."""
    weight = random_causal_weight(40, 1, "TL", True)
    y = torch.randn(1, 40, 2, 2, dtype=torch.float64)
    with pytest.raises(AssertionError, match="too many channels for the centre block's inverse"):
        _emulate(cuda_emulator, tmp_path, y, weight, "TL", True, False, smem_limit=40 * 40 * 8 + 200)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """The kernels compile (no GPU needed), so a syntax error in the .cu cannot land unseen."""
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-Werror", "all-warnings", "-c", str(ROOT / "csrc" / "solve_cuda.cu"),
           "-o", str(tmp_path / "solve_cuda.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout


cuda_only = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@pytest.fixture(scope="module")
def cuda_kernels():
    status = native.load("cuda")
    assert status.available, f"the native CUDA solver did not build:\n{status.reason}"
    return native.kernels_for("cuda", torch.float32)


def _cuda(y, w, orientation, unit, adjoint=False, max_rows=0, ring=False):
    return torch.ops.invconv_cuda.solve(y, w, native.ORIENTATION_CODES[orientation], unit, adjoint, max_rows, ring)


@cuda_only
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("c", [1, 3, 12, 28, 48])  # output blocks: quarter; half+quarter; 1+1+1 / 3 full
@pytest.mark.parametrize("unit", [True, False], ids=["unit", "general"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cuda_solve_matches_reference(cuda_kernels, orientation, unit, c, k):
    for b, (h, w) in [(1, (5, 8)), (3, (6, 3))]:
        weight = random_causal_weight(c, k, orientation, unit, scale=0.3 / max(1.0, c**0.5 * k / 3))
        y = torch.randn(b, c, h, w, dtype=torch.float64)
        ref = solve_reference(y, weight, orientation, unit)
        ref_adj = adjoint_reference(y, weight, orientation, unit)
        yc, wc = y.cuda(), weight.cuda()
        torch.testing.assert_close(_cuda(yc, wc, orientation, unit).cpu(), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(_cuda(yc, wc, orientation, unit, True).cpu(), ref_adj, rtol=1e-10, atol=1e-10)
        x32 = _cuda(yc.float(), wc.float(), orientation, unit).cpu()
        torch.testing.assert_close(x32, ref.float(), rtol=1e-4, atol=1e-4)


@cuda_only
@pytest.mark.parametrize("max_rows,ring", [(0, False), (8, False), (5, True), (3, True)])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cuda_strips_and_column_ring(cuda_kernels, orientation, max_rows, ring):
    """Row strips that wait on each other's progress flags, and the column ring of wide images."""
    weight = random_causal_weight(12, 3, orientation, unit=False, scale=0.05)
    y = torch.randn(3, 12, 45, 71, dtype=torch.float64)
    ref = solve_reference(y, weight, orientation, False)
    x = _cuda(y.cuda(), weight.cuda(), orientation, False, False, max_rows, ring).cpu()
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    lam = _cuda(y.cuda(), weight.cuda(), orientation, False, True, max_rows, ring).cpu()
    torch.testing.assert_close(lam, adjoint_reference(y, weight, orientation, False), rtol=1e-10, atol=1e-10)


@cuda_only
def test_cuda_large_image_and_batch(cuda_kernels):
    weight = random_causal_weight(12, 3, "TL", unit=True, scale=0.05, dtype=torch.float32)
    y = torch.randn(2, 12, 256, 256)
    x = _cuda(y.cuda(), weight.cuda(), "TL", True)
    torch.testing.assert_close(causal_conv2d(x, weight.cuda(), "TL").cpu(), y, rtol=1e-4, atol=1e-4)
    y = torch.randn(1100, 4, 8, 8)  # more images than threads in a block (the published code failed here)
    w4 = random_causal_weight(4, 3, "TL", unit=True, scale=0.05, dtype=torch.float32)
    x = _cuda(y.cuda(), w4.cuda(), "TL", True)
    torch.testing.assert_close(causal_conv2d(x, w4.cuda(), "TL").cpu(), y, rtol=1e-4, atol=1e-4)


@cuda_only
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cuda_gradcheck(monkeypatch, cuda_kernels, orientation):
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    c, k = 4, 3
    off = (torch.randn(c, c, k * k - 1, dtype=torch.float64, device="cuda") * 0.2).requires_grad_()
    lower = (torch.randn(c * (c - 1) // 2, dtype=torch.float64, device="cuda") * 0.2).requires_grad_()
    y = torch.randn(2, c, 4, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert causal.solver_for(y) is cuda_kernels.solve

    def f(y, off, lower):
        return solve(y, assemble_weight(off, lower, None, orientation), orientation, unit_diagonal=True)

    assert torch.autograd.gradcheck(f, (y, off, lower))


@cuda_only
@pytest.mark.parametrize("name", ["inverse-flow", "finc"])
def test_cuda_layers_native_equals_torch(monkeypatch, cuda_kernels, name):
    torch.manual_seed(1)
    layer = layers.create(name, channels=12, kernel_size=3).cuda()
    x = torch.randn(3, 12, 20, 17, device="cuda")
    outs = {}
    for mode in ("torch", "native"):
        monkeypatch.setenv(native.SOLVER_ENV, mode)
        layer.zero_grad()
        z, logdet = layer(x)
        ((z**2).sum() + logdet.sum()).backward()
        outs[mode] = (z.detach(), layer.inverse(z).detach(), [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(outs["native"][:2], outs["torch"][:2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(outs["native"][2], outs["torch"][2]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)

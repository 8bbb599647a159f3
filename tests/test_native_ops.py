"""The native solves as registered PyTorch operators: operator checks, torch.compile of every
layer against eager, the fallback of ``INVCONV_SOLVER=auto`` for shapes the kernel cannot run, the
CUDA build's cache key, and (where a GPU is present) CUDA-graph capture."""

import sys

import pytest

import torch
from helpers import random_causal_weight, require_native_cpu

import layers
from bench.native_check import graph_replay
from layers import causal, native
from layers.causal import ORIENTATIONS, solve_reference

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def cpu_ops():
    require_native_cpu()


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cpu_ops_pass_opcheck(cpu_ops, orientation):
    """Schema, fake kernel, autograd registration and AOT dispatch agree with the real kernels."""
    code = native.ORIENTATION_CODES[orientation]
    weight = random_causal_weight(3, 3, orientation, unit=False).requires_grad_()
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.invconv_cpu.causal_solve.default, (y, weight, code, False, 0))
    x = torch.ops.invconv_cpu.causal_solve(y.detach(), weight.detach(), code, False, 0)
    for need_w in (True, False):
        torch.library.opcheck(torch.ops.invconv_cpu.causal_solve_backward.default,
                              (torch.randn_like(x), weight.detach(), x, code, False, need_w, 0))


def test_cpu_op_gradcheck_and_no_double_backward(cpu_ops):
    """gradcheck through the free parameters (the centre's upper triangle and unit diagonal are
    not parameters of the solve)."""
    c, k = 3, 2
    off = (torch.randn(c, c, k * k - 1, dtype=torch.float64) * 0.2).requires_grad_()
    lower = (torch.randn(c * (c - 1) // 2, dtype=torch.float64) * 0.2).requires_grad_()
    y = torch.randn(2, c, 4, 3, dtype=torch.float64, requires_grad=True)

    def f(y, off, lower):
        weight = causal.assemble_weight(off, lower, None, "BR")
        return torch.ops.invconv_cpu.causal_solve(y, weight, native.ORIENTATION_CODES["BR"], True, 0)

    assert torch.autograd.gradcheck(f, (y, off, lower))
    x = f(y, off, lower)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(x.square().sum(), (y, off), create_graph=True)


@pytest.mark.parametrize("unit", [True, False], ids=["unit", "general"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_cpu_masked_ops_pass_opcheck(cpu_ops, orientation, unit):
    """The same for the masked solve (weight assembled inside the op) and its backward."""
    code = native.ORIENTATION_CODES[orientation]
    c, k = 3, 2
    off = (torch.randn(c, c, k * k - 1, dtype=torch.float64) * 0.2).requires_grad_()
    lower = (torch.randn(c * (c - 1) // 2, dtype=torch.float64) * 0.2).requires_grad_()
    diag = None if unit else (1.0 + 0.3 * torch.rand(c, dtype=torch.float64)).requires_grad_()
    y = torch.randn(2, c, 4, 5, dtype=torch.float64, requires_grad=True)
    isa = native.cpu_isa_code()
    torch.library.opcheck(torch.ops.invconv_cpu.masked_solve.default, (y, off, lower, diag, code, isa))
    x = torch.ops.invconv_cpu.masked_solve(y.detach(), off.detach(), lower.detach(),
                                           None if unit else diag.detach(), code, isa)
    for need_w in (True, False):
        torch.library.opcheck(torch.ops.invconv_cpu.masked_solve_backward.default,
                              (torch.randn_like(x), off.detach(), lower.detach(), None if unit else diag.detach(),
                               x, code, need_w, isa))


@pytest.mark.parametrize("unit", [True, False], ids=["unit", "general"])
def test_cpu_masked_op_equals_the_solve_of_the_assembled_weight(cpu_ops, unit):
    """Bit for bit: the op assembles the weight layers.causal.assemble_weight builds and runs the
    same kernel; its backward's parameter gradients are the weight gradient's free entries."""
    c, k, o = 5, 3, "BL"
    code, isa = native.ORIENTATION_CODES[o], native.cpu_isa_code()
    off = torch.randn(c, c, k * k - 1, dtype=torch.float64) * 0.1
    lower = torch.randn(c * (c - 1) // 2, dtype=torch.float64) * 0.1
    diag = None if unit else 1.0 + 0.3 * torch.rand(c, dtype=torch.float64)
    weight = causal.assemble_weight(off, lower, diag, o)
    y, g = torch.randn(2, c, 6, 7, dtype=torch.float64), torch.randn(2, c, 6, 7, dtype=torch.float64)
    x = torch.ops.invconv_cpu.masked_solve(y, off, lower, diag, code, isa)
    assert torch.equal(x, torch.ops.invconv_cpu.solve(y, weight, code, unit, False, isa))
    lam, g_off, g_lower, g_diag = torch.ops.invconv_cpu.masked_solve_backward(g, off, lower, diag, x, code, True, isa)
    lam_w, g_w = torch.ops.invconv_cpu.solve_backward(g, weight, x, code, unit, True, isa)
    assert torch.equal(lam, lam_w)
    a, b = causal.centre_tap(k, o)
    mask = torch.ones(k, k, dtype=torch.bool)
    mask[a, b] = False
    assert torch.equal(g_off, g_w[..., mask])
    rows, cols = torch.tril_indices(c, c, -1)
    assert torch.equal(g_lower, g_w[rows, cols, a, b])
    assert torch.equal(g_diag, torch.empty(0, dtype=g.dtype) if unit else g_w[:, :, a, b].diagonal())
    lam2, *rest = torch.ops.invconv_cpu.masked_solve_backward(g, off, lower, diag, x, code, False, isa)
    assert torch.equal(lam2, lam) and all(t.numel() == 0 for t in rest)


def test_cpu_masked_op_rejects_bad_arguments(cpu_ops):
    """Direct callers of the op get TORCH_CHECK's one-line messages naming the argument."""
    off, lower = torch.randn(3, 3, 8), torch.randn(3)
    y = torch.randn(1, 3, 4, 4)
    ops = torch.ops.invconv_cpu
    with pytest.raises(RuntimeError, match=r"off_centre must be \(C, C, k\*k-1\) with C = y.size\(1\) = 2"):
        ops.masked_solve(y[:, :2], off, lower, None, 0)
    with pytest.raises(RuntimeError, match="last dimension must be k\\*k-1"):
        ops.masked_solve(y, off[..., :5], lower, None, 0)
    with pytest.raises(RuntimeError, match=r"lower must be \(C\*\(C-1\)/2,\) = \(3,\)"):
        ops.masked_solve(y, off, lower[:2], None, 0)
    with pytest.raises(RuntimeError, match=r"diagonal must be \(C,\) = \(3,\)"):
        ops.masked_solve(y, off, lower, torch.ones(4), 0)
    with pytest.raises(RuntimeError, match="must share dtype and device"):
        ops.masked_solve(y, off.double(), lower, None, 0)
    with pytest.raises(RuntimeError, match="orientation code must be 0 \\(TL\\)"):
        ops.masked_solve(y, off, lower, None, 4)


def test_inverse_flow_forward_is_one_cpp_node_on_the_parameters(monkeypatch, cpu_ops):
    """The layer's density direction is one operator call: its autograd node is the C++ masked
    solve and leads straight to the parameters (no assembly nodes), its backward refuses a double
    backward, and autograd's version check stops a backward after an in-place update of the
    parameters the forward used (nothing is cached between calls)."""
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    layer = layers.create("inverse-flow", channels=4, kernel_size=3).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    z, _ = layer(x)
    assert "CppNode<invconv::MaskedSolveFunction" in z.grad_fn.name()
    leaves = [fn for fn, _ in z.grad_fn.next_functions if fn is not None]
    assert sorted(fn.name() for fn in leaves) == ["torch::autograd::AccumulateGrad"] * 3
    assert {id(fn.variable) for fn in leaves} == {id(x), id(layer.off_centre), id(layer.lower)}
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(z.square().sum(), (x, layer.off_centre), create_graph=True)
    z, _ = layer(x)
    with torch.no_grad():
        layer.off_centre.add_(0.01)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_solve_uses_the_registered_op(monkeypatch, cpu_ops):
    """Under the native solver, layers.causal.solve is one operator call whose autograd node is
    C++ (no Python torch.autograd.Function in the graph)."""
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    weight = random_causal_weight(4, 3, "TL", unit=True).requires_grad_()
    y = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    x = causal.solve(y, weight, "TL", unit_diagonal=True)
    assert "CppNode<invconv::CausalSolveFunction" in x.grad_fn.name()  # the C++ node (csrc/solve_autograd.h)
    torch.testing.assert_close(x, solve_reference(y.detach(), weight.detach(), "TL", True))


@pytest.mark.parametrize("op_name", ["causal_solve", "masked_solve"])
def test_ops_record_a_node_only_when_a_gradient_can_flow(op_name, cpu_ops):
    """The Autograd kernels skip the node (and its context) when grad mode is off or no input
    requires grad — the same values, no graph — and record it when one input does, whichever."""
    ops = torch.ops.invconv_cpu
    torch.manual_seed(0)
    c, k = 4, 3
    y = torch.randn(2, c, 5, 5, dtype=torch.float64)
    off = torch.randn(c, c, k * k - 1, dtype=torch.float64) * 0.1
    lower = torch.randn(c * (c - 1) // 2, dtype=torch.float64) * 0.1
    weight = causal.assemble_weight(off, lower, orientation="TL")
    if op_name == "causal_solve":
        inputs = [y, weight]
        call = lambda a, b: ops.causal_solve(a, b, 0, True)  # noqa: E731
    else:
        inputs = [y, off, lower]
        call = lambda a, b, d: ops.masked_solve(a, b, d, None, 0)  # noqa: E731
    expected = solve_reference(y, weight, "TL", True)
    plain = call(*inputs)
    assert plain.grad_fn is None and not plain.requires_grad
    torch.testing.assert_close(plain, expected)
    for i in range(len(inputs)):
        args = [t.clone().requires_grad_(j == i) for j, t in enumerate(inputs)]
        x = call(*args)
        assert x.requires_grad and "CppNode<invconv::" in x.grad_fn.name()
        torch.testing.assert_close(x.detach(), expected)
        with torch.no_grad():
            x = call(*args)
        assert x.grad_fn is None and not x.requires_grad
        with torch.inference_mode():
            x = call(*args)
        assert x.grad_fn is None and x.is_inference()
        torch.testing.assert_close(x, expected)


def _graph_recorder(graphs):
    backend = torch._dynamo.lookup_backend("aot_eager")

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return backend(gm, example_inputs)

    return record


@pytest.mark.parametrize("name", layers.available())
def test_torch_compile_fullgraph_matches_eager_with_the_native_solver(monkeypatch, cpu_ops, name):
    """torch.compile(layer, fullgraph=True) — Dynamo, the fake kernels, AOTAutograd through the
    C++ autograd node — gives eager's outputs, inverse and gradients, with the native op in the
    graph where the layer solves. (The aot_eager backend compiles every layer in seconds;
    Inductor is checked on two layers below.)"""
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = layers.create(name, channels=4, kernel_size=3, input_size=(6, 5))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 4, 6, 5)
    graphs = []
    forward = torch.compile(layer, fullgraph=True, backend=_graph_recorder(graphs))
    inverse = torch.compile(layer.inverse, fullgraph=True, backend=_graph_recorder(graphs))

    def run(fwd, inv):
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        z, logdet = fwd(xg)
        (z.square().sum() + logdet.sum()).backward()
        grads = [None if p.grad is None else p.grad.clone() for p in layer.parameters()]  # snf: inverse-only
        return z.detach(), logdet.detach(), inv(z.detach()), xg.grad, grads

    eager, compiled = run(layer, layer.inverse), run(forward, inverse)
    for a, b in zip(eager[:4], compiled[:4]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager[4], compiled[4]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # Layers built on the causal solve (their module uses layers.causal.solve) must reach the
    # native operator; sequential layers with another inverse (MaCow's rows, MintNet's Newton
    # iterations) need not.
    module = sys.modules[type(layer).__module__]
    if getattr(module, "solve", None) is causal.solve:
        assert any("invconv_cpu.causal_solve" in code for code in graphs), graphs
    if getattr(module, "solve_masked", None) is causal.solve_masked:
        assert any("invconv_cpu.masked_solve" in code for code in graphs), graphs


@pytest.mark.parametrize("name", ["inverse-flow", "finc"])
def test_torch_compile_inductor_matches_eager(monkeypatch, cpu_ops, name):
    """The default backend (Inductor) too, with the solve as an extern kernel in its code."""
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    torch._dynamo.reset()
    layer = layers.create(name, channels=4, kernel_size=3)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    z, logdet = layer(x)
    (z.square().sum() + logdet.sum()).backward()
    grad = x.grad.clone()
    x.grad = None
    z2, logdet2 = torch.compile(layer, fullgraph=True)(x)
    (z2.square().sum() + logdet2.sum()).backward()
    torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet2, logdet, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.compile(layer.inverse, fullgraph=True)(z.detach()), layer.inverse(z.detach()),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# INVCONV_SOLVER=auto falls back for a shape the native kernel cannot run


@pytest.fixture
def shape_does_not_fit(monkeypatch, cpu_ops):
    """As if the kernel's planner had rejected every shape (on a GPU: too little shared memory)."""
    reason = "invconv_cuda: this shape does not fit in shared memory (simulated)"
    monkeypatch.setattr(native, "plan_error", lambda y, k: reason)
    monkeypatch.setattr(native, "_fallbacks", {})
    return reason


def test_auto_falls_back_to_the_reference_and_records_why(monkeypatch, shape_does_not_fit):
    monkeypatch.setenv(native.SOLVER_ENV, "auto")
    weight = random_causal_weight(3, 3, "TL", unit=True).requires_grad_()
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference solve for C=3 4x4 k=3 float64"):
        x = causal.solve(y, weight, "TL", unit_diagonal=True)
    assert "CppNode" not in x.grad_fn.name()  # the reference's autograd.Function
    torch.testing.assert_close(x, solve_reference(y.detach(), weight.detach(), "TL", True))
    x.square().sum().backward()
    assert y.grad is not None and weight.grad is not None
    assert native.fallbacks() == [f"C=3 4x4 k=3 float64 on cpu: {shape_does_not_fit}"]
    status = native.solver_status()["cpu"]
    assert status["solver"] == "native-cpu" and shape_does_not_fit in status["fallback"]
    assert "uses the PyTorch reference" in status["fallback"]


def test_native_mode_raises_when_the_shape_does_not_fit(monkeypatch, shape_does_not_fit):
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    weight = random_causal_weight(3, 3, "TL", unit=True)
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(native.NativeUnavailableError, match="cannot run C=3 4x4 k=3 float64 on cpu.*simulated"):
        causal.solve(y, weight, "TL", unit_diagonal=True)


def test_cuda_build_is_keyed_by_the_gpus_and_the_arch_list(monkeypatch):
    """A cache shared by machines with different GPUs (an NFS home) keeps one build per target."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(8, 0), (9, 0)][i])
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    target = native.cuda_build_target()
    assert target.startswith("sm=8.0,9.0|")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6+PTX")
    assert native.cuda_build_target().endswith("TORCH_CUDA_ARCH_LIST=8.6+PTX")
    files = native._CUDA_SOURCES + native._CUDA_DEPENDS
    dirs = {native._build_dir("invconv_cuda", files, [], t) for t in (target, native.cuda_build_target())}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 0))
    dirs.add(native._build_dir("invconv_cuda", files, [], native.cuda_build_target()))
    assert len(dirs) == 3


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

cuda_only = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@cuda_only
@pytest.mark.parametrize("name", ["inverse-flow", "finc"])
def test_cuda_graph_capture_of_a_layer_call(monkeypatch, name):
    """A layer's forward and inverse captured in a CUDA graph and replayed on new data give
    eager's results (no host synchronisation, allocation outside the caching allocator or
    per-call attribute setting inside the solve)."""
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    layer = layers.create(name, channels=12, kernel_size=3).cuda()
    x = torch.randn(8, 12, 32, 32, device="cuda")
    z, logdet, x_back, fresh = graph_replay(layer, x)
    with torch.no_grad():
        z_ref, logdet_ref = layer(fresh)
        torch.testing.assert_close(z, z_ref)
        torch.testing.assert_close(logdet, logdet_ref)
        torch.testing.assert_close(x_back, layer.inverse(z_ref))


@cuda_only
def test_cuda_torch_compile_matches_eager(monkeypatch):
    monkeypatch.setenv(native.SOLVER_ENV, "native")
    torch._dynamo.reset()
    layer = layers.create("finc", channels=12, kernel_size=3).cuda()
    x = torch.randn(4, 12, 16, 16, device="cuda", requires_grad=True)
    z, logdet = layer(x)
    z2, logdet2 = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(logdet2, logdet)
    zd = z.detach()
    torch.testing.assert_close(torch.compile(layer.inverse, fullgraph=True)(zd), layer.inverse(zd))

"""The native solve kernels checked on a device, the machinery of ``python -m bench gpu-check``
(``bench/commands/gpu_check.py`` says what it covers): the cases, a worker process per run of
cases under a watchdog (a hang is reported as ``timeout`` and the next case gets a fresh worker),
``compute-sanitizer`` over a few small cases, the timings against ``F.conv2d``, and the summary.
``python -m bench.native_check --worker DEVICE`` is the worker: cases in (JSON lines on stdin),
one result per case out."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The worker runs from here, so that ``-m bench.native_check`` imports this tree's modules.
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# The cases


def _solve_case(b, c, h, w, k, dtype, orientation="TL", unit=True, layout="contiguous", max_rows=0, ring=False):
    return {"kind": "solve", "shape": [b, c, h, w], "k": k, "dtype": dtype, "orientation": orientation,
            "unit": unit, "layout": layout, "max_rows": max_rows, "ring": ring}


def default_cases(device: str, device_count: int = 1, smoke: bool = False) -> list[dict[str, Any]]:
    """The correctness cases, in order; each a JSON-able dict with a unique ``id``."""
    orientations = ["TL", "TR", "BL", "BR"]
    cases: list[dict[str, Any]] = []
    if smoke:
        shapes = [(2, 3, 16, 16, 1), (2, 12, 16, 16, 3), (1, 4, 8, 20, 2)]
    else:
        shapes = [(1, 3, 16, 16, 1), (4, 3, 16, 16, 3), (8, 12, 32, 32, 3), (128, 12, 32, 32, 3),
                  (100, 12, 32, 32, 1), (2, 12, 64, 64, 5), (1, 12, 256, 256, 3), (1, 12, 200, 256, 1),
                  (2, 24, 32, 32, 11), (1, 48, 64, 64, 7), (1, 96, 16, 16, 3), (16, 4, 128, 128, 2),
                  (1, 96, 32, 32, 5), (3, 12, 45, 71, 2)]
    for dtype in ("float32", "float64"):
        for i, (b, c, h, w, k) in enumerate(shapes):
            cases.append(_solve_case(b, c, h, w, k, dtype, orientations[i % 4], unit=i % 2 == 0))
    # Row strips waiting on each other and the column ring, forced on a mid-sized image.
    if device == "cuda":
        for k in (1, 3):
            for max_rows, ring in [(8, False), (5, True), (3, True)]:
                cases.append(_solve_case(3, 12, 45, 71, k, "float64", orientations[(k + max_rows) % 4], False,
                                         max_rows=max_rows, ring=ring))
    for layout in ("noncontiguous", "channels_last"):
        cases.append(_solve_case(8, 12, 32, 32, 3, "float32", "BR", True, layout=layout))
    cases.append({"kind": "determinism", "shape": [8, 12, 32, 32], "k": 3, "dtype": "float32", "repeats": 5})
    if not smoke:
        cases.append({"kind": "determinism", "shape": [4, 12, 256, 256], "k": 3, "dtype": "float32", "repeats": 5})
    cases.append({"kind": "layer", "name": "inverse-flow", "shape": [4, 12, 32, 32]})
    cases.append({"kind": "layer", "name": "finc", "shape": [4, 12, 32, 32]})
    if device == "cuda":
        cases.append({"kind": "stream", "shape": [8, 12, 64, 64], "k": 3, "dtype": "float32"})
        cases.append({"kind": "fallback", "shape": [1, 96, 16, 16], "k": 11, "dtype": "float32"})
        cases.append({"kind": "fallback", "shape": [1, 48, 16, 16], "k": 11, "dtype": "float64"})
        cases.append({"kind": "graph", "name": "inverse-flow", "shape": [8, 12, 32, 32]})
        if device_count > 1:
            cases.append({"kind": "device2", "shape": [8, 12, 32, 32], "k": 3, "dtype": "float32"})
    if not smoke:
        cases.append({"kind": "compile", "name": "finc", "shape": [4, 12, 16, 16], "slow": True})
    for i, case in enumerate(cases):
        case["id"] = f"{i:03d}-{case_label(case)}"
    return cases


def case_label(case: dict[str, Any]) -> str:
    shape = "x".join(str(s) for s in case.get("shape", []))
    if case["kind"] == "solve":
        extra = "".join([f" rows<={case['max_rows']}" if case["max_rows"] else "", " ring" if case["ring"] else "",
                         f" {case['layout']}" if case["layout"] != "contiguous" else ""])
        return (f"solve {shape} k={case['k']} {case['dtype']} {case['orientation']}"
                f" {'unit' if case['unit'] else 'general'}{extra}")
    if case["kind"] in ("layer", "graph", "compile"):
        return f"{case['kind']} {case['name']} {shape}"
    if case["kind"] == "sleep":
        return f"sleep {case['seconds']}s"
    return f"{case['kind']} {shape} k={case.get('k')} {case.get('dtype', '')}".strip()


TIMING_SHAPES = [(100, 12, 32, 32, 3), (100, 12, 256, 256, 3), (100, 12, 32, 32, 11), (100, 24, 32, 32, 3)]

SANITIZER_CASES = [_solve_case(1, 4, 8, 20, 1, "float32", "TL", True, max_rows=4, ring=True),
                   _solve_case(1, 12, 9, 30, 3, "float32", "BR", False, max_rows=3, ring=True),
                   _solve_case(2, 3, 16, 16, 3, "float64", "TR", True)]


# ----------------------------------------------------------------------------------------------
# Running one case (in the worker process)


def _tolerance(dtype) -> float:
    import torch

    return 2e-4 if dtype == torch.float32 else 1e-9


def _weight(c, k, orientation, unit, dtype, device, gen):
    """A causal weight with a lower-triangular centre, small enough taps to keep the solve well
    conditioned at every size (as the tests' weights)."""
    import torch

    from layers.causal import centre_tap

    w = torch.randn(c, c, k, k, dtype=torch.float64, generator=gen) * (0.3 / max(1.0, c**0.5 * k / 3))
    a, b = centre_tap(k, orientation)
    centre = torch.tril(w[:, :, a, b], diagonal=-1)
    if unit:
        diag = torch.ones(c, dtype=torch.float64)
    else:
        sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0).double()
        diag = (0.5 + torch.rand(c, dtype=torch.float64, generator=gen)) * sign
    w[:, :, a, b] = centre + torch.diag(diag)
    return w.to(device=device, dtype=dtype)


def _rel(got, want) -> float:
    """Max abs difference relative to the larger of 1 and the reference's max magnitude."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


class _Checks:
    def __init__(self):
        self.items: dict[str, dict[str, Any]] = {}

    def close(self, name, err, tol):
        self.items[name] = {"err": err, "tol": tol, "ok": bool(err <= tol)}

    def flag(self, name, ok, note=""):
        self.items[name] = {"ok": bool(ok), **({"note": note} if note else {})}

    @property
    def ok(self) -> bool:
        return all(item["ok"] for item in self.items.values())


def _inputs(case, device):
    import torch

    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator().manual_seed(1234)
    b, c, h, w = case["shape"]
    weight = _weight(c, case["k"], case.get("orientation", "TL"), case.get("unit", True), dtype, device, gen)
    y = torch.randn(b, c, h, w, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(b, c, h, w, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)
    return y, g, weight


def _raw_solve(device, y, weight, orientation, unit, adjoint, max_rows=0, ring=False):
    """The bare native solve (no autograd); max_rows / ring force the CUDA planner's strips and ring."""
    import torch

    from layers import native

    code = native.ORIENTATION_CODES[orientation]
    if device.type == "cuda":
        return torch.ops.invconv_cuda.solve(y, weight, code, unit, adjoint, max_rows, ring)
    return torch.ops.invconv_cpu.solve(y, weight, code, unit, adjoint, 0)


def _run_solve(case, device, checks):
    import torch

    from layers import causal, native
    from layers.causal import adjoint_reference, causal_conv2d, solve_reference

    y, g, weight = _inputs(case, device)
    o, unit, k = case["orientation"], case["unit"], case["k"]
    tol = _tolerance(y.dtype)
    if case["layout"] == "noncontiguous":
        y_in = y.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided
        assert not y_in.is_contiguous()
    elif case["layout"] == "channels_last":
        y_in = y.contiguous(memory_format=torch.channels_last)
    else:
        y_in = y
    x = _raw_solve(device, y_in, weight, o, unit, False, case["max_rows"], case["ring"])
    lam = _raw_solve(device, g, weight, o, unit, True, case["max_rows"], case["ring"])
    if case["layout"] != "contiguous":
        checks.flag("same bits as contiguous input", torch.equal(x, _raw_solve(device, y, weight, o, unit, False)))
    # Residuals in float64, as backward errors: max|T x − y| / max(|T|·|x|), and the same for
    # Tᵀ λ = g (Tᵀ v as the gradient of <T u, v>). Normalising by |T|·|x| rather than |y| keeps
    # the check meaningful where x grows large (general diagonals on big images).
    w64 = weight.double()

    def conv_t(v, w):
        u = torch.zeros_like(v, dtype=torch.float64, requires_grad=True)
        return torch.autograd.grad(causal_conv2d(u, w, o), u, grad_outputs=v.double())[0]

    def backward_error(residual, scale):
        return float(residual.abs().max() / max(float(scale.abs().max()), 1e-300))

    checks.close("residual T x - y", backward_error(causal_conv2d(x.double(), w64, o) - y.double(),
                                                    causal_conv2d(x.double().abs(), w64.abs(), o)), tol)
    checks.close("residual T^T lam - g", backward_error(conv_t(lam, w64) - g.double(),
                                                        conv_t(lam.double().abs(), w64.abs())), tol)
    b, c, h, wd = case["shape"]
    work = b * c * k * k * h * wd
    if work <= 5e7:  # the reference's per-diagonal gathers stay small
        checks.close("solve vs reference", _rel(x, solve_reference(y, weight, o, unit)), tol)
        checks.close("adjoint vs reference", _rel(lam, adjoint_reference(g, weight, o, unit)), tol)
        # Gradients: the registered op (C++ autograd) against the reference's autograd.Function.
        grads = {}
        for mode in ("native", "torch"):
            os.environ[native.SOLVER_ENV] = mode
            yg, wg = y.clone().requires_grad_(), weight.clone().requires_grad_()
            out = causal.solve(yg, wg, o, unit_diagonal=unit, assume_triangular=True)
            grads[mode] = torch.autograd.grad(out, (yg, wg), grad_outputs=g)
        os.environ[native.SOLVER_ENV] = "native"
        checks.close("grad y vs reference", _rel(grads["native"][0], grads["torch"][0]), tol)
        checks.close("grad W vs reference", _rel(grads["native"][1], grads["torch"][1]), tol * 10)
    if c * h * wd <= 2048 and b <= 4:  # the dense solve
        d = c * h * wd
        basis = torch.eye(d, dtype=torch.float64, device=device).reshape(d, c, h, wd)
        t = causal_conv2d(basis, w64, o).reshape(d, -1).t()
        dense = torch.linalg.solve(t, y.double().reshape(b, -1).t()).t().reshape(y.shape)
        checks.close("solve vs dense", _rel(x, dense), tol)


def _run_determinism(case, device, checks):
    import torch

    y, g, weight = _inputs(case, device)
    first = [_raw_solve(device, y, weight, "TL", True, adj, 0, False) for adj in (False, True)]
    same = True
    for _ in range(case["repeats"] - 1):
        again = [_raw_solve(device, y, weight, "TL", True, adj, 0, False) for adj in (False, True)]
        same = same and all(torch.equal(a, b) for a, b in zip(first, again))
    checks.flag(f"bitwise equal over {case['repeats']} launches (solve and adjoint)", same)


def _run_stream(case, device, checks):
    import torch

    y, g, weight = _inputs(case, device)
    x = _raw_solve(device, y, weight, "TL", True, False)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        xs = _raw_solve(device, y, weight, "TL", True, False)
        lam_s = _raw_solve(device, g, weight, "TL", True, True)
    side.synchronize()
    checks.flag("side stream: same bits", torch.equal(x, xs)
                and torch.equal(lam_s, _raw_solve(device, g, weight, "TL", True, True)))


def _run_device2(case, device, checks):
    import torch

    y, g, weight = _inputs(case, device)
    other = torch.device("cuda", 1)
    x0 = _raw_solve(device, y, weight, "TL", True, False)
    x1 = _raw_solve(other, y.to(other), weight.to(other), "TL", True, False)
    checks.close("cuda:1 vs cuda:0", _rel(x1.to(device), x0), _tolerance(y.dtype))


def _run_fallback(case, device, checks):
    import warnings

    from layers import causal, native
    from layers.causal import solve_reference

    y, g, weight = _inputs(case, device)
    err = native.plan_error(y, case["k"])
    os.environ[native.SOLVER_ENV] = "auto"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = causal.solve(y, weight, "TL", unit_diagonal=True, assume_triangular=True)
    os.environ[native.SOLVER_ENV] = "native"
    checks.close("auto: result vs reference", _rel(x, solve_reference(y, weight, "TL", True)), _tolerance(y.dtype))
    if err is None:
        checks.flag("plan fits on this device (the native kernel ran)", True, "fits here")
    else:
        warned = any("using the PyTorch reference" in str(w.message) for w in caught)
        checks.flag("auto fell back with a warning and a recorded reason",
                    warned and any(err in f for f in native.fallbacks()), err)


def _layer_outputs(name, x, mode):
    import torch

    import layers
    from layers import native

    os.environ[native.SOLVER_ENV] = mode
    torch.manual_seed(0)
    layer = layers.create(name, channels=x.shape[1], kernel_size=3).to(x.device)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    xg = x.clone().requires_grad_()
    z, logdet = layer(xg)
    (z.square().sum() + logdet.sum()).backward()
    out = [z.detach(), logdet.detach(), layer.inverse(z.detach()), xg.grad] + [p.grad for p in layer.parameters()]
    os.environ[native.SOLVER_ENV] = "native"
    return out


def _run_layer(case, device, checks):
    import torch

    x = torch.randn(*case["shape"], generator=torch.Generator().manual_seed(7)).to(device)
    nat, ref = _layer_outputs(case["name"], x, "native"), _layer_outputs(case["name"], x, "torch")
    names = ["z", "logdet", "inverse", "grad x"] + [f"grad param {i}" for i in range(len(nat) - 4)]
    for n, a, b in zip(names, nat, ref):
        checks.close(f"native vs reference: {n}", _rel(a, b), 1e-3 if n.startswith("grad") else 1e-4)


def graph_replay(layer, x):
    """``layer``'s forward and inverse on ``x`` captured in one CUDA graph (after warm-up calls
    on a side stream: builds, plans and kernel attributes happen outside the capture), then
    replayed on fresh data copied into ``x``. Returns the replayed (z, logdet, inverse of z) and
    the fresh input, for comparing with eager calls on it."""
    import torch

    device = x.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            layer.inverse(layer(x)[0])
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        z, logdet = layer(x)
        x_back = layer.inverse(z)
    fresh = torch.randn_like(x)
    x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize(device)
    return z, logdet, x_back, fresh


def _run_graph(case, device, checks):
    import torch

    import layers

    torch.manual_seed(0)
    layer = layers.create(case["name"], channels=case["shape"][1], kernel_size=3).to(device)
    x = torch.randn(*case["shape"], device=device)
    z, logdet, x_back, fresh = graph_replay(layer, x)
    with torch.no_grad():
        z_ref, logdet_ref = layer(fresh)
        checks.close("graph replay vs eager: z", _rel(z, z_ref), 1e-5)
        checks.close("graph replay vs eager: logdet", _rel(logdet, logdet_ref), 1e-5)
        checks.close("graph replay vs eager: inverse", _rel(x_back, layer.inverse(z_ref)), 1e-5)


def _run_compile(case, device, checks):
    import torch

    import layers

    torch.manual_seed(0)
    layer = layers.create(case["name"], channels=case["shape"][1], kernel_size=3).to(device)
    x = torch.randn(*case["shape"], device=device)
    z, logdet = layer(x)
    z2, logdet2 = torch.compile(layer, fullgraph=True)(x)
    checks.close("compiled vs eager: z", _rel(z2, z), 1e-5)
    checks.close("compiled vs eager: logdet", _rel(logdet2, logdet), 1e-5)
    zd = z.detach()
    checks.close("compiled vs eager: inverse", _rel(torch.compile(layer.inverse, fullgraph=True)(zd),
                                                    layer.inverse(zd)), 1e-5)


def _run_timing(case, device, checks):
    from .timing.kernels import Shape, measure_shape

    b, c, h, w = case["shape"]
    shape = Shape(str(device), case["dtype"], b, c, h, w, case["k"], "TL")
    res = measure_shape(shape, min_calls=10, min_seconds=0.2, rounds=3, include_reference=False)
    checks.flag("measured", True)
    return {"medians_us": {n: m.median * 1e6 for n, m in res.measurements.items()}, "ratios": res.ratios()}


_RUNNERS = {"solve": _run_solve, "determinism": _run_determinism, "stream": _run_stream, "device2": _run_device2,
            "fallback": _run_fallback, "layer": _run_layer, "graph": _run_graph, "compile": _run_compile,
            "timing": _run_timing}


def run_case(case: dict[str, Any], device: str) -> dict[str, Any]:
    """Run one case in this process; returns its result record (never raises)."""
    import torch

    t0 = time.perf_counter()
    record: dict[str, Any] = {"id": case.get("id", ""), "case": case}
    checks = _Checks()
    try:
        if case["kind"] == "sleep":  # the watchdog's own test: a case that hangs
            time.sleep(case["seconds"])
            checks.flag("slept", True)
            extra = None
        else:
            from layers import native

            dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
            status = native.load(dev.type)  # from the cache the parent filled
            if not status.available:
                raise native.NativeUnavailableError(status.reason)
            extra = _RUNNERS[case["kind"]](case, dev, checks)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        record["status"] = "pass" if checks.ok else "fail"
        if extra:
            record["result"] = extra
    except Exception as exc:  # noqa: BLE001 - reported as the case's status
        record["status"] = "error"
        record["message"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    record["checks"] = checks.items
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def _worker(device: str) -> int:
    """Reads cases (JSON lines) on stdin, writes one result (JSON line) per case on stdout."""
    import torch

    from layers import native

    os.environ[native.SOLVER_ENV] = "native"
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    native.load(torch.device(device).type)  # imports and library load before the first case's clock
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.strip():
            out.write(json.dumps(run_case(json.loads(line), device)) + "\n")
            out.flush()
    return 0


# ----------------------------------------------------------------------------------------------
# The watchdog (in the parent process)


class _Worker:
    def __init__(self, device: str, log):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.native_check", "--worker", device],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=env,
                                     text=True)

    STARTUP_TIMEOUT = 300.0  # importing torch and loading the library, on a busy machine

    def start(self) -> str | None:
        """Wait for the worker's ready line; returns why it did not come, or None."""
        ready, _, _ = select.select([self.proc.stdout], [], [], self.STARTUP_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() == json.dumps({"ready": True}):
            return None
        self.kill()
        return "the worker process did not start" + ("" if ready else f" within {self.STARTUP_TIMEOUT:.0f} s")

    def ask(self, case: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The case's result, or None if the worker did not answer in time (it is then killed)."""
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"id": case["id"], "case": case, "status": "error", "message": "the worker process died",
                    "checks": {}}
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            return None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"id": case["id"], "case": case, "status": "error", "checks": {},
                    "message": f"the worker process exited with status {code} (a crash; see worker.log)"}
        return json.loads(line)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def check_cases(cases: list[dict[str, Any]], device: str, timeout: float, log_path: Path, progress=None):
    """Run ``cases`` in worker processes, each under a watchdog of ``timeout`` seconds (4× for
    cases marked ``slow``); a hung or crashed worker is replaced for the next case."""
    results = []
    with open(log_path, "a") as log:
        worker = None
        for case in cases:
            if worker is None or not worker.alive:
                worker = _Worker(device, log)
                why = worker.start()
                if why:
                    results.append({"id": case["id"], "case": case, "status": "error", "checks": {},
                                    "message": f"{why} (see worker.log)"})
                    if progress:
                        progress(results[-1])
                    continue
            limit = timeout * (4 if case.get("slow") else 1)
            t0 = time.perf_counter()
            record = worker.ask(case, limit)
            if record is None:
                record = {"id": case["id"], "case": case, "status": "timeout", "checks": {},
                          "message": f"no answer within {limit:.0f} s: a hang (the worker was killed)"}
            record.setdefault("seconds", round(time.perf_counter() - t0, 3))
            results.append(record)
            if progress:
                progress(record)
        if worker is not None:
            worker.close()
    return results


def run_sanitizer(tool: str, cases: list[dict[str, Any]], device: str, timeout: float, log_path: Path) -> dict:
    """``compute-sanitizer --tool TOOL`` over a worker that runs ``cases``; pass when it reports
    no error and every case passed."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return {"id": f"sanitizer-{tool}", "status": "skip", "checks": {},
                "message": "compute-sanitizer is not installed (it comes with the CUDA toolkit)"}
    cmd = [exe, "--tool", tool, "--error-exitcode", "99", sys.executable, "-m", "bench.native_check",
           "--worker", device]
    stdin = "".join(json.dumps(dict(c, id=f"{i}")) + "\n" for i, c in enumerate(cases))
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"id": f"sanitizer-{tool}", "status": "timeout", "checks": {},
                "message": f"compute-sanitizer --tool {tool} did not finish in {timeout:.0f} s"}
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n{out.stdout}\n{out.stderr}\n")
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"id"')]
    summary = [line for line in (out.stdout + out.stderr).splitlines() if "ERROR SUMMARY" in line]
    ok = out.returncode == 0 and len(results) == len(cases) and all(r["status"] == "pass" for r in results)
    return {"id": f"sanitizer-{tool}", "status": "pass" if ok else "fail", "checks": {},
            "message": (summary[-1].strip() if summary else f"exit status {out.returncode}")
            + f"; {sum(r['status'] == 'pass' for r in results)}/{len(cases)} cases passed",
            "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------------------------
# The report


def render_summary(env: dict, results: list[dict], timings: list[dict], build: str, wall: float) -> str:
    from tabulate import tabulate

    gpus = ", ".join(f"{g['name']} (sm {g['capability']})" for g in env.get("gpus") or []) or "no GPU"
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "error", "timeout", "skip")}
    lines = ["# gpu-check", "", f"`{env.get('command', '')}`", "",
             f"- machine: {gpus}; CPU {env.get('cpu', {}).get('model')}; torch {env.get('torch', {}).get('version')}, "
             f"CUDA {env.get('torch', {}).get('cuda')}, cuDNN {env.get('torch', {}).get('cudnn')}",
             f"- commit {env.get('git', {}).get('commit', '?')}; {env.get('timestamp_utc', '')}",
             f"- native build: {build}", f"- wall time: {wall:.0f} s",
             "- result: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
    rows = []
    for r in results:
        worst = [f"{name}: {c['err']:.1e} (tol {c['tol']:.0e})" for name, c in r.get("checks", {}).items()
                 if "err" in c and not c["ok"]]
        failed_flags = [name for name, c in r.get("checks", {}).items() if "err" not in c and not c["ok"]]
        detail = "; ".join(worst + failed_flags) or r.get("message", "")
        if r["status"] == "pass" and not detail:
            errs = [c["err"] for c in r.get("checks", {}).values() if "err" in c]
            detail = f"max rel. error {max(errs):.1e}" if errs else ""
        rows.append([r["id"], r["status"].upper() if r["status"] != "pass" else "pass", r.get("seconds", ""),
                     detail[:160]])
    lines.append(tabulate(rows, headers=["case", "status", "s", "detail"], tablefmt="github"))
    if timings:
        lines += ["", "## Timings against cuDNN (medians, µs)", ""]
        trows = []
        for t in timings:
            if t.get("status") != "pass":
                trows.append([t["id"], t["status"], "", "", "", "", t.get("message", "")[:80]])
                continue
            m, ratio = t["result"]["medians_us"], t["result"]["ratios"]
            trows.append([t["id"], *(f"{m.get(n, float('nan')):.1f}" for n in ("native solve", "native solve+backward",
                                                                                "conv2d", "conv2d+wgrad")),
                          *(f"{ratio.get(n) or float('nan'):.2f}" for n in ("solve / conv2d",
                                                                            "solve+backward / conv2d+wgrad")), ""])
        lines.append(tabulate(trows, headers=["shape", "solve", "solve+backward", "conv2d", "conv2d+wgrad",
                                              "solve / conv2d", "solve+backward / conv2d+wgrad", "note"],
                              tablefmt="github"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2]))
    sys.exit("usage: python -m bench.native_check --worker DEVICE (the gpu-check command's worker)")

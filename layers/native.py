"""Native (C++ and CUDA) solvers of the causal convolution, compiled on first use.

The sources live in ``csrc/`` (:func:`source_dir` finds them in a checkout and in an installed
package). Nothing is built at import time: the first solve that wants a native kernel (or an
explicit :func:`load`) compiles it with ``torch.utils.cpp_extension`` and ninja into a cache
folder, printing one line to stderr before and one after (the first use costs about a minute on
two cores; later processes load the cached library in well under a second).
Why a backend is unavailable (no compiler, no ninja, the compiler's error text, a CPU-only torch,
no GPU) is recorded and reported, never swallowed.

Which solver a tensor gets is decided by :func:`kernels_for`, used by
:func:`layers.causal.solver_for`, under the environment variable ``INVCONV_SOLVER``:

- ``auto`` (default): the native kernel for the tensor's device when it builds, else PyTorch;
- ``torch``: always the pure-PyTorch reference;
- ``native``: the native kernel, or :class:`NativeUnavailableError` with the reason.

:func:`solver_status` / :func:`describe` report, per device type, which solver is used and why
(``python -m bench kernels`` prints it; the runner's environment record should store it).

Environment:
    INVCONV_SOLVER: ``auto`` | ``torch`` | ``native``.
    INVCONV_CPU_ISA: ``auto`` | ``avx512`` | ``avx2`` | ``generic`` — the CPU kernel's SIMD path
        (for testing each path; ``auto`` takes the widest the CPU has: AVX-512, else AVX2+FMA,
        else the portable one; forcing one the CPU lacks is an error).
    INVCONV_NATIVE_CACHE: build folder (default ``$XDG_CACHE_HOME/invconv-bench/native``, i.e.
        ``~/.cache/invconv-bench/native``; shared by every checkout, keyed by the sources).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "CPU_ISA_ENV",
    "SOLVER_ENV",
    "SOLVER_MODES",
    "BuildStatus",
    "build_statuses",
    "cpu_isa_code",
    "NativeKernels",
    "NativeUnavailableError",
    "cpu_isa",
    "cuda_build_target",
    "cuda_plan_error",
    "describe",
    "differentiable_masked_solve",
    "differentiable_solve",
    "fallbacks",
    "kernels_for",
    "load",
    "plan_error",
    "requested_mode",
    "solver_status",
    "source_dir",
]

SOLVER_ENV = "INVCONV_SOLVER"
SOLVER_MODES = ("auto", "torch", "native")
CPU_ISA_ENV = "INVCONV_CPU_ISA"
_CPU_ISAS = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3}
_SOLVER_MODE_OF = {mode: mode for mode in SOLVER_MODES}
CACHE_ENV = "INVCONV_NATIVE_CACHE"

_CPU_SOURCES = ("solve_cpu.cpp", "solve_ops_cpu.cpp")
_CPU_DEPENDS = ("solve_cpu_kernel.h", "solve_autograd.h")
_CUDA_SOURCES = ("solve_cuda.cu", "solve_cuda_binding.cpp")
_CUDA_DEPENDS = ("solve_cuda.h", "solve_autograd.h")
_CPU_FLAGS = ["-O3", "-fopenmp", "-Wno-psabi"]  # OpenMP: at::parallel_for is header code (torch's libgomp is reused)
_CUDA_FLAGS = ["-O3", "-lineinfo"]  # the C++ standard is left to cpp_extension

ORIENTATION_CODES = {"TL": 0, "TR": 1, "BL": 2, "BR": 3}
SUPPORTED_DTYPES = (torch.float32, torch.float64)


class NativeUnavailableError(RuntimeError):
    """``INVCONV_SOLVER=native`` was requested but the native kernel cannot be used (with why)."""


@dataclasses.dataclass(frozen=True)
class BuildStatus:
    """Outcome of building (or loading) one native backend."""

    available: bool
    reason: str  # what was built and how, or why not
    seconds: float | None = None  # build/load time of this process's first use
    compiled: bool = False  # True when this process compiled it (not a cache hit)
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class NativeKernels:
    """The native kernels of one device type. ``solve`` and ``adjoint`` have the solver signature
    of :mod:`layers.causal`, ``(y, weight, orientation, unit_diagonal) -> x`` (no autograd);
    ``weight_grad`` that of :func:`layers.causal.conv_weight_grad`, ``(x, grad_out, kernel_size,
    orientation) -> dW``, or is ``None`` where the library routine (cuDNN) is used."""

    name: str
    solve: Callable[[torch.Tensor, torch.Tensor, str, bool], torch.Tensor]
    adjoint: Callable[[torch.Tensor, torch.Tensor, str, bool], torch.Tensor]
    weight_grad: Callable[[torch.Tensor, torch.Tensor, int, str], torch.Tensor] | None = None
    #: ``(grad, weight, x, orientation, unit_diagonal, need_weight_grad) -> (λ, ∂L/∂W or None)``: the
    #: whole backward of the solve in one call, where the backend has it.
    backward: Callable | None = None


_lock = threading.Lock()
_status: dict[str, BuildStatus] = {}


def build_statuses() -> dict[str, BuildStatus]:
    """What this process knows of each device's native build so far (a copy): available, compiled here, seconds."""
    return dict(_status)  # copied under the GIL; not under _lock, which a build holds for a minute


# Both variables are read on every solve (they may change while a process runs), so each raw
# value is parsed once: a dict lookup instead of strip/lower/validate per call. The raw value is
# read from the mapping behind os.environ where CPython has one (os.environ.get of an unset
# variable raises and catches KeyError twice: about 0.7 µs, per variable, per solve); setting
# a variable through os.environ updates that mapping, so nothing is missed.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENVIRON_KEYS: dict[str, object] = {}
_PARSED: dict[tuple[str, object], object] = {}  # (variable, raw value) -> its parsed value


def _raw_env(name: str):
    """The raw value of ``name`` (in the form os.environ stores it), or None when unset."""
    if _ENVIRON_DATA is None:
        return os.environ.get(name)
    key = _ENVIRON_KEYS.get(name)
    if key is None:
        key = _ENVIRON_KEYS[name] = os.environ.encodekey(name)
    return _ENVIRON_DATA.get(key)


def _env_choice(name: str, accepted: dict[str, object]):
    """``accepted[value]`` for the value of variable ``name`` (stripped, lower case; unset or
    empty is ``auto``), parsed once per raw value; a one-line error naming the accepted values
    for anything else (never cached, so it fails on every call)."""
    raw = _raw_env(name)
    parsed = _PARSED.get((name, raw), _PARSED)
    if parsed is _PARSED:
        value = os.environ.get(name)
        choice = (value or "").strip().lower() or "auto"
        if choice not in accepted:
            raise ValueError(f"{name}={value!r} is not valid; accepted values: {', '.join(accepted)}")
        parsed = _PARSED[(name, raw)] = accepted[choice]
    return parsed


def requested_mode() -> str:
    """The value of ``INVCONV_SOLVER`` (default ``auto``); a clear error for anything else."""
    return _env_choice(SOLVER_ENV, _SOLVER_MODE_OF)


def cpu_isa_code() -> int:
    """The native CPU kernel's ISA code for ``INVCONV_CPU_ISA`` (default ``auto``); a clear error for anything else."""
    return _env_choice(CPU_ISA_ENV, _CPU_ISAS)


# ----------------------------------------------------------------------------------------------
# Building


def source_dir() -> Path:
    """The folder of the C++/CUDA sources: ``layers/_csrc`` in an installed wheel (setup.py ships
    the top-level ``csrc/`` there as package data), else ``csrc/`` beside ``layers/`` in a checkout
    (run in place or installed editable)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / _CPU_SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"the native sources ({_CPU_SOURCES[0]}, ...) are neither in {package / '_csrc'} "
                            f"(an installed package) nor in {package.parent / 'csrc'} (a checkout); "
                            "reinstall invconv-bench")


def _cache_root() -> Path:
    """One per-user cache for every checkout: builds are keyed by the sources' contents, so a
    fresh clone, a CI run or the base worktree of ``bench ab`` reuses an identical build instead
    of compiling again."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "invconv-bench" / "native"


def _build_dir(name: str, files: tuple[str, ...], flags: list[str], target: str = "") -> Path:
    """A folder keyed by the sources, the flags, torch, Python and the build's target (for CUDA:
    the GPUs' compute capabilities and ``TORCH_CUDA_ARCH_LIST``), so a stale build, or one made
    for other GPUs on a shared (e.g. NFS) cache, is never loaded."""
    # Names and contents only, never the folder: a wheel installed elsewhere, a fresh clone and
    # the base worktree of `bench ab` share one build of identical sources.
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.encode())
        digest.update((source_dir() / f).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}|{target}".encode())
    return _cache_root() / f"{name}-{digest.hexdigest()[:16]}"


def cuda_build_target() -> str:
    """What a CUDA build is compiled for: the visible GPUs' compute capabilities (what
    ``cpp_extension`` targets when ``TORCH_CUDA_ARCH_LIST`` is unset) and that variable."""
    caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return f"sm={','.join(caps)}|TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}"


def _compile(name: str, label: str, sources: tuple[str, ...], depends: tuple[str, ...], target: str = "",
             **kwargs) -> BuildStatus:
    from torch.utils import cpp_extension

    flags = kwargs.get("extra_cflags", []) + kwargs.get("extra_cuda_cflags", [])
    build_dir = _build_dir(name, sources + depends, flags, target)
    build_dir.mkdir(parents=True, exist_ok=True)
    # Written once a build has loaded successfully; names the library. A process that finds it
    # loads the library directly: cpp_extension.load would regenerate build.ninja with this
    # checkout's absolute source paths and so recompile identical sources found in another one.
    ready = build_dir / "READY"
    start = time.perf_counter()
    if ready.exists():
        library = Path(ready.read_text().strip())
        if library.exists():
            try:
                torch.ops.load_library(str(library))
                return BuildStatus(True, "", time.perf_counter() - start, False, str(library))
            except OSError:
                pass  # a broken cached library: rebuild below
    print(f"invconv: compiling the native {label} solver (first use; cached in {build_dir}) ...",
          file=sys.stderr, flush=True)
    try:
        path = cpp_extension.load(name=name, sources=[str(source_dir() / s) for s in sources],
                                  build_directory=str(build_dir),
                                  is_python_module=False, verbose=False, **kwargs)
    except Exception as exc:  # the compiler's output is in the message
        seconds = time.perf_counter() - start
        print(f"invconv: building the native {label} solver failed after {seconds:.1f} s; using PyTorch "
              f"unless {SOLVER_ENV}=native", file=sys.stderr, flush=True)
        text = str(exc).strip()
        if len(text) > 4000:
            text = "...\n" + text[-4000:]
        return BuildStatus(False, f"build failed: {type(exc).__name__}: {text}", seconds, True)
    seconds = time.perf_counter() - start
    print(f"invconv: native {label} solver compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
    if path is None:  # load(is_python_module=False) returns nothing; the versioner may have named it name_vN.so
        path = max(build_dir.glob(f"{name}*.so"), key=lambda p: p.stat().st_mtime)
    tmp = ready.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(str(path))
    os.replace(tmp, ready)
    return BuildStatus(True, "", seconds, True, str(path))


def _build_cpu() -> BuildStatus:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return BuildStatus(False, "ninja is not installed (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return BuildStatus(False, f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    status = _compile("invconv_cpu", "CPU", _CPU_SOURCES, _CPU_DEPENDS, extra_cflags=list(_CPU_FLAGS),
                      extra_ldflags=["-fopenmp"])
    if not status.available:
        return status
    _register_fake_kernels("cpu")
    isa = torch.ops.invconv_cpu.isa()
    how = "compiled" if status.compiled else "loaded from cache"
    return dataclasses.replace(status, reason=f"C++ kernel, {isa} ({how} in {status.seconds:.1f} s)")


def _build_cuda() -> BuildStatus:
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return BuildStatus(False, f"this torch build ({torch.__version__}) has no CUDA support")
    if not torch.cuda.is_available():
        return BuildStatus(False, "no CUDA device is visible")
    if cpp_extension.CUDA_HOME is None:
        return BuildStatus(False, "the CUDA toolkit (nvcc) was not found: set CUDA_HOME")
    if not cpp_extension.is_ninja_available():
        return BuildStatus(False, "ninja is not installed (pip install ninja)")
    status = _compile("invconv_cuda", "CUDA", _CUDA_SOURCES, _CUDA_DEPENDS, target=cuda_build_target(),
                      extra_cflags=["-O3"], extra_cuda_cflags=list(_CUDA_FLAGS))
    if not status.available:
        return status
    _register_fake_kernels("cuda")
    how = "compiled" if status.compiled else "loaded from cache"
    name = torch.cuda.get_device_name()
    return dataclasses.replace(status, reason=f"CUDA kernel on {name} ({how} in {status.seconds:.1f} s)")


_BUILDERS = {"cpu": _build_cpu, "cuda": _build_cuda}


def load(device_type: str = "cpu") -> BuildStatus:
    """Build (first use) or load the native backend for ``device_type``; cached per process."""
    if device_type not in _BUILDERS:
        return BuildStatus(False, f"no native kernel for device type {device_type!r}")
    status = _status.get(device_type)
    if status is not None:
        return status
    with _lock:
        if device_type not in _status:
            _status[device_type] = _BUILDERS[device_type]()
        return _status[device_type]


def cpu_isa() -> str:
    """SIMD path the CPU kernel takes here (``avx512``, ``avx2+fma`` or ``generic``, after
    ``INVCONV_CPU_ISA``); builds on first use."""
    status = load("cpu")
    if not status.available:
        raise NativeUnavailableError(f"native CPU solver unavailable: {status.reason}")
    code = cpu_isa_code()
    return {1: "generic", 2: "avx2+fma", 3: "avx512"}.get(code) or torch.ops.invconv_cpu.isa()


# ----------------------------------------------------------------------------------------------
# The kernels behind the solver signature of layers.causal


def _cpu_solve(y, weight, orientation, unit_diagonal):
    return torch.ops.invconv_cpu.solve(y, weight, ORIENTATION_CODES[orientation], unit_diagonal, False,
                                       cpu_isa_code())


def _cpu_adjoint(g, weight, orientation, unit_diagonal):
    return torch.ops.invconv_cpu.solve(g, weight, ORIENTATION_CODES[orientation], unit_diagonal, True,
                                       cpu_isa_code())


def _cpu_weight_grad(x, grad_out, kernel_size, orientation):
    return torch.ops.invconv_cpu.weight_grad(x, grad_out, kernel_size, ORIENTATION_CODES[orientation],
                                             cpu_isa_code())


def _cpu_backward(grad, weight, x, orientation, unit_diagonal, need_weight_grad):
    return torch.ops.invconv_cpu.solve_backward(grad, weight, x, ORIENTATION_CODES[orientation], unit_diagonal,
                                                need_weight_grad, cpu_isa_code())


def _cuda_solve(y, weight, orientation, unit_diagonal):
    return torch.ops.invconv_cuda.solve(y, weight, ORIENTATION_CODES[orientation], unit_diagonal, False)


def _cuda_adjoint(g, weight, orientation, unit_diagonal):
    return torch.ops.invconv_cuda.solve(g, weight, ORIENTATION_CODES[orientation], unit_diagonal, True)


_KERNELS = {
    "cpu": NativeKernels("native-cpu", _cpu_solve, _cpu_adjoint, _cpu_weight_grad, _cpu_backward),
    "cuda": NativeKernels("native-cuda", _cuda_solve, _cuda_adjoint),
}


# ----------------------------------------------------------------------------------------------
# The differentiable solve as PyTorch operators (torch.ops.invconv_cpu.causal_solve and
# torch.ops.invconv_cuda.causal_solve): CPU / CUDA kernels and a C++ autograd node in csrc/, the
# fake kernels here, so that torch.compile traces them and autograd costs no Python per call.

_fakes_registered: set[str] = set()


def _register_fake_kernels(device_type: str) -> None:
    """Shape-only (fake / meta) kernels of the ops, for torch.compile; once per process."""
    if device_type in _fakes_registered:
        return
    lib = f"invconv_{device_type}"

    def solve_fake(y, weight, orientation, unit_diagonal, *rest):
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    def backward_fake(grad, weight, x, orientation, unit_diagonal, need_weight_grad, *rest):
        lam = torch.empty_like(grad, memory_format=torch.contiguous_format)
        grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight_grad \
            else weight.new_empty((0,))
        return lam, grad_w

    def masked_fake(y, off_centre, lower, diagonal, orientation, *rest):
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    def masked_backward_fake(grad, off_centre, lower, diagonal, x, orientation, need_weight_grad, *rest):
        lam = torch.empty_like(grad, memory_format=torch.contiguous_format)
        if not need_weight_grad:
            return lam, grad.new_empty((0,)), grad.new_empty((0,)), grad.new_empty((0,))
        c = off_centre.shape[0]
        return (lam, off_centre.new_empty(off_centre.shape), lower.new_empty((c * (c - 1) // 2,)),
                off_centre.new_empty((c if diagonal is not None else 0,)))

    torch.library.register_fake(f"{lib}::causal_solve")(solve_fake)
    torch.library.register_fake(f"{lib}::causal_solve_backward")(backward_fake)
    torch.library.register_fake(f"{lib}::masked_solve")(masked_fake)
    torch.library.register_fake(f"{lib}::masked_solve_backward")(masked_backward_fake)
    _fakes_registered.add(device_type)


# Shapes the native solve cannot run (a CUDA plan that does not fit in shared memory), per device
# and shape: the reason, recorded once and reported by solver_status.
_fallbacks: dict[tuple, str] = {}


@functools.lru_cache(maxsize=1024)
def cuda_plan_error(device_index: int, dtype: torch.dtype, channels: int, height: int, width: int,
                    kernel_size: int) -> str | None:
    """``None`` when the CUDA solve can run this shape on that device, else why not (the planner's
    own message: the shape does not fit in the device's shared memory). The batch does not
    matter: a plan is per image."""
    code = 0 if dtype == torch.float32 else 1
    err = torch.ops.invconv_cuda.plan_error(device_index, code, channels, height, width, kernel_size)
    return err or None


def plan_error(y: torch.Tensor, kernel_size: int) -> str | None:
    """Why the native solve of ``y``'s device cannot run this shape, or ``None``."""
    if not y.is_cuda:
        return None  # the CPU kernel has no shape limit
    if torch.compiler.is_compiling():
        # Under torch.compile the image size may be symbolic, which cannot be passed to the host
        # planner while tracing: the compiled graph calls the op, and a shape that does not fit
        # raises the planner's error (INVCONV_SOLVER=torch solves it).
        return None
    return cuda_plan_error(y.device.index or 0, y.dtype, y.shape[1], y.shape[2], y.shape[3], kernel_size)


# (device type, dtype, mode) -> the build status that served them: the positive answer holds as
# long as that status does (kernels_for costs 0.2 µs per solve; the status is only replaced by a
# new build attempt, or by a test simulating one).
_SERVED: dict[tuple[str, torch.dtype, str], BuildStatus] = {}


@torch.compiler.assume_constant_result
def _native_backend(device_type: str, dtype: torch.dtype, mode: str) -> str:
    """``device_type`` when its native op serves ``dtype``, else ``""``; raises under ``native``
    when it cannot. torch.compile evaluates this once while tracing (it may build the library,
    which tracing could not follow) and keeps the answer as a constant of the graph."""
    key = (device_type, dtype, mode)
    status = _status.get(device_type)
    if status is None or _SERVED.get(key) is not status:
        if kernels_for(device_type, dtype, required=(mode == "native")) is None:
            return ""
        _SERVED[key] = _status[device_type]
    return device_type


def _usable_backend(y: torch.Tensor, kernel_size: int, mode: str) -> str:
    """The device type whose native op solves tensors like ``y``, or ``""`` for the reference
    (see :func:`differentiable_solve`)."""
    # y.is_cpu first: y.device.type builds a torch.device (0.3 µs per solve).
    backend = _native_backend("cpu" if y.is_cpu else y.device.type, y.dtype, mode)
    if not backend:
        return ""
    err = plan_error(y, kernel_size)
    if err is None:
        return backend
    what = (f"C={y.shape[1]} {y.shape[2]}x{y.shape[3]} k={kernel_size} {str(y.dtype).replace('torch.', '')} "
            f"on {y.device}")
    if mode == "native":
        raise NativeUnavailableError(f"{SOLVER_ENV}=native: the native solve cannot run {what}: {err}")
    key = (str(y.device), y.dtype, y.shape[1], y.shape[2], y.shape[3], kernel_size)
    if key not in _fallbacks:
        _fallbacks[key] = f"{what}: {err}"
        warnings.warn(f"invconv: using the PyTorch reference solve for {what} ({err})", RuntimeWarning,
                      stacklevel=4)
    return ""


def differentiable_solve(y: torch.Tensor, kernel_size: int, mode: str):
    """The native differentiable solve op for tensors like ``y``, as ``(y, weight, orientation
    code, unit_diagonal) -> x``, or ``None`` where the reference must be used (``auto`` only;
    ``native`` raises :class:`NativeUnavailableError` with the reason instead).

    Under ``auto`` the reference is also used for a shape the native kernel cannot run (a CUDA
    plan that does not fit in the device's shared memory); the reason is recorded (see
    :func:`solver_status` and :func:`fallbacks`) and warned once per shape.
    """
    backend = _usable_backend(y, kernel_size, mode)
    if not backend:
        return None
    return _cpu_differentiable if backend == "cpu" else torch.ops.invconv_cuda.causal_solve


def differentiable_masked_solve(y: torch.Tensor, kernel_size: int, mode: str):
    """The native op of :func:`layers.causal.solve_masked` for tensors like ``y``, as ``(y,
    off_centre, lower, diagonal or None, orientation code) -> x``, or ``None`` where the
    reference must be used (chosen as in :func:`differentiable_solve`)."""
    backend = _usable_backend(y, kernel_size, mode)
    if not backend:
        return None
    return _cpu_masked if backend == "cpu" else torch.ops.invconv_cuda.masked_solve


def fallbacks() -> list[str]:
    """The shapes this process solved with the reference because the native kernel could not run
    them (see :func:`differentiable_solve`), with the reasons."""
    return list(_fallbacks.values())


def _cpu_differentiable(y, weight, orientation, unit_diagonal):
    return torch.ops.invconv_cpu.causal_solve(y, weight, orientation, unit_diagonal, cpu_isa_code())


def _cpu_masked(y, off_centre, lower, diagonal, orientation):
    return torch.ops.invconv_cpu.masked_solve(y, off_centre, lower, diagonal, orientation, cpu_isa_code())


def kernels_for(device: torch.device | str, dtype: torch.dtype, *, required: bool = False) -> NativeKernels | None:
    """The native kernels for tensors on ``device`` of ``dtype``, building them on first use.

    Returns ``None`` when there are none (unsupported device or dtype, or the build failed), or
    raises :class:`NativeUnavailableError` with the reason when ``required``.
    """
    # A plain "cpu"/"cuda" skips building a torch.device (this runs on every solve).
    device_type = device if isinstance(device, str) and device in _BUILDERS else torch.device(device).type
    if dtype not in SUPPORTED_DTYPES:
        if required:
            raise NativeUnavailableError(f"{SOLVER_ENV}=native: the native solver supports float32 and float64, "
                                         f"not {dtype}")
        return None
    status = load(device_type)
    if not status.available:
        if required:
            raise NativeUnavailableError(f"{SOLVER_ENV}=native but the native {device_type} solver is unavailable: "
                                         f"{status.reason}")
        return None
    return _KERNELS[device_type]


def solver_status(build: bool = True) -> dict[str, dict[str, str]]:
    """Per device type (``cpu``, ``cuda``): which solver :func:`layers.causal.solver_for` uses, and why.

    Arguments:
        build: build (or load) the native backends to find out; with ``False`` a backend that
            was not tried yet in this process is reported as such.

    Returns:
        ``{"cpu": {"solver": "native-cpu" | "torch" | "error", "mode": ..., "reason": ...}, "cuda": {...}}``
        (float32 and float64; other dtypes always use PyTorch, or are an error under ``native``).
    """
    try:
        mode = requested_mode()
    except ValueError as exc:
        return {d: {"solver": "error", "mode": os.environ.get(SOLVER_ENV, ""), "reason": str(exc)} for d in _BUILDERS}
    out = {}
    for device_type in _BUILDERS:
        if mode == "torch":
            out[device_type] = {"solver": "torch", "mode": mode,
                                "reason": f"{SOLVER_ENV}=torch: the pure-PyTorch reference"}
            continue
        status = load(device_type) if build else _status.get(device_type)
        if status is None:
            solver, reason = "unknown", "not built yet in this process (compiles on first use)"
        elif status.available:
            solver, reason = _KERNELS[device_type].name, status.reason
        elif mode == "native":
            solver, reason = "error", f"{SOLVER_ENV}=native but unavailable: {status.reason}"
        else:
            solver, reason = "torch", f"native unavailable: {status.reason}"
        out[device_type] = {"solver": solver, "mode": mode, "reason": reason}
        fell_back = [why for key, why in _fallbacks.items() if key[0].split(":")[0] == device_type]
        if status is not None and status.available and (device_type == "cuda" or fell_back):
            out[device_type]["fallback"] = _fallback_note(mode, fell_back)
    return out


def _fallback_note(mode: str, fell_back: list[str]) -> str:
    """What happens to a shape the native kernel cannot run, and which shapes did so here."""
    if mode == "native":
        note = "a shape whose plan does not fit in the GPU's shared memory is an error (INVCONV_SOLVER=native)"
    else:
        note = "a shape whose plan does not fit in the GPU's shared memory uses the PyTorch reference"
    if fell_back:
        note += "; in this process: " + "; ".join(fell_back)
    return note


def describe(build: bool = True) -> str:
    """One line per device type: the solver used and why (see :func:`solver_status`)."""
    lines = []
    for device_type, s in solver_status(build).items():
        reason = s["reason"].splitlines()[0] if s["reason"] else ""
        lines.append(f"{device_type}: {s['solver']} ({SOLVER_ENV}={s['mode']}) — {reason}")
        if s.get("fallback"):
            lines.append(f"  {s['fallback']}")
    return "\n".join(lines)

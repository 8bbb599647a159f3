"""The package works when installed from a wheel, away from the checkout.

A wheel is built from a copy of the checkout, installed into a temporary virtual environment
that reuses this interpreter's packages (torch is not installed again), and used from a folder
outside the repository: the native sources and the published tables must come from the
installed package, not from the source tree. About half a minute (building and installing the
wheel, a few interpreter starts); the native build is not repeated: the venv loads the library
this process built, which also checks that the build cache is keyed by the sources, not by
where they are installed. ``-m "not packaging"`` leaves these tests out while iterating.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import bench_in_process

from layers import native

ROOT = Path(__file__).resolve().parent.parent
HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
QUICK_RUN = ROOT / "results" / "quick" / "cifar"  # a committed run of the cifar preset

pytestmark = pytest.mark.packaging


def _source_copy(dest: Path) -> None:
    """The checkout as git sees it (tracked and new files, nothing git ignores): a stale
    ``build/`` of an earlier in-tree build, run folders or a virtual environment must not reach
    the wheel or slow the copy. Outside a git checkout, everything but generated folders."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs"))
        return
    for name in filter(None, listed.stdout.split("\0")):
        src = ROOT / name
        if src.is_file():  # tracked files deleted in the working tree are still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel and a virtual environment with it installed: ``python``, ``site`` (its
    site-packages), ``wheel``, ``env`` (no PYTHONPATH) and ``cwd`` (a folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, dist = tmp / "src", tmp / "dist"
    src.mkdir()
    _source_copy(src)
    # No build isolation: the build needs only setuptools, which is here (and may not be
    # downloadable); --no-deps: torch and the rest are reused, not resolved again.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src])
    (wheel,) = dist.glob("invconv_bench-*.whl")

    # A bare environment that sees this interpreter's packages through a .pth file. Not
    # --system-site-packages: when this interpreter is itself a venv, that option would expose
    # the base interpreter's packages instead of the ones installed here (torch among them).
    # The .pth lists folders only, so their own .pth files (an editable install of this
    # checkout) are not run: `bench` and `layers` can only come from the wheel.
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    import site as _site

    outer = [p for p in [*_site.getsitepackages(), _site.getusersitepackages()] if Path(p).is_dir()]
    (site / "_outer_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], env=env)
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return SimpleNamespace(python=python, site=site, wheel=wheel, env=env, cwd=cwd)


def test_the_wheel_carries_the_native_sources_and_the_paper_tables(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h"))
    tables = sorted(p.name for p in (ROOT / "results" / "paper").glob("*.toml"))
    assert sources and tables
    missing = [f"layers/_csrc/{s}" for s in sources if f"layers/_csrc/{s}" not in names]
    missing += [f"bench/_paper/{t}" for t in tables if f"bench/_paper/{t}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not any(n.startswith(("csrc/", "results/", "tests/")) for n in names), "top-level data in site-packages"


def test_installed_package_finds_its_data_inside_itself(installed):
    code = textwrap.dedent(
        """
        import bench, layers, bench.locations as loc, layers.native as native
        print(bench.__file__); print(layers.__file__); print(native.source_dir()); print(loc.paper_tables_dir())
        print(loc.checkout()); print(loc.baselines_dir()); print(",".join(loc.paper_table_ids()))
        """
    )
    out = _run([installed.python, "-c", code], env=installed.env, cwd=installed.cwd).stdout.splitlines()
    site = installed.site.resolve()
    assert out[0] == str(site / "bench" / "__init__.py") and out[1] == str(site / "layers" / "__init__.py")
    assert out[2] == str(site / "layers" / "_csrc") and out[3] == str(site / "bench" / "_paper")
    # A user's output goes under the working directory, never into site-packages.
    assert out[4] == "None" and out[5] == str(installed.cwd.resolve() / "results" / "baselines")
    assert out[6].split(",") == sorted(p.stem for p in (ROOT / "results" / "paper").glob("*.toml"))


@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on PATH: the native CPU solver cannot be built here")
def test_installed_native_solve_matches_the_reference_and_reuses_the_cached_build(installed):
    status = native.load("cpu")  # built (or loaded) here first, from the checkout's csrc/
    assert status.available, f"the native CPU solver did not build:\n{status.reason}"
    code = textwrap.dedent(
        """
        import torch
        from layers import causal, native
        g = torch.Generator().manual_seed(0)
        c, k = 5, 3
        weight = causal.assemble_weight(torch.randn(c, c, k * k - 1, generator=g, dtype=torch.float64) * 0.2,
                                        torch.randn(c * (c - 1) // 2, generator=g, dtype=torch.float64) * 0.2)
        y = torch.randn(2, c, 9, 7, generator=g, dtype=torch.float64)
        assert causal.solver_for(y) is not causal.solve_reference  # INVCONV_SOLVER=native: else an error
        x = causal.solve(y, weight, unit_diagonal=True)
        torch.testing.assert_close(x, causal.solve_reference(y, weight, "TL", True), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(causal.causal_conv2d(x, weight), y, rtol=1e-10, atol=1e-10)
        print(native.solver_status()["cpu"]["reason"])
        """
    )
    out = _run([installed.python, "-c", code], env={**installed.env, native.SOLVER_ENV: "native"},
               cwd=installed.cwd)
    assert "C++ kernel" in out.stdout and "loaded from cache" in out.stdout, out.stdout + out.stderr
    assert "compiling" not in out.stderr


def test_installed_bench_renders_a_paper_table_of_a_committed_run(installed):
    out = _run([installed.python, "-m", "bench", "table", QUICK_RUN, "--paper", "preset"], env=installed.env,
               cwd=installed.cwd)
    # The same rendering as from the checkout: same published numbers, same layout.
    here = bench_in_process("table", str(QUICK_RUN), "--paper", "preset")
    assert here.returncode == 0, here.stderr
    assert "Table" in out.stdout and out.stdout == here.stdout
    assert not list(installed.cwd.iterdir()), "rendering a table wrote into the working directory"

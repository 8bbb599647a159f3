"""Where bench's read-only data lives, and where it writes what a user produces.

Read-only data travels inside the installed package; the repository keeps its own layout, and
``setup.py`` maps the top-level folders into the package when a wheel is built:

- the published paper tables: ``results/paper/*.toml`` → ``bench/_paper/`` (:func:`paper_tables_dir`);
- the native C++/CUDA sources: ``csrc/`` → ``layers/_csrc/`` (:func:`layers.native.source_dir`);
- the presets: ``bench/sweep/presets/*.toml``, inside the package already.

Each function looks inside the package first and then at the checkout, so one code path serves a
wheel, ``pip install .``, an editable install and a checkout run in place (``python -m bench``).

What a user produces never goes into the installed package: run folders are created under
``results/runs/`` of the working directory (``bench run --out``), and the ratio baselines are
the checkout's ``results/baselines/``, or the working directory's when bench is installed
(:func:`baselines_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
TREE = PACKAGE.parent  # the checkout, or site-packages when installed


def checkout() -> Path | None:
    """The source checkout ``bench/`` is imported from (run in place or installed editable), or
    ``None`` when bench is installed from a wheel or with ``pip install .``."""
    return TREE if (TREE / "pyproject.toml").is_file() else None


def paper_tables_dir() -> Path:
    """The folder of the published tables (``<id>.toml``): ``bench/_paper`` when installed, else
    the checkout's ``results/paper``."""
    installed = PACKAGE / "_paper"
    return installed if installed.is_dir() else TREE / "results" / "paper"


def paper_table_ids(directory: Path | None = None) -> list[str]:
    """The ids of the published tables (their file names, ``<id>.toml``)."""
    return sorted(p.stem for p in Path(directory or paper_tables_dir()).glob("*.toml"))


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML data file (a published table, a preset) as a dict."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def baselines_dir() -> Path:
    """The folder of the ratio baselines (``<device>.json``): the checkout's ``results/baselines``
    (committed with the code they describe), or ``results/baselines`` under the working
    directory when bench is installed (``baseline record`` must not write into site-packages)."""
    root = checkout()
    return (root if root is not None else Path.cwd()) / "results" / "baselines"

"""Package layout that pyproject.toml cannot state while it discovers the packages itself.

The repository keeps the native sources and the published tables at the top level (``csrc/``,
``results/paper/``), but an installed bench must find them inside its packages: each folder is
mapped onto a data-only subpackage (``layers._csrc``, ``bench._paper``) whose files are package
data (globs in pyproject.toml). Code finds them with ``layers.native.source_dir()`` and
``bench.locations.paper_tables_dir()``, which look inside the package first and then at the
checkout, so editable installs and runs in place read the top-level folders directly.
"""

from setuptools import find_packages, setup

DATA_PACKAGES = {"layers._csrc": "csrc", "bench._paper": "results/paper"}

setup(packages=find_packages(include=["layers", "layers.*", "bench", "bench.*"]) + list(DATA_PACKAGES),
      package_dir=DATA_PACKAGES)

"""The registry: names, capabilities, errors, lazy imports and entry-point plugins."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import layers
from layers import LayerError, LayerUnavailableError, UnknownLayerError, UnsupportedError, registry

BUILTINS = ["butterfly", "cinc", "emerging", "finc", "glow-1x1", "inverse-flow", "snf", "woodbury"]


def test_available_lists_builtins_sorted():
    names = layers.available()
    assert set(BUILTINS) <= set(names)
    assert names == sorted(names)


def test_import_is_lazy():
    code = "import sys, layers; print(any(m.startswith('layers.') and m not in ('layers.base', 'layers.registry') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_name_lists_known_layers():
    with pytest.raises(UnknownLayerError) as err:
        layers.create("inverse-flwo", 4)
    for name in BUILTINS:
        assert name in str(err.value)
    with pytest.raises(UnknownLayerError, match="known layers"):
        layers.info("nope")


def test_info_without_building():
    info = layers.info("inverse-flow")
    assert info.sequential == "forward" and info.exact_inverse and info.kernel_size_applies
    assert layers.info("finc").sequential == "inverse" and layers.info("finc").channel_multiple == 4
    glow = layers.info("glow-1x1")
    assert not glow.kernel_size_applies and glow.sequential == "none"
    d = info.as_dict()
    assert d["paper"]["year"] == 2025 and "cpu" in d["devices"]


def test_finc_rejects_six_channels():
    with pytest.raises(UnsupportedError, match=r"finc: unsupported channel count C=6; accepted: C % 4 == 0"):
        layers.create("finc", 6)


def test_kernel_size_zero_and_input_size_errors():
    with pytest.raises(LayerError, match="kernel_size must be a positive integer, got 0"):
        layers.create("inverse-flow", 4, kernel_size=0)
    with pytest.raises(LayerError, match="input_size must be an int or a pair"):
        layers.create("inverse-flow", 4, input_size=(1, 2, 3))


def test_glow_ignores_kernel_size():
    layer = layers.create("glow-1x1", 4, kernel_size=7)
    assert layer.kernel_size is None


def test_runtime_registration():
    class Identity(layers.InvertibleLayer):
        info = layers.LayerInfo(name="identity-test", paper=layers.Paper("t", "a", "v", 2000),
                                exact_inverse=True, sequential="none", kernel_sizes="n/a")

        def _forward(self, x):
            return x, x.new_zeros(x.shape[0])

        def _inverse(self, z):
            return z

    layers.register("identity-test", Identity)
    try:
        assert "identity-test" in layers.available()
        layer = layers.create("identity-test", 2)
        z, ld = layer(torch.ones(1, 2, 3, 3))
        assert torch.equal(z, torch.ones(1, 2, 3, 3))
    finally:
        layers.unregister("identity-test")
    assert "identity-test" not in layers.available()


def test_register_rejects_non_layers():
    with pytest.raises(LayerError, match="no `info` attribute"):
        layers.register("bad", object)


# --- entry-point plugins: a real installed distribution (a .dist-info folder on sys.path) ------

PLUGIN_MODULE = textwrap.dedent(
    '''
    import torch
    from layers import InvertibleLayer, LayerInfo, Paper

    class Scale(InvertibleLayer):
        """Multiply by a learned per-channel factor exp(s)."""
        info = LayerInfo(name="demo-scale", paper=Paper("Demo", "Nobody", "none", 2024),
                         exact_inverse=True, sequential="none", kernel_sizes="n/a")

        def __init__(self, channels, kernel_size=None, input_size=None):
            super().__init__(channels, kernel_size, input_size)
            self.log_scale = torch.nn.Parameter(torch.zeros(channels))

        def _forward(self, x):
            z = x * self.log_scale.exp()[:, None, None]
            return z, (x.shape[2] * x.shape[3] * self.log_scale.sum()).expand(x.shape[0])

        def _inverse(self, z):
            return z * (-self.log_scale).exp()[:, None, None]
    '''
)


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """Install two plugin distributions: a working one and one whose module fails to import."""
    (tmp_path / "demo_plugin.py").write_text(PLUGIN_MODULE)
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('needs a library that is not installed')\n")
    for dist, name, target in [("demo-plugin", "demo-scale", "demo_plugin:Scale"),
                               ("broken-plugin", "demo-broken", "broken_plugin:Layer"),
                               ("clash-plugin", "finc", "demo_plugin:Scale")]:
        info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[{layers.ENTRY_POINT_GROUP}]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield
    monkeypatch.undo()
    for mod in ("demo_plugin", "broken_plugin"):
        sys.modules.pop(mod, None)
    registry.refresh()


def test_entry_point_plugin_is_discovered(installed_plugins):
    assert "demo-scale" in layers.available()
    assert set(BUILTINS) <= set(layers.available())
    layer = layers.create("demo-scale", 3)
    x = torch.randn(2, 3, 4, 4)
    z, _ = layer(x)
    torch.testing.assert_close(layer.inverse(z), x)


def test_broken_plugin_is_unavailable_with_reason(installed_plugins):
    assert "demo-broken" not in layers.available()
    reasons = layers.unavailable()
    assert "needs a library that is not installed" in reasons["demo-broken"]
    with pytest.raises(LayerUnavailableError, match="broken-plugin.*needs a library"):
        layers.create("demo-broken", 4)
    # The others still work.
    layers.create("finc", 4)


def test_plugin_cannot_shadow_a_builtin(installed_plugins):
    assert layers.info("finc").name == "finc"
    clash = [name for name in layers.unavailable() if name.startswith("finc [")]
    assert clash and "name clash" in layers.unavailable()[clash[0]]


def test_plugin_gets_the_conformance_checks(installed_plugins):
    """A plugin layer runs under the same checks (here: invertibility and the dense log det)."""
    from helpers import dense_jacobian

    layer = layers.create("demo-scale", 2).double()
    with torch.no_grad():
        layer.log_scale.add_(torch.randn(2, dtype=torch.float64))
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    z, ld = layer(x)
    jac = dense_jacobian(lambda v: layer(v)[0], x)
    torch.testing.assert_close(ld[0], torch.linalg.slogdet(jac)[1])

"""Table rendering against golden files (regenerate with UPDATE_GOLDEN=1 after checking the diff)."""

from __future__ import annotations

import pytest
from helpers import check_golden

from bench.report import tables
from bench.execution.runs import COLUMNS, long_frame


CONFIG = {
    "layers": ["inverse-flow", "emerging", "glow-1x1"], "sweep": ["kernel_size"],
    "values": {"input_size": [32], "batch": [8], "kernel_size": [2, 3], "channels": [12]},
    "device": "cpu", "dtype": "float32", "repeat": 5, "min_time": 0.3, "warmup": 3, "warmup_time": 0.2,
    "max_time": 5.0, "timeout": 300.0, "isolate": True, "threads": 2,
}
ENV = {"cpu": {"model": "Test CPU"}, "torch": {"version": "2.13.0", "threads": 2},
       "git": {"short": "abc1234", "dirty": False}, "solvers": {"cpu": {"solver": "torch"}}}


def _direction(median, status="ok", message="", mem=1 << 20):
    if status != "ok":
        return {"status": status, "message": message}
    return {"status": "ok", "samples_ms": [median * 0.9, median, median * 1.2], "n": 3, "median_ms": median,
            "p20_ms": median * 0.95, "p80_ms": median * 1.1, "mean_ms": median * 1.03, "std_ms": median * 0.05,
            "peak_mem_bytes": mem, "first_call_ms": median * 3}


def _record(layer, k, dirs, status="ok", message="", params=1234, recon=1.5e-7):
    cell = {"layer": layer, "device": "cpu", "dtype": "float32", "batch": 8, "channels": 12, "height": 32,
            "width": 32, "kernel_size": k, "options": {}}
    return {"key": f"{layer}-{k}", "cell": cell, "directions": dirs, "status": status, "message": message,
            "params": params, "recon_error": recon, "threads": 2}


RECORDS = [
    _record("inverse-flow", 2, {"forward": _direction(6.5), "sampling": _direction(0.42),
                                "train": _direction(14.25)}, params=498),
    _record("inverse-flow", 3, {"forward": _direction(7.125), "sampling": _direction(0.5),
                                "train": _direction(16.0, "oom", "can't allocate memory")},
            status="oom", message="can't allocate memory", params=1218),
    _record("emerging", 2, {d: {"status": "unsupported", "message": "emerging: unsupported kernel_size=2"}
                            for d in ("forward", "sampling", "train")}, status="unsupported",
            message="emerging: unsupported kernel_size=2", params=None, recon=None),
    _record("emerging", 3, {"forward": _direction(0.9), "sampling": _direction(123.0, mem=3 << 30),
                            "train": _direction(2.5, "timeout", "cell exceeded --timeout 300 s")},
            status="timeout", message="cell exceeded --timeout 300 s", params=2000),
    _record("glow-1x1", None, {"forward": _direction(0.0512, mem=2048), "sampling": _direction(0.06),
                               "train": _direction(0.2, "error", "RuntimeError: boom")},
            status="error", message="RuntimeError: boom", params=144),
]


def test_markdown_golden():
    built = tables.build_tables(RECORDS, CONFIG["sweep"], ["median", "mean", "memory", "params", "recon_error"])
    check_golden("kernel_sweep.md", tables.to_markdown(built, tables.describe_run(CONFIG, ENV), "golden run"))


def test_latex_golden():
    built = tables.build_tables(RECORDS, CONFIG["sweep"], ["median", "params"])
    check_golden("kernel_sweep.tex", tables.to_latex(built, tables.describe_run(CONFIG, ENV)))


def test_csv_golden():
    check_golden("kernel_sweep.csv", tables.to_csv(RECORDS))


def test_csv_is_long_format_with_required_columns():
    df = long_frame(RECORDS)
    required = ["layer", "device", "dtype", "batch", "channels", "height", "width", "kernel_size", "direction",
                "status", "median_ms", "p20_ms", "p80_ms", "mean_ms", "std_ms", "peak_mem_bytes", "params",
                "recon_error"]
    assert list(df.columns)[: len(required)] == required and set(required) <= set(COLUMNS)
    assert len(df) == 3 * len(RECORDS)
    assert set(df.status) == {"ok", "oom", "unsupported", "timeout", "error"}


def test_no_kernel_layer_shown_once_per_column_with_note():
    table = tables.build_table(RECORDS, ["kernel_size"], "median", "forward")
    assert table.headers == ["layer", "2", "3"]
    row = next(r for r in table.rows if r[0].startswith("glow-1x1"))
    assert row[1] == row[2] == "0.051 [0.049–0.056]"
    assert any("does not apply" in n for n in table.notes)


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="accepted: median"):
        tables.build_table(RECORDS, ["kernel_size"], "speed", "forward")


@pytest.mark.parametrize(("value", "text"), [(0.01234, "0.012"), (1.234, "1.23"), (12.34, "12.3"), (1234.5, "1234")])
def test_time_format(value, text):
    assert tables.fmt_ms(value) == text


def test_bytes_format():
    assert tables.fmt_bytes(3 << 30) == "3.00 GiB"
    assert tables.fmt_bytes(1536) == "1.50 KiB"
    assert tables.fmt_bytes(None) == "–"

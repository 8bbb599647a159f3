"""Merging a run's records from results.jsonl and per-task shards (bench/execution/shards.py)."""

from __future__ import annotations

import json
import random
import warnings

import pytest

from bench.execution import runs, shards


def rec(key: str, status: str = "ok", finished: str | None = None, **extra) -> dict:
    r = {"key": key, "cell": {"layer": key}, "directions": {}, "status": status, **extra}
    if finished is not None:
        r["where"] = {"finished_utc": finished}
    return r


def write(path, records, torn: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + (torn or ""))


def test_newest_record_wins_across_files_and_conflicts_are_reported(tmp_path):
    write(tmp_path / "results.jsonl", [rec("a", finished="2026-01-01T10:00:00"), rec("b")])
    write(tmp_path / "shards" / "7_0.jsonl", [rec("a", "timeout", finished="2026-01-01T12:00:00"),
                                              rec("c", finished="2026-01-01T11:00:00")])
    write(tmp_path / "shards" / "7_1.jsonl", [rec("a", finished="2026-01-01T11:00:00")])
    conflicts: list = []
    out = shards.read_records(tmp_path, conflicts)
    by_key = {r["key"]: r for r in out}
    assert [r["key"] for r in out] == ["a", "b", "c"]  # first appearance, in merge order
    assert by_key["a"]["status"] == "timeout"  # the newest, from 7_0, whatever the file order
    assert "_line" not in by_key["a"]
    assert len(conflicts) == 1 and conflicts[0].key == "a"
    assert conflicts[0].kept == "shards/7_0.jsonl:1"
    assert sorted(conflicts[0].dropped) == ["results.jsonl:1 (ok)", "shards/7_1.jsonl:1 (ok)"]
    # runs.load_records, which table, plot, compare, export and --resume use, reads the same
    with pytest.warns(UserWarning, match="cell a has 3 records"):
        assert runs.load_records(tmp_path) == out


def test_merge_is_deterministic_whatever_the_order_files_are_read(tmp_path):
    files = [(f"shards/{i}.jsonl", [rec(k, finished=f"2026-01-01T1{(i * 7 + j) % 10}:00:00")
                                    for j, k in enumerate("abcde")]) for i in range(5)]
    expected = shards.merge(files)[0]
    for seed in range(5):  # merge() takes sources in the order given; read_records sorts them
        shuffled = files[:]
        random.Random(seed).shuffle(shuffled)
        write_dir = tmp_path / f"s{seed}"
        for name, records in shuffled:
            write(write_dir / name, records)
        assert shards.read_records(write_dir, conflicts=[]) == expected


def test_lost_placeholders_never_conflict_and_resume_skips_only_finished_cells(tmp_path):
    lost = shards.lost_record({"layer": "x"}, "x", ["forward"], "SLURM task 3_0 killed by its time limit")
    write(tmp_path / "results.jsonl", [{**lost, "where": {"finished_utc": "2026-01-01T10:00:00"}}, rec("y")])
    write(tmp_path / "shards" / "4_0.jsonl", [rec("x", finished="2026-01-01T11:00:00")])
    conflicts: list = []
    out = shards.read_records(tmp_path, conflicts)
    assert conflicts == []
    assert {r["key"]: r["status"] for r in out} == {"x": "ok", "y": "ok"}
    assert shards.finished_keys([lost, rec("y")]) == {"y"}


def test_torn_lines_and_non_records_are_skipped_and_appending_starts_a_fresh_line(tmp_path):
    path = tmp_path / "shards" / "1_0.jsonl"
    write(path, [rec("a")], torn='{"key": "b", "sta')
    (tmp_path / "results.jsonl").write_text('[1, 2]\n{"no_key": 1}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [r["key"] for r in shards.read_records(tmp_path)] == ["a"]
    assert len(caught) == 3  # the torn line and the two lines that are not records
    shards.append(path, rec("c"))  # a killed writer left no newline: the next record is not glued on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [r["key"] for r in shards.read_records(tmp_path)] == ["a", "c"]


def test_where_names_host_gpu_and_slurm_ids(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    w = shards.where("slurm", "cpu")
    assert w["executor"] == "slurm" and w["host"]
    assert (w["slurm_job_id"], w["slurm_array_job_id"], w["slurm_array_task_id"]) == ("41", "40", "1")
    assert w["gpu_index"] == 3 and w["cuda_visible_devices"] == "3"
    assert w["finished_utc"].endswith("+00:00")

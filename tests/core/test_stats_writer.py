"""The stats file's writer: atomic rewrites, and no error when its directory goes away."""

import json
import shutil

import pytest

from daop_vllm.core.stats_file import StatsFile


def test_rewrites_the_report_and_stops_quietly_once_its_directory_is_removed(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    calls = []

    def report():
        calls.append(1)
        return {"calls": len(calls)}

    stats = StatsFile(directory / "stats.json", report, interval_s=0.01)
    assert json.loads((directory / "stats.json").read_text())["calls"] == 1
    shutil.rmtree(directory)  # what the front end's exit does to the temporary directory
    stats._thread.join(timeout=5)
    assert not stats._thread.is_alive(), "the timer thread stops when the directory is gone"
    stats.close()  # the last write: nothing to write to, and no error
    assert not directory.exists()


def test_a_missing_directory_at_start_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        StatsFile(tmp_path / "absent" / "stats.json", dict, interval_s=60)


def test_only_the_closing_write_is_final(tmp_path):
    counter = iter(range(1000))
    stats = StatsFile(tmp_path / "stats.json", lambda: {"n": next(counter)}, interval_s=0.01)
    first = json.loads((tmp_path / "stats.json").read_text())
    assert first["final"] is False and first["n"] == 0
    stats.close()
    last = json.loads((tmp_path / "stats.json").read_text())
    assert last["final"] is True and last["n"] >= 1
    stats.close()  # idempotent: no second final write
    assert json.loads((tmp_path / "stats.json").read_text())["n"] == last["n"]

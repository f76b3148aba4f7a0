"""`driveloop drive` as a user runs it: JSON summary, segments on disk, and one-line errors on bad input."""

from __future__ import annotations

import json

import pytest

from driveloop.cli import main


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_drive_json_summary_and_segments(home, capsys) -> None:
    code, out, _ = _run(capsys, "drive", "--scenario", "highway", "--vehicles", "2", "--duration", "4",
                        "--seed", "5", "--no-upload", "--json")
    assert code == 0
    summary = json.loads(out)
    for key in ("ticks", "distance_km", "collisions", "interventions", "interventions_per_hour",
                "tick_ms_p50", "tick_ms_p99", "segments"):
        assert key in summary
    assert summary["ticks"] == 80 and summary["segments"] == 2
    assert len(list((home / "spool" / "closed").glob("*.mcap"))) == 2


def test_same_seed_same_result(home, capsys) -> None:
    # The inference deadline is wall-clock (as on a vehicle): a host stall can make a real, reported
    # deadline miss. Determinism is claimed for runs without one, so retry until two such runs exist.
    args = ("drive", "--scenario", "dense", "--vehicles", "2", "--duration", "3", "--seed", "9", "--no-record",
            "--json")
    clean = []
    for _ in range(6):
        s = json.loads(_run(capsys, *args)[1])
        if s["deadline_misses"] == 0:
            clean.append({k: v for k, v in s.items() if "_ms_" not in k})
        if len(clean) == 2:
            break
    assert len(clean) == 2, "the host missed the inference deadline in too many runs"
    assert clean[0] == clean[1]
    other = json.loads(_run(capsys, *args[:-3], "10", "--no-record", "--json")[1])
    assert other["distance_km"] != clean[0]["distance_km"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("drive", "--scenario", "moon-landing"), 2, "unknown scenario"),
        (("drive", "--scenario", "ccrs-131"), 2, "ego speed 131 km/h is outside 5..130 km/h"),
        (("drive", "--bogus-flag"), 2, "No such option"),
        (("drive", "--vehicles", "0"), 2, "Invalid value"),
        (("drive", "--fault", "meteor"), 2, "unknown fault"),
        (("drive", "--video", "out.avi"), 2, "--video must end in"),
        (("drive", "--model", "99"), 4, "99"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(home, capsys, args, code, message) -> None:
    rc, out, err = _run(capsys, *args)
    assert rc == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not (home / "spool").exists()


def test_tampered_model_is_refused(home, capsys) -> None:
    blob = next((home / "registry" / "blobs").glob("*.onnx"))
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    rc, _, err = _run(capsys, "drive", "--duration", "1")
    assert rc == 4 and "sha256" in err and len(err.strip().splitlines()) == 1
    assert not (home / "spool").exists()


def test_video_is_written(home, capsys, tmp_path) -> None:
    video = tmp_path / "drive.gif"
    rc, _, _ = _run(capsys, "drive", "--duration", "1", "--no-record", "--video", str(video), "--json")
    assert rc == 0 and video.stat().st_size > 1000


def test_missing_registry_says_bootstrap(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "empty"))
    rc, _, err = _run(capsys, "drive", "--duration", "1")
    assert rc == 4 and "driveloop bootstrap" in err


def test_every_command_has_help(capsys) -> None:
    from driveloop.cli import _register, app
    import typer

    _register()
    group = typer.main.get_command(app)
    names = []

    def walk(cmd, path):
        names.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    walk(group, ())
    assert ("drive",) in names and ("bootstrap",) in names
    for path in names:
        assert main([*path, "--help"]) == 0
    capsys.readouterr()

"""`trainctl sessions plot` (terminal and image) and `trainctl sessions compare` on synthetic sessions."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.conftest import clean_env
from trainctl.config import load
from trainctl.session import SessionStore

A = "20250101-000000-aaaaaa"
B = "20250101-000100-bbbbbb"
EMPTY = "20250101-000200-cccccc"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def sessions(project: Path) -> Path:
    """Two finished runs that differ in lr, one flag and the commit; one run with no metrics yet."""
    store = SessionStore(load(project).state_dir)
    a = store.create(session_id=A, status="completed", name="baseline", script="train.py",
                     args=["--lr", "0.1", "--epochs", "10"], torch="2.4.0",
                     config={"lr": 0.1, "model": {"depth": 4, "width": 128}},
                     git={"commit": "1111111", "dirty": False})
    b = store.create(session_id=B, status="completed", script="train.py",
                     args=["--lr=0.01", "--epochs", "10", "--amp"], torch="2.4.0",
                     config={"lr": 0.01, "model": {"depth": 4, "width": 128}},
                     git={"commit": "2222222", "dirty": False})
    store.create(session_id=EMPTY, status="running", script="train.py")
    a.append_events([{"kind": "metric", "step": 10 * i, "values": {"loss": 2.0 - i / 50, "acc": i / 100},
                      "attempt": 0} for i in range(100)])
    b.append_events([{"kind": "metric", "step": 10 * i, "values": {"loss": 1.5 - i / 50}, "attempt": 0}
                     for i in range(50)])
    b.append_events([{"kind": "metric", "step": 500, "values": {"loss": math.nan}, "attempt": 0}])
    return project


def snapshot(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_terminal_plot_shape(sessions: Path, cli) -> None:
    result = cli("sessions", "plot", "aaaa", "bbbb", "--width", "40", "--height", "10",
                 env=clean_env(COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.rstrip("\n").split("\n")
    # title, 10 rows, x axis, x labels, one legend line per session
    assert len(lines) == 1 + 10 + 1 + 1 + 2
    assert lines[0] == "loss"
    rows = lines[1:11]
    gutter = rows[0].index("┤")
    assert all(len(line) <= gutter + 1 + 40 for line in lines)
    assert all(row[gutter] in "┤│" for row in rows)
    assert lines[11] == " " * gutter + "└" + "─" * 40
    assert float(rows[0][:gutter]) == pytest.approx(2.0)  # the top label is the largest loss
    assert lines[12].split() == ["0", "step", "990"]
    assert "●" in "".join(rows) and "▲" in "".join(rows)
    assert lines[13].split()[:2] == ["●", "baseline-aaaaaa"]
    assert lines[14].split()[:2] == ["▲", "train-bbbbbb"]
    # the first point of the first session is in the top-left corner
    assert rows[0][gutter + 1] == "●"
    assert "1 point(s) of 'loss' with NaN/Inf not drawn" in result.stderr


def test_terminal_plot_fits_the_terminal_by_default(sessions: Path, cli) -> None:
    result = cli("sessions", "plot", "baseline", "--metric", "acc", env=clean_env(COLUMNS="50"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.rstrip("\n").split("\n")
    assert lines[0] == "acc"
    assert max(len(line) for line in lines) <= 50
    assert len(lines) == 1 + 15 + 1 + 1 + 1


def test_png_written(sessions: Path, cli) -> None:
    out = sessions / "plots" / "loss.png"
    out.parent.mkdir()
    result = cli("sessions", "plot", "aaaa", "latest", "bbbb", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temp file left
    # the session without metrics is named and left out, not an error when others have some
    assert f"session {EMPTY} has no metrics yet" in result.stderr

    svg = sessions / "loss.svg"
    result = cli("sessions", "plot", "aaaa", "--out", str(svg), "--width", "400", "--height", "300")
    assert result.returncode == 0, result.stderr
    assert svg.read_text().lstrip().startswith("<?xml")


def test_compare_text(sessions: Path, cli) -> None:
    result = cli("sessions", "compare", "baseline", "bbbb")
    assert result.returncode == 0, result.stderr
    cells = [re.split(r"\s{2,}", line.strip()) for line in result.stdout.splitlines()]
    rows = {row[0]: row[1:] for row in cells if len(row) > 1}
    assert cells[0] == ["baseline-aaaaaa", "train-bbbbbb"]
    assert rows["status"] == ["completed", "completed"]
    assert rows["config.lr"] == ["0.1", "0.01"]
    assert rows["args.--lr"] == ["0.1", "0.01"]
    assert rows["args.--amp"] == ["—", "True"]
    assert rows["git.commit"] == ["1111111", "2222222"]
    assert rows["loss final"] == ["0.02", "nan"]
    assert rows["loss best (min)"] == ["0.02 @990", "0.52 @490"]
    assert rows["acc final"] == ["0.99", "—"]
    for same in ("config.model.depth", "config.model.width", "args.--epochs", "script", "torch"):
        assert same not in result.stdout


def test_compare_json(sessions: Path, cli) -> None:
    result = cli("sessions", "compare", "aaaa", "bbbb", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["id"] for s in report["sessions"]] == [A, B]
    assert report["differences"] == {
        "config.lr": [0.1, 0.01],
        "args.--lr": ["0.1", "0.01"],
        "args.--amp": [None, True],
        "git.commit": ["1111111", "2222222"],
    }
    assert report["metrics"]["loss"] == {"mode": "min", "final": [pytest.approx(0.02), "nan"],
                                         "best": [pytest.approx(0.02), pytest.approx(0.52)],
                                         "best_step": [990, 490]}
    assert report["metrics"]["acc"]["final"] == [0.99, None]


@pytest.mark.parametrize(("args", "env", "code", "fragment"), [
    (["plot", "nope"], {}, 3, "No session 'nope'"),
    (["plot", "aaaa", "nope"], {}, 3, "No session 'nope'"),
    (["plot", EMPTY], {}, 3, f"session {EMPTY} has no metrics yet"),
    (["plot", "aaaa", "--metric", "bleu"], {}, 3, "no metric 'bleu'"),
    (["plot", "aaaa", "--out", "missing/dir/plot.png"], {}, 2, "does not exist"),
    (["plot", "aaaa", "--out", "plot.gif"], {}, 2, "unknown image type '.gif'"),
    (["plot", "aaaa", "--out", "."], {}, 2, "is a folder"),
    (["plot", "aaaa"], {"COLUMNS": "20"}, 2, "the terminal is 20 columns wide"),
    (["plot", "aaaa", "--width", "200"], {"COLUMNS": "80"}, 2, "--width 200 does not fit"),
    (["plot", "aaaa", "--height", "2"], {}, 2, "--height 2 is too small"),
    (["plot", "aaaa", "--out", "plot.png"], {"PYTHONPATH": "NO_MPL"}, 2, "matplotlib is not installed"),
    (["compare", "aaaa"], {}, 2, "at least two different sessions"),
    (["compare", "aaaa", "baseline"], {}, 2, "at least two different sessions"),
    (["compare", "aaaa", "nope"], {}, 3, "No session 'nope'"),
])
def test_bad_input(sessions: Path, cli, tmp_path_factory, args, env, code, fragment) -> None:
    env = dict(env)
    if env.get("PYTHONPATH") == "NO_MPL":
        # an environment without the optional extra: a matplotlib that cannot be imported
        shadow = tmp_path_factory.mktemp("no_mpl")
        (shadow / "matplotlib").mkdir()
        (shadow / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib')\n")
        env["PYTHONPATH"] = str(shadow) + ":" + clean_env()["PYTHONPATH"]
    before = snapshot(sessions)
    result = cli("sessions", *args, env=clean_env(**env))
    assert result.returncode == code, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(sessions) == before


def test_unknown_metric_lists_the_recorded_ones(sessions: Path, cli) -> None:
    result = cli("sessions", "plot", "aaaa", "bbbb", "--metric", "bleu")
    assert result.returncode == 3
    assert "hint: Metrics recorded: loss, acc." in result.stderr
    # a metric only one of the sessions has: drawn for it, the other is named and left out
    result = cli("sessions", "plot", "aaaa", "bbbb", "--metric", "acc", env=clean_env(COLUMNS="120"))
    assert result.returncode == 0, result.stderr
    assert f"session {B} has no 'acc' (it has: loss); left out." in result.stderr
    assert "baseline-aaaaaa" in result.stdout and "train-bbbbbb" not in result.stdout


def test_huge_numbers_and_strings_are_drawn_or_skipped(project: Path, cli) -> None:
    store = SessionStore(load(project).state_dir)
    odd = store.create(session_id=A, status="completed", script="train.py")
    odd.append_events([{"kind": "metric", "step": 0, "values": {"loss": 1e308}},
                       {"kind": "metric", "step": 1, "values": {"loss": -1e308}},
                       {"kind": "metric", "step": 2, "values": {"loss": 10**400}},
                       {"kind": "metric", "step": 3, "values": {"loss": "n/a"}},
                       {"kind": "metric", "step": 4, "values": {"loss": 3}}])
    result = cli("sessions", "plot", "latest", "--width", "30", "--height", "5", env=clean_env(COLUMNS="80"))
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()[1:6]
    gutter = rows[0].index("┤")
    assert rows[0][gutter + 1] == "●"  # step 0 at the top: 1e308
    assert rows[4][gutter + 1 + round(29 / 4)] == "●"  # step 1 at the bottom: -1e308
    assert rows[2].endswith("●")  # step 4: 3, in the middle, at the right end
    assert "1 point(s) of 'loss' with NaN/Inf" in result.stderr  # the integer beyond float range
    result = cli("sessions", "plot", "latest", "--out", str(project / "odd.png"))
    assert result.returncode == 0, result.stderr
    assert (project / "odd.png").read_bytes().startswith(PNG_MAGIC)

"""Every line of the output corpus (real output of the frameworks people train with) parses as
recorded beside it; see tests/fixtures/output_corpus/README.md for the format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trainctl.metrics import MetricParser

CORPUS = Path(__file__).parent / "fixtures" / "output_corpus"
FILES = sorted(CORPUS.glob("*.txt"))
POSITIONS = ("step", "epoch", "total_steps", "total_epochs")


def _number(value: object) -> object:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def load(path: Path) -> list[tuple[int, str, dict | None]]:
    """(line number, output line, expected parse) of one corpus file."""
    cases: list[tuple[int, str, dict | None]] = []
    pending: tuple[int, str] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if raw.startswith("=> "):
            assert pending is not None, f"{path.name}:{number}: an expectation without a line above it"
            expected = json.loads(raw[3:])
            if expected is not None:
                expected["values"] = {k: _number(v) for k, v in expected["values"].items()}
            cases.append((*pending, expected))
            pending = None
        elif raw.startswith("#"):
            continue
        else:
            assert pending is None, f"{path.name}:{pending[0]}: output line without an expectation"
            pending = (number, raw.replace("<CR>", "\r"))
    assert pending is None, f"{path.name}:{pending[0]}: output line without an expectation"
    return cases


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b if not isinstance(b, float) else a == pytest.approx(b)


def test_corpus_covers_the_frameworks() -> None:
    names = {p.stem for p in FILES}
    assert {"transformers", "lightning", "nanogpt", "timm", "fairseq", "keras", "plain"} <= names
    assert sum(len(load(p)) for p in FILES) >= 40


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_corpus_file_parses_as_recorded(path: Path) -> None:
    parser = MetricParser()
    wrong = []
    for number, line, expected in load(path):
        got = parser.feed(line)
        if expected is None:
            if got is not None:
                wrong.append(f"{path.name}:{number}: expected no metric, got {got}")
            continue
        if got is None:
            wrong.append(f"{path.name}:{number}: expected {expected}, got nothing")
            continue
        for key in POSITIONS:
            if got.get(key) != expected.get(key):
                wrong.append(f"{path.name}:{number}: {key} {got.get(key)!r} != {expected.get(key)!r}")
        values, want = got["values"], expected["values"]
        if set(values) != set(want) or not all(_same(values[k], want[k]) for k in want):
            wrong.append(f"{path.name}:{number}: values {values} != {want}")
    assert not wrong, "\n".join(wrong)


def test_transformers5_lines_are_recorded_by_a_real_launch(project: Path, cli) -> None:
    lines = [line for path in FILES if path.stem == "transformers"
             for _, line, expected in load(path) if expected and expected["values"]]
    script = project / "hf_like.py"
    # the pause first: this test is about the parse, not about output printed before the
    # launcher has attached its parser
    script.write_text("import time\ntime.sleep(1)\n" + "".join(f"print({line!r})\n" for line in lines)
                      + "time.sleep(1.5)\n")
    proc = cli("local", "--quiet", "--no-preflight", str(script))
    assert proc.returncode == 0, proc.stderr
    show = json.loads(cli("sessions", "show", "latest", "--json").stdout)
    last = show["summary"]["last"]
    assert last["loss"] == pytest.approx(0.25) and last["eval_loss"] == pytest.approx(3.912)
    assert last["train_loss"] == pytest.approx(4.021)

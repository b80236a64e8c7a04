"""Numbers in trainctl.toml that would switch a safety off are errors with file and line
(issue 13 #8): NaN, infinity, negative values, and counts below their least useful value."""

from __future__ import annotations

import pytest

from trainctl.errors import EXIT_USAGE

from .conftest import run_cli

BAD_VALUES = [
    # (section, key, TOML value, message fragment)
    ("restart", "grace_period_s", "nan", "finite"),
    ("restart", "grace_period_s", "inf", "finite"),
    ("restart", "grace_period_s", "-1.0", "negative"),
    ("restart", "restart_delay_s", "nan", "finite"),
    ("restart", "restart_delay_s", "-0.5", "negative"),
    ("restart", "max_restarts", "-1", "negative"),
    ("", "min_free_gb", "nan", "finite"),
    ("", "min_free_gb", "-inf", "finite"),
    ("", "min_free_gb", "-2", "negative"),
    ("", "gpus", "-1", "negative"),
    ("retention", "keep_last_n", "-1", "negative"),
    ("retention", "keep_best_k", "-3", "negative"),
    ("retention", "max_total_size", '"-1G"', "not a size"),
    ("retention", "max_total_size", '"nanG"', "not a size"),
    ("retention", "max_total_size", '"inf"', "not a size"),
    ("monitor", "stall_minutes", "nan", "finite"),
    ("monitor", "stall_minutes", "+inf", "finite"),
    ("monitor", "checkpoint_overdue_minutes", "inf", "finite"),
    ("monitor", "checkpoint_overdue_minutes", "-5", "negative"),
    ("monitor", "window", "0", "at least 1"),
    ("monitor", "window", "-3", "negative"),
    ("restart", "grace_period_s", "1e400", "finite"),  # TOML reads it as infinity
]


def toml_with(section: str, key: str, value: str) -> tuple[str, int]:
    """A config with the bad value on a known line (after a comment and another key)."""
    lines = ["# project settings", 'checkpoint_dir = "checkpoints"']
    if section:
        lines += ["", f"[{section}]"]
    lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n", len(lines)


@pytest.mark.parametrize(("section", "key", "value", "fragment"), BAD_VALUES,
                         ids=[f"{s or 'top'}.{k}={v}" for s, k, v, _ in BAD_VALUES])
def test_a_number_that_makes_no_sense_is_an_error_with_file_and_line(project, section, key, value, fragment):
    text, line = toml_with(section, key, value)
    config = project / "trainctl.toml"
    config.write_text(text)
    r = run_cli(["checkpoint", "list"], project)
    assert r.returncode == EXIT_USAGE, (r.stdout, r.stderr)
    errors = [e for e in r.stderr.splitlines() if e.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert f"{config}:{line}:" in errors[0] and key in errors[0] and fragment in errors[0], errors[0]
    assert "Traceback" not in r.stderr
    assert config.read_text() == text


GOOD_VALUES = [
    ("restart", "grace_period_s", "0"),
    ("restart", "restart_delay_s", "0.0"),
    ("", "min_free_gb", "0.5"),
    ("monitor", "window", "1"),
    ("retention", "max_total_size", '"1.5G"'),
]


@pytest.mark.parametrize(("section", "key", "value"), GOOD_VALUES,
                         ids=[f"{s or 'top'}.{k}={v}" for s, k, v in GOOD_VALUES])
def test_sensible_edge_values_are_accepted(project, section, key, value):
    (project / "trainctl.toml").write_text(toml_with(section, key, value)[0])
    r = run_cli(["checkpoint", "list"], project)
    assert r.returncode == 0, r.stderr

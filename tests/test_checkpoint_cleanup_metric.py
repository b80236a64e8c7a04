"""keep-best with a metric no checkpoint records is an error, not a rule that protects nothing
(issue 12 #6). The check lives in the pure planner, so config-driven retention gets it too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainctl import checkpoint as ckpt
from trainctl.errors import EXIT_USAGE, UsageError


def save(path: Path, step: int, metrics: dict[str, float], session_id: str = "s1") -> None:
    ckpt.save(path, {"w": torch.full((8,), float(step))},
              {"session_id": session_id, "script": "train.py", "step": step, "metrics": metrics})


def series(folder: Path, session_id: str = "s1", metrics=("loss", "val_loss")) -> list[Path]:
    paths = []
    for step, value in enumerate([0.9, 0.2, 0.5, 0.4]):
        path = folder / f"ckpt-step{step:08d}.pt"
        save(path, step, {m: value + i for i, m in enumerate(metrics)}, session_id)
        paths.append(path)
    return paths


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


PLANNER = [
    # (metric, keep_best_k, error fragments or None)
    ("vall_loss", 1, ["'vall_loss'", "loss, val_loss", "Did you mean 'val_loss'"]),
    ("accuracy", 2, ["'accuracy'", "loss, val_loss"]),
    ("val_loss", 1, None),
    ("vall_loss", 0, None),  # keep-best not asked for: the metric only breaks ties, nothing to check
]


@pytest.mark.parametrize(("metric", "keep_best_k", "fragments"), PLANNER,
                         ids=[f"{m}-k{k}" for m, k, _ in PLANNER])
def test_the_planner_refuses_keep_best_by_a_metric_no_checkpoint_records(tmp_path, metric, keep_best_k, fragments):
    series(tmp_path)
    infos = ckpt.scan(tmp_path)
    if fragments is None:
        ckpt.plan_retention(infos, keep_last_n=1, keep_best_k=keep_best_k, metric=metric)
        return
    with pytest.raises(UsageError) as e:
        ckpt.plan_retention(infos, keep_last_n=1, keep_best_k=keep_best_k, metric=metric)
    text = f"{e.value.message} {e.value.hint}"
    for fragment in fragments:
        assert fragment in text, text


def test_nothing_to_plan_is_not_an_error():
    assert ckpt.plan_retention([], keep_best_k=1, metric="anything") == []


CLI = [
    # (args, config, exit code, fragment)
    (["--keep-best", "1", "--metric", "vall_loss", "--yes"], "", EXIT_USAGE, "did you mean 'val_loss'"),
    (["--keep-best", "1", "--metric", "accuracy", "--yes"], "", EXIT_USAGE, "they record: loss, val_loss"),
    (["--keep-best", "1", "--metric", "vall_loss", "--dry-run"], "", EXIT_USAGE, "did you mean 'val_loss'"),
    (["--yes"], '[retention]\nkeep_best_k = 1\nmetric = "vall_loss"\n', EXIT_USAGE, "did you mean 'val_loss'"),
]


@pytest.mark.parametrize(("args", "config", "code", "fragment"), CLI, ids=["misspelled", "absent", "dry-run", "config"])
def test_cleanup_with_an_unknown_metric_exits_2_and_deletes_nothing(cli, project, args, config, code, fragment):
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n' + config)
    folder = project / "checkpoints" / "s1"
    series(folder)
    before = snapshot(project)
    r = cli("checkpoint", "cleanup", *args)
    assert r.returncode == code, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0].lower(), r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(project) == before


def test_cleanup_with_a_known_metric_keeps_the_best(cli, project):
    folder = project / "checkpoints" / "s1"
    paths = series(folder)
    r = cli("checkpoint", "cleanup", "--keep-best", "1", "--metric", "val_loss", "--yes")
    assert r.returncode == 0, r.stderr
    # step 1 has the best val_loss, step 3 is the newest
    assert sorted(p.name for p in folder.glob("*.pt")) == [paths[1].name, paths[3].name]


def test_a_folder_without_the_metric_is_left_alone_while_others_are_cleaned(cli, project):
    with_metric = series(project / "checkpoints" / "s1")
    without = series(project / "checkpoints" / "s2", session_id="s2", metrics=("loss",))
    r = cli("checkpoint", "cleanup", "--keep-best", "1", "--metric", "val_loss", "--yes")
    assert r.returncode == 0, r.stderr
    assert "s2" in r.stderr and "val_loss" in r.stderr
    assert sorted(p.name for p in (project / "checkpoints" / "s1").glob("*.pt")) == [with_metric[1].name, with_metric[3].name]
    assert all(p.exists() for p in without)

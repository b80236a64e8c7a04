"""B6: `trainctl --help`, and `trainctl sessions list` over 500 sessions, as whole processes.

Baseline: `python -c "import click"`, the floor any click command line pays (interpreter start
plus click). The 500 sessions are copies of a real one (SessionStore.create + the fields a
finished run records), with mixed statuses; 10 say "running" with a pid that is gone, so the
list checks liveness as it would after a crash. stdout goes to /dev/null (not a terminal).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _common import (
    clean_env,
    emit,
    interleaved,
    parse_args,
    pick,
    project_dir,
    row,
    stats,
    time_process,
    trainctl_command,
    warm_bytecode,
)


def make_sessions(state_dir: Path, count: int) -> None:
    """`count` session folders shaped like those a run leaves behind."""
    from trainctl.session import SessionStore, new_session_id

    store = SessionStore(state_dir)
    template = store.create(status="running", name="template", backend="local",
                            script="/project/train.py", args=["--epochs", "10", "--lr", "0.001"],
                            command=["trainctl", "local", "train.py", "--epochs", "10"],
                            cwd="/project", started_at=time.time(),
                            attempts=[{"attempt": 0, "started_at": time.time(), "status": "completed"}],
                            processes=[{"pid": 999999, "start_ticks": 1, "role": "launcher"}])
    data = template.read()
    shutil_rmtree(template.dir)
    now = time.time()
    for i in range(count):
        session_id = new_session_id(now - 3600 * i) + f"{i:04x}"[-2:]
        folder = store.sessions_dir / session_id
        (folder / "tensorboard").mkdir(parents=True)
        status = "running" if i % 50 == 0 else ("failed" if i % 7 == 0 else "completed")
        record = {**data, "id": session_id, "name": f"run-{i}", "status": status,
                  "created_at": now - 3600 * i, "started_at": now - 3600 * i,
                  "ended_at": None if status == "running" else now - 3600 * i + 1800,
                  "exit_code": None if status == "running" else (1 if status == "failed" else 0),
                  "summary": {"last": {"loss": 0.5 / (i + 1), "accuracy": 0.9},
                              "best": {"loss": {"value": 0.4 / (i + 1), "step": 900, "mode": "min"}},
                              "checkpoints": 5, "last_checkpoint": f"/project/checkpoints/{session_id}/ckpt.pt"}}
        (folder / "session.json").write_text(json.dumps(record, indent=2))
        (folder / "events.jsonl").write_text(
            json.dumps({"v": 1, "t": now, "kind": "status", "status": "running"}) + "\n")


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def main() -> None:
    args = parse_args(__doc__)
    warm_bytecode()
    count = pick(args.mode, 500, 500, 20)
    repeats = pick(args.mode, 15, 4, 1)
    with project_dir(config='state_dir = ".trainctl"\n') as root:
        make_sessions(Path(root) / ".trainctl", count)
        env = clean_env()
        cli = trainctl_command()
        def click_floor():
            return time_process([sys.executable, "-c", "import click"], cwd=root, env=env)
        def help_():
            return time_process([*cli, "--help"], cwd=root, env=env)
        def listing():
            return time_process([*cli, "sessions", "list"], cwd=root, env=env)
        base, t_help, t_list = interleaved(repeats, click_floor, help_, listing)
    b, h, s = stats(base), stats(t_help), stats(t_list)
    rows = [
        row("B6 trainctl --help vs python -c 'import click'", h["median"], b["median"], unit="s",
            goal="<= 1.5x", passed=h["median"] <= 1.5 * b["median"],
            baseline_name="python -c 'import click'", trainctl_stats=h, baseline_stats=b),
        row(f"B6 trainctl sessions list ({count} sessions) vs import click", s["median"], b["median"],
            unit="s", goal="<= 2.5x", passed=s["median"] <= 2.5 * b["median"],
            baseline_name="python -c 'import click'", trainctl_stats=s, baseline_stats=b),
    ]
    emit("B6", "CLI start-up and listing", args.mode, rows,
         params={"sessions": count, "repeats": repeats, "command": " ".join(cli)})


if __name__ == "__main__":
    main()

"""The checkpoint signal: a checkpoint now, and the training goes on (a cloud rebalance
recommendation means "checkpoint now", not "stop")."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

from trainctl.session import SessionStore

from .conftest import clean_env
from .servers import wait_for

SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    import trainctl

    model = torch.nn.Linear(2, 1)
    run = trainctl.init()
    run.track(model=model)
    print("ready", flush=True)
    for step in range(1, 100000):
        run.log({"loss": 1.0 / step}, step=step)
        time.sleep(0.01)
        if open(sys.argv[1]).read().strip() == "stop":
            break
    run.finish()
""")


def test_checkpoint_signal_writes_a_checkpoint_and_training_goes_on(project):
    (project / "train.py").write_text(SCRIPT)
    flag = project / "flag"
    flag.write_text("")
    proc = subprocess.Popen([sys.executable, "train.py", str(flag)], cwd=project, env=clean_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        store = SessionStore(project / ".trainctl")
        session = store.get(store.ids()[0])
        assert session.read()["runtime"]["checkpoint_signals"] == ["SIGUSR2"]
        proc.send_signal(signal.SIGUSR2)
        found = wait_for(lambda: list(session.iter_events(("checkpoint",))))
        assert "requested" in found[0]["path"]
        steps_at_checkpoint = found[0]["step"]
        # still training: more steps arrive after the checkpoint
        wait_for(lambda: max((e["step"] for e in session.metrics()), default=0) > steps_at_checkpoint + 5)
        assert proc.poll() is None
        flag.write_text("stop")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(session.json_path.read_text())["status"] == "completed"
    assert len(list(session.iter_events(("checkpoint",)))) == 1

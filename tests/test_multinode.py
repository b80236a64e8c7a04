"""Several machines, played by two `trainctl local --nnodes 2` processes on this one (gloo over
loopback): they train together through torchrun's c10d rendezvous as one session, whichever of
them c10d makes global rank 0, after a network check in which they all-reduce; a node killed
mid-run restarts the whole job from the newest checkpoint; a node whose peers never come fails
that check before its script runs; SLURM's variables are read; bad input is one error line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainctl.backends.torchrun import NodeSpec, network_env, torchrun_args
from trainctl.errors import UsageError
from trainctl.launcher import multinode
from trainctl.launcher.diagnose import diagnose
from trainctl.session import Session

from .conftest import REPO, clean_env, run_cli

SCRIPT = str(REPO / "tests" / "scripts" / "ddp_train.py")
FIXTURES = REPO / "tests" / "fixtures" / "diagnose"
STEPS = 6
TRAIN = [SCRIPT, "--steps", str(STEPS), "--checkpoint-every", "2"]
NODE_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PASSED = "pre-flight: 2 nodes x 1 process all-reduced over gloo in "


def net_checks(session: Session) -> list[dict]:
    return list(session.iter_events(("net_check",)))


def make_project(folder: Path, checkpoint_dir: Path | str = "checkpoints") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainctl.toml").write_text(f'checkpoint_dir = "{checkpoint_dir}"\n')
    return folder


def start_node(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", *args], cwd=project,
                            env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen[str]) -> list[tuple[int, str]]:
    """Every node's exit code and stderr; on a hang, every node is killed before failing."""
    results = []
    try:
        for proc in procs:
            _out, err = proc.communicate(timeout=NODE_TIMEOUT_S)
            results.append((proc.returncode, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def two_nodes(projects: tuple[Path, Path], port: int, rdzv_id: str, *extra: str,
              train: list[str] = TRAIN) -> list[subprocess.Popen[str]]:
    return [start_node(project, "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}",
                       "--rdzv-id", rdzv_id, "--nproc-per-node", "1", *extra, *train)
            for rank, project in enumerate(projects)]


def only_session(project: Path) -> Session:
    (folder,) = (project / ".trainctl" / "sessions").iterdir()
    return Session(folder)


def weights(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit


def final_checkpoint(checkpoints: Path, session_id: str) -> Path:
    return checkpoints / session_id / f"ckpt-step{STEPS:08d}.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The same training as one machine with two processes (--nproc-per-node 2)."""
    project = make_project(tmp_path_factory.mktemp("one-machine"))
    r = run_cli(["local", "--no-preflight", "--nproc-per-node", "2", *TRAIN], project, timeout=NODE_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    return weights(final_checkpoint(project / "checkpoints", only_session(project).id))


def slurm_env(node_id: int, port: int) -> dict[str, str]:
    """What srun gives each task of a two-node job (no SLURM needed): the head is the first host."""
    return clean_env(SLURM_NNODES="2", SLURM_NODEID=str(node_id), SLURM_JOB_ID="4242",
                     SLURM_JOB_NODELIST="127.0.0.[1-2]", MASTER_PORT=str(port))


@pytest.mark.slow
def test_two_nodes_under_slurm_with_their_own_state_dirs_train_as_one_machine_with_two_processes(tmp_path, reference):
    shared_checkpoints = tmp_path / "shared-checkpoints"
    projects = (make_project(tmp_path / "node-a", shared_checkpoints), make_project(tmp_path / "node-b", shared_checkpoints))
    port = free_port()
    # srun trainctl local --nproc-per-node 1 train.py: nothing else on the command line
    procs = [start_node(p, "--nproc-per-node", "1", *TRAIN, env=slurm_env(i, port)) for i, p in enumerate(projects)]
    results = finish(*procs)
    assert [code for code, _ in results] == [0, 0], results
    sessions = [only_session(p) for p in projects]
    assert sessions[0].id == sessions[1].id and sessions[0].id.endswith("-job-4242")
    # before training, the nodes all-reduced through the job's rendezvous, under an id of its own
    for (_code, err), session in zip(results, sessions, strict=True):
        assert err.count(PASSED) == 1, err
        (check,) = net_checks(session)
        assert check["ok"] and check["reports"][0]["world_size"] == 2 and check["reports"][0]["sum"] == 2
        assert (session.dir / check["output"]).exists()
    records = [s.read() for s in sessions]
    for record in records:
        assert record["multinode"] == {"nnodes": 2, "nproc_per_node": 1, "rdzv_endpoint": f"127.0.0.1:{port}",
                                       "rdzv_id": "4242", "source": "slurm"}
    nodes = [next(iter(r["nodes"].values())) for r in records]  # each state dir: its own node only
    assert [n["node_rank"] for n in nodes] == [0, 1]
    # c10d picks which node holds global rank 0: whichever it was, that one records the job
    assert sorted(n["head"] for n in nodes) == [False, True]
    head = next(i for i, n in enumerate(nodes) if n["head"])
    other = 1 - head
    assert nodes[head]["ranks"] == [0, 0] and nodes[other]["ranks"] == [1, 1]
    assert [e["step"] for e in sessions[head].metrics()] == list(range(1, STEPS + 1))
    assert len(list(sessions[head].iter_events(("checkpoint",)))) == STEPS // 2
    assert sessions[other].metrics() == [] and not list(sessions[other].iter_events(("checkpoint",)))
    assert {r["status"] for r in records} == {"completed"}
    assert nodes[other]["master_addr"] == "127.0.0.1"  # the head's address, passed explicitly
    assert (sessions[other].dir / nodes[other]["output"]).exists()
    ranks = [json.loads((p / f"rank{nodes[i]['ranks'][0]}.json").read_text()) for i, p in enumerate(projects)]
    assert {r["session"] for r in ranks} == {sessions[0].id}
    assert_same_weights(weights(final_checkpoint(shared_checkpoints, sessions[0].id)), reference)
    # the same job id again is an earlier job's session, not one to join
    again = run_cli(["local", "--no-preflight", "--nproc-per-node", "1", *TRAIN], projects[0], env=slurm_env(0, port))
    assert again.returncode == 2 and "already exists" in again.stderr and "--rdzv-id" in again.stderr


@pytest.mark.slow
def test_a_node_killed_mid_run_restarts_the_whole_job_from_the_newest_checkpoint(tmp_path, reference):
    project = make_project(tmp_path)  # one state dir for both nodes
    procs = two_nodes((project, project), free_port(), "killed", "--max-restarts", "1", "--restart-delay", "1",
                      train=[*TRAIN, "--step-delay", "0.3"])  # time to land the kill mid-run
    first = project / "checkpoints"
    deadline = time.time() + NODE_TIMEOUT_S
    while not list(first.glob("*/ckpt-step00000002.pt")) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), finish(*procs)
        time.sleep(0.05)
    os.kill(int((project / "pid1").read_text()), signal.SIGKILL)  # global rank 1, on whichever node
    results = finish(*procs)
    assert [code for code, _ in results] == [0, 0], results
    session = only_session(project)
    data = session.read()
    assert data["status"] == "completed"
    assert len(data["nodes"]) == 2
    for node in data["nodes"].values():
        assert [a["status"] for a in node["attempts"]] == ["failed", "completed"]
    resumed = {node["attempts"][1]["resume_from"] for node in data["nodes"].values()}
    assert len(resumed) == 1 and None not in resumed  # both from the same checkpoint
    assert all("the job restarts on every node" in err for _, err in results)
    # the network check ran once on each node, before the first attempt; the restart did not repeat it
    assert all(err.count(PASSED) == 1 for _, err in results), results
    assert sorted(c["node"] for c in net_checks(session) if c["ok"]) == sorted(data["nodes"])
    assert len(net_checks(session)) == 2
    assert_same_weights(weights(final_checkpoint(first, session.id)), reference)
    shown = run_cli(["sessions", "show", "latest"], project)
    assert "2 of 2 recorded here" in shown.stdout and "(head)" in shown.stdout, shown.stdout


# ---------------------------------------------------------------- the network check

RAN = "import pathlib\npathlib.Path('ran').write_text('the script ran')\n"  # a script that leaves a trace


def test_a_node_whose_peers_never_come_fails_the_network_check_before_its_script_runs(project):
    (project / "train.py").write_text(RAN)
    port = free_port()
    args = ["local", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "alone",
            "--net-check-timeout", "2", "train.py"]
    r = run_cli(args, project, timeout=NODE_TIMEOUT_S)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-2].startswith("error: network check failed: the nodes did not all join the rendezvous in time: "
                                f"waited 2 s for 2 nodes at 127.0.0.1:{port} (rendezvous id alone-netcheck"), r.stderr
    assert lines[-1].startswith("hint: ") and "--rdzv-endpoint" in lines[-1] and "NCCL_SOCKET_IFNAME" in lines[-1]
    assert "Traceback" not in r.stderr and PASSED not in r.stderr
    assert not (project / "ran").exists()
    # the session says why it never started
    session = only_session(project)
    data = session.read()
    assert data["status"] == "failed" and data["diagnosis"]["kind"] == "rendezvous_timeout"
    assert data["diagnosis"]["what"] == lines[-2].removeprefix("error: ")
    (node,) = data["nodes"].values()
    assert node["attempts"] == [] and node["state"] == "failed"
    assert node["net_check"] == {"ok": False, "kind": "rendezvous_timeout"}
    (check,) = net_checks(session)
    assert not check["ok"] and check["problem"] == "rendezvous_timeout" and check["reports"] == []
    assert "RendezvousTimeoutError" in (session.dir / check["output"]).read_text()
    shown = run_cli(["sessions", "show", session.id], project).stdout
    assert "network check failed" in shown and f"--rdzv-endpoint 127.0.0.1:{port} --rdzv-id alone " in shown, shown
    # the job never started: once the other nodes are up, the same command runs again
    again = run_cli(args, project, timeout=NODE_TIMEOUT_S)
    assert again.returncode == 2 and "network check failed" in again.stderr and "already exists" not in again.stderr
    assert only_session(project).id == session.id and len(net_checks(session)) == 2
    assert not (project / "ran").exists()


@pytest.mark.parametrize(("node_rank", "kind", "fragment"), [
    (0, "rendezvous_timeout", "only 1 of 2 nodes joined the rendezvous in time: waited 2 s for 2 nodes at 127.0.0.1:"),
    (1, "rendezvous_unreachable", "could not reach the head at 127.0.0.1:{port} within 2 s: connection refused"),
])
def test_a_node_on_the_static_rendezvous_aws_uses_fails_the_check_with_what_it_saw(project, node_rank, kind, fragment):
    """The engine as the agent on an AWS node runs it (static rendezvous, node 0 the head), alone."""
    from trainctl import config
    from trainctl.backends.base import RunSpec
    from trainctl.errors import NetCheckError
    from trainctl.launcher.supervisor import RestartPolicy, Supervisor

    (project / "train.py").write_text(RAN)
    port = free_port()
    node = multinode.with_network(NodeSpec(nnodes=2, host="127.0.0.1", port=port, rdzv_id="sess", node_rank=node_rank,
                                           source="aws", rdzv_backend="static"), environ={})
    spec = RunSpec(script=project / "train.py", args=(), cwd=project,
                   resources={"nproc_per_node": 1, **node.to_resources(), "node_key": f"node{node_rank}"})
    engine = Supervisor(spec, RestartPolicy(), config.load(project), backend_options={"use_pty": False},
                        net_check_timeout_s=2)
    with pytest.raises(NetCheckError) as failed:
        engine.prepare(preflight=False)
    assert failed.value.kind == kind and fragment.format(port=port) in failed.value.message, failed.value.message
    assert "security group" in failed.value.hint
    assert not (project / "ran").exists()
    data = only_session(project).read()
    assert data["status"] == "failed" and data["diagnosis"]["kind"] == kind and data["nodes"][f"node{node_rank}"]["attempts"] == []


def test_no_net_check_skips_it(tmp_path):
    project = make_project(tmp_path)
    (project / "train.py").write_text(RAN)
    results = finish(*two_nodes((project, project), free_port(), "unchecked", "--no-net-check", train=["train.py"]))
    assert [code for code, _ in results] == [0, 0], results
    assert all("network check" not in err and "all-reduced" not in err for _, err in results), results
    session = only_session(project)
    assert session.read()["status"] == "completed" and (project / "ran").exists()
    assert net_checks(session) == [] and not list(session.dir.glob("net-check.*"))


# ---------------------------------------------------------------- plan, input, hostlists, diagnosis

def test_dry_run_passes_the_rendezvous_to_torchrun_and_keeps_restarts_to_trainctl(cli, project):
    (project / "train.py").write_text("pass\n")
    r = cli("local", "--dry-run", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:29411",
            "--rdzv-id", "exp42", "--nproc-per-node", "4", "train.py")
    assert r.returncode == 0, r.stderr
    command = next(line for line in r.stdout.splitlines() if line.startswith("command"))
    for part in ("-m torch.distributed.run", "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=127.0.0.1:29411", "--rdzv-id=exp42", "--max-restarts=0", "--local-addr=127.0.0.1"):
        assert part in command
    assert "--node-rank" not in command and "--standalone" not in command
    assert "env          GLOO_SOCKET_IFNAME=lo" in r.stdout  # the head is on loopback: lo is right here
    assert "-job-exp42" in r.stdout
    check = next(line for line in r.stdout.splitlines() if line.startswith("net check"))
    for part in ("before the first attempt", "waits up to 600 s", "netcheck_worker.py --timeout-s 60 --nnodes=2",
                 "--nproc-per-node=1", "--rdzv-endpoint=127.0.0.1:29411", "--rdzv-id=exp42-netcheck",
                 "--max-restarts=0", "--local-addr=127.0.0.1", "--rdzv-conf=join_timeout=600,read_timeout=600"):
        assert part in check, check
    assert not (project / ".trainctl").exists()
    skipped = cli("local", "--dry-run", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29411", "--no-net-check",
                  "--net-check-timeout", "5", "train.py")
    assert "net check    skipped" in skipped.stdout and "netcheck_worker" not in skipped.stdout
    shorter = cli("local", "--dry-run", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29411",
                  "--net-check-timeout", "5", "train.py")
    assert "waits up to 5 s" in shorter.stdout and "join_timeout=5,read_timeout=5" in shorter.stdout
    one = cli("local", "--dry-run", "train.py")
    assert "net check" not in one.stdout  # one machine: nothing to check


def test_interface_the_user_chose_is_kept():
    node = multinode.with_network(NodeSpec(nnodes=2, host="127.0.0.1", port=29400, rdzv_id="x"), environ={})
    assert (node.local_addr, node.socket_ifname) == ("127.0.0.1", "lo")
    assert network_env(node, {"GLOO_SOCKET_IFNAME": "eth9", "NCCL_DEBUG": "INFO"}) == {"NCCL_SOCKET_IFNAME": "lo"}
    assert network_env(NodeSpec(2, "h", 1, "x", socket_ifname="^lo,docker0"), {}) == {
        "NCCL_SOCKET_IFNAME": "^lo,docker0", "NCCL_DEBUG": "WARN"}
    assert "--max-restarts=0" in torchrun_args(node, 8)


SLURM_BAD_LIST = {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[01-"}


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--node-rank", "1"], {}, "--node-rank needs --nnodes"),
    (["--rdzv-endpoint", "10.0.0.1:29400"], {}, "--rdzv-endpoint needs --nnodes"),
    (["--nnodes", "1", "--rdzv-endpoint", "nonsense"], {}, "--nnodes 1 runs on this machine alone"),
    (["--nnodes", "0"], {}, "--nnodes must be 1 or more"),
    (["--nnodes", "2"], {}, "needs --rdzv-endpoint"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:port"], {}, "port 'port' is not a number"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:70000"], {}, "port '70000' is not a number"),
    (["--nnodes", "2", "--rdzv-endpoint", ":29400"], {}, "is not HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "a b:29400"], {}, "is not HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29400"], {}, "--node-rank 2 is out of range"),
    (["--nnodes", "2", "--node-rank", "-1", "--rdzv-endpoint", "127.0.0.1:29400"], {}, "--node-rank -1 is out of range"),
    ([], SLURM_BAD_LIST, "cannot read SLURM_JOB_NODELIST 'gpu[01-'"),
    ([], {**SLURM_BAD_LIST, "SLURM_JOB_NODELIST": "gpu[a-c]"}, "cannot read SLURM_JOB_NODELIST"),
    ([], {**SLURM_BAD_LIST, "SLURM_JOB_NODELIST": "gpu01", "SLURM_NODEID": "5"}, "do not describe a node"),
    ([], {**SLURM_BAD_LIST, "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16"}, "one task per node"),
])
def test_bad_input_is_one_error_line_with_a_hint(project, args, env, message):
    (project / "train.py").write_text("pass\n")
    r = run_cli(["local", *args, "train.py"], project, env=clean_env(**env))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert "Traceback" not in r.stderr
    assert not (project / ".trainctl").exists()


@pytest.mark.parametrize(("text", "hosts"), [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("a[1-2]-ib[0-1]", ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]),
    ("rack1-node[098-100].cluster", ["rack1-node098.cluster", "rack1-node099.cluster", "rack1-node100.cluster"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
])
def test_slurm_hostlists_expand(text, hosts):
    assert multinode.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "gpu[01-", "gpu01]", "gpu[3-1]", "gpu[x]", "gpu[[1-2]]", "a,,b", "gpu[1-2",
                                  "bad host"])
def test_unreadable_hostlists_are_refused(text):
    with pytest.raises(UsageError, match="SLURM_JOB_NODELIST"):
        multinode.expand_hostlist(text)


def test_slurm_is_not_read_when_flags_are_given_or_for_one_node():
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    node = multinode.resolve(nnodes=None, node_rank=None, rdzv_endpoint=None, rdzv_id=None, environ=env)
    assert (node.host, node.port, node.node_rank, node.rdzv_id, node.source) == ("gpu01", 29400, 1, "9", "slurm")
    assert multinode.resolve(nnodes=None, node_rank=None, rdzv_endpoint=None, rdzv_id=None,
                             environ={**env, "SLURM_NNODES": "1", "SLURM_NODEID": "0"}) is None
    flags = multinode.resolve(nnodes=2, node_rank=0, rdzv_endpoint="10.1.1.1:1234", rdzv_id=None, environ=env)
    assert (flags.host, flags.port, flags.source) == ("10.1.1.1", 1234, "flags")


@pytest.mark.parametrize(("fixture", "kind", "fragment"), [
    ("rendezvous_timeout.txt", "rendezvous_timeout", "did not all join the rendezvous"),
    ("rendezvous_unreachable.txt", "rendezvous_unreachable", "could not reach the head at 127.0.0.1:29578"),
    ("rendezvous_static_timeout.txt", "rendezvous_timeout", "only 1 of 2 nodes joined the rendezvous in time"),
])
def test_rendezvous_failures_are_diagnosed_with_the_fix(fixture, kind, fragment):
    d = diagnose((FIXTURES / fixture).read_text(), exit_code=1)
    assert d is not None and d.kind == kind and fragment in d.what
    assert "security group" in d.fix and "SOCKET_IFNAME" in d.fix


@pytest.mark.parametrize("line", [
    "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:144] Gloo connectFullMesh failed with "
    "Connection refused",
    "gpu02:1234:1290 [0] misc/socket.cc:484 NCCL WARN NET/Socket : Connect to 10.0.0.1<43117> failed : "
    "No route to host",
])
def test_collectives_that_cannot_connect_name_the_interface(line):
    d = diagnose(line + "\n", exit_code=1)
    assert d is not None and d.kind == "distributed_network"
    assert "GLOO_SOCKET_IFNAME" in d.fix and "docker0" in d.cause


def test_monitor_warns_when_a_node_stops_reporting(project):
    from trainctl.session import SessionStore

    now = time.time()
    session = SessionStore(project / ".trainctl").create(
        session_id="20261130-job-quiet", status="running", started_at=now - 600, processes=[],
        nodes={"gpu01-0": {"host": "gpu01", "state": "running", "ranks": [0, 7], "heartbeat_at": now - 5},
               "gpu02-1": {"host": "gpu02", "state": "running", "ranks": [8, 15], "heartbeat_at": now - 300}})
    r = run_cli(["monitor", session.id, "--once", "--json"], project)
    assert r.returncode == 0, r.stderr
    silent = [w for w in json.loads(r.stdout)["warnings"] if w["kind"] == "node_silent"]
    assert len(silent) == 1 and "gpu02-1 (gpu02, ranks 8-15)" in silent[0]["message"]


def test_a_job_whose_node_launchers_are_all_gone_is_crashed():
    from trainctl import sysinfo
    from trainctl.session import effective_status

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = {"pid": os.getpid(), "start_ticks": sysinfo.process_start_ticks(os.getpid())}
    data = {"status": "running", "host": sysinfo.host(), "processes": [],
            "nodes": {"a-0": {"host": sysinfo.host(), "launcher": {"pid": gone.pid}},
                      "a-1": {"host": sysinfo.host(), "launcher": {"pid": gone.pid}}}}
    assert effective_status(data) == "crashed"
    data["nodes"]["a-1"]["launcher"] = me
    assert effective_status(data) == "running"
    data["nodes"]["a-1"] = {"host": "elsewhere", "launcher": {"pid": gone.pid}}
    assert effective_status(data) == "running"  # another machine's node: can't tell from here


def test_a_stopped_job_continues_as_a_new_job_on_every_node():
    from trainctl.cli.render import continue_command

    data = {"command": ["trainctl", "local", "train.py", "--lr", "0.1"], "args": ["--lr", "0.1"],
            "multinode": {"nnodes": 2, "nproc_per_node": 8, "rdzv_endpoint": "10.0.0.1:29400", "rdzv_id": "exp42",
                          "source": "flags"}}
    by_hand = continue_command(data, "/ckpt/step3.pt")
    assert by_hand.startswith("trainctl local --nnodes 2 --rdzv-endpoint 10.0.0.1:29400 --rdzv-id exp42-2 "
                              "--nproc-per-node 8 --resume /ckpt/step3.pt train.py --lr 0.1")
    data["multinode"]["source"] = "slurm"
    assert continue_command(data, "/ckpt/step3.pt") == \
        "srun trainctl local --nproc-per-node 8 --resume /ckpt/step3.pt train.py --lr 0.1"


def test_sessions_stop_finds_the_node_running_here():
    from trainctl import sysinfo
    from trainctl.launcher.control import recorded_handle

    handle = {"backend": "local", "ids": {"pid": 123}, "attempt": 1}
    data = {"status": "running", "nodes": {
        "far-0": {"host": "elsewhere", "state": "running", "handle": {**handle, "ids": {"pid": 9}}},
        "here-1": {"host": sysinfo.host(), "state": "running", "handle": handle}}}
    assert recorded_handle(data).ids == {"pid": 123}

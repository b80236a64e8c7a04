"""Planning a pod: pure, golden, and every way a request is refused (one line, with the fix)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.fake_runpod import FakeRunPod, assert_golden, client, fake
from trainctl.cloud.runpod import api
from trainctl.cloud.runpod.catalog import (
    alternatives,
    find_gpu,
    gpu_table,
    parse_gpu_types,
    read_offers,
    render_gpu_table,
)
from trainctl.cloud.runpod.errors import (
    BudgetExceededError,
    GpuUnavailableError,
    InsufficientBalanceError,
    InvalidPodRequestError,
    UnknownGpuTypeError,
    UnsafeEnvironmentError,
)
from trainctl.cloud.runpod.plan import (
    DEFAULT_IMAGE,
    Facts,
    PodRequest,
    allowed_cuda_versions,
    gather_facts,
    image_cuda,
    plan,
)
from trainctl.cloud.runpod.startscript import script_from_docker_args
from trainctl.errors import EXIT_PROVIDER, EXIT_USAGE

__all__ = ["client", "fake"]  # fixtures

GOLDEN = Path(__file__).parent / "golden" / "runpod"
READ_AT = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
SESSION = "20250101-120000-ab12"
STORAGE = f"s3://bucket/project/{SESSION}/"


def offers(gpu_count: int = 1, fake_api: FakeRunPod | None = None):
    """The GPU types as RunPod answers trainctl's query (the fake's answer, read without HTTP)."""
    raw = (fake_api or FakeRunPod())._gpu_types(api.GPU_TYPES, {
        "secure": {"gpuCount": gpu_count, "secureCloud": True},
        "community": {"gpuCount": gpu_count, "secureCloud": False}})
    return tuple(parse_gpu_types(raw))


def facts(**over) -> Facts:
    values = {"offers": offers(), "read_at": READ_AT, "balance_usd": 25.0,
              "spend_per_hr_usd": 0.5, "network_volumes": {"nv1abc": "EU-RO-1"}}
    values.update(over)
    return Facts(**values)


def request(**over) -> PodRequest:
    values = dict(
        session_id=SESSION,
        agent_command=("python3", "-m", "trainctl", "agent", STORAGE),
        gpu="NVIDIA RTX A4000", max_hours=3.0, budget_usd=5.0,
        env={"TRAINCTL_STORAGE": STORAGE,
             "AWS_ENDPOINT_URL": "https://account.r2.cloudflarestorage.com"},
        secrets={"AWS_ACCESS_KEY_ID": "trainctl_r2_key_id",
                 "AWS_SECRET_ACCESS_KEY": "trainctl_r2_secret", "HF_TOKEN": "hf_token"},
        notes=(("storage", STORAGE), ("bundle", "42 files, 1.2 MB (largest: data/vocab.json "
                                                "300 kB)"), ("resume", "none: a fresh start")))
    values.update(over)
    return PodRequest(**values)


def test_dry_run_plan_matches_the_golden_text_and_json():
    p = plan(request(), facts())
    assert_golden(GOLDEN / "plan.txt", p.render_text() + "\n")
    assert_golden(GOLDEN / "plan.json",
                  json.dumps(p.to_json(), indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def test_plan_is_pure_and_repeatable():
    r, f = request(), facts()
    assert plan(r, f) == plan(r, f)
    assert plan(r, f).to_json() == plan(r, f).to_json()


def test_the_payload_holds_no_secret_and_never_the_users_key():
    p = plan(request(), facts())
    env = {e["key"]: e["value"] for e in p.pod_input["env"]}
    assert env["HF_TOKEN"] == "{{ RUNPOD_SECRET_hf_token }}"
    assert env["AWS_SECRET_ACCESS_KEY"] == "{{ RUNPOD_SECRET_trainctl_r2_secret }}"
    assert "RUNPOD_API_KEY" not in env
    assert env["TRAIN_OPS_SESSION_ID"] == SESSION and env["TRAIN_OPS_BACKEND"] == "runpod"
    assert env["TRAIN_OPS_ATTEMPT"] == "0"
    assert p.pod_input["allowedCudaVersions"] == ["12.8", "12.9", "13.0"]
    assert p.pod_input["imageName"] == DEFAULT_IMAGE
    assert p.pod_input["cloudType"] == "SECURE" and "bidPerGpu" not in p.pod_input
    assert p.pod_input["terminateAfter"] == "2025-01-01T15:07:00Z"  # deadline + grace + margin


def test_price_budget_and_deadline_follow_the_facts():
    p = plan(request(gpu_count=2, max_hours=1.5, budget_usd=None), facts(offers=offers(2)))
    assert p.price_per_gpu_hr == 0.17 and p.price_hr == pytest.approx(0.34)
    assert p.projected_usd == pytest.approx(0.51)
    assert p.deadline_utc == READ_AT + timedelta(hours=1.5)
    assert p.price_read_at == READ_AT
    assert "read from RunPod 2025-01-01 12:00:00 UTC" in p.render_text()


def test_interruptible_bids_at_least_runpods_minimum():
    p = plan(request(interruptible=True, cloud="community"), facts())
    assert p.mutation == "podRentInterruptable"
    assert p.pod_input["bidPerGpu"] == 0.06 and p.price_hr == 0.06
    assert "work lost <= the checkpoint interval" in p.render_text()
    raised = plan(request(interruptible=True, cloud="community", bid_per_gpu=0.08), facts())
    assert raised.pod_input["bidPerGpu"] == 0.08


def test_a_resumed_session_keeps_its_absolute_deadline():
    deadline = READ_AT + timedelta(hours=1, minutes=30)
    p = plan(request(attempt=2, deadline_utc=deadline, spent_usd=1.0), facts())
    assert p.deadline_utc == deadline and p.hours == pytest.approx(1.5)
    assert p.pod_name == f"trainctl-{SESSION}-a2"
    script = script_from_docker_args(p.pod_input["dockerArgs"])
    assert script == p.start_script
    assert f"DEADLINE_EPOCH={int(deadline.timestamp())}" in script


@pytest.mark.parametrize("image, cuda, allowed", [
    (DEFAULT_IMAGE, "12.8", ["12.8", "12.9", "13.0"]),
    ("runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04", "12.4",
     ["12.4", "12.5", "12.6", "12.7", "12.8", "12.9", "13.0"]),
    ("pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime", "12.4", None),
    ("ghcr.io/me/train:torch2.3-cu118", "11.8", None),
    ("nvcr.io/nvidia/pytorch:24.05-py3", None, None),
    ("my-registry.example:5000/cuda12.1/app:latest", None, None),
])
def test_allowed_cuda_versions_match_the_image(image, cuda, allowed):
    assert image_cuda(image) == cuda
    if allowed is not None:
        assert allowed_cuda_versions(cuda) == allowed
    p = plan(request(image=image), facts())
    assert p.pod_input.get("allowedCudaVersions") == allowed_cuda_versions(cuda)
    assert ("CUDA version of" in " ".join(p.warnings)) == (cuda is None)


def test_image_cuda_given_by_hand_filters_hosts():
    p = plan(request(image="nvcr.io/nvidia/pytorch:24.05-py3", image_cuda="12.4"), facts())
    assert p.pod_input["allowedCudaVersions"][0] == "12.4"


def test_network_volume_pins_the_datacenter_and_mounts_at_workspace():
    p = plan(request(network_volume_id="nv1abc"), facts())
    assert p.pod_input["dataCenterId"] == "EU-RO-1"
    assert p.pod_input["volumeMountPath"] == "/workspace"
    assert any("pins the pod" in w for w in p.warnings)


def test_balance_that_runs_out_before_the_deadline_is_a_warning_not_a_refusal():
    p = plan(request(max_hours=100, budget_usd=None), facts(balance_usd=3.0))
    assert any("runs out before the deadline" in w for w in p.warnings)


BAD = [
    # label, request changes, facts changes, error, in the message, in the hint
    ("unknown gpu", {"gpu": "NVIDIA RTX A400"}, {}, UnknownGpuTypeError,
     "Unknown RunPod GPU type 'NVIDIA RTX A400'. Did you mean: 'NVIDIA RTX A4000'",
     "trainctl runpod gpus"),
    ("no stock", {"gpu": "NVIDIA A40", "cloud": "community"}, {}, GpuUnavailableError,
     "No 1 x NVIDIA A40 on community cloud (on-demand) available",
     "NVIDIA A40 (48 GB) secure on-demand $0.40/h"),
    ("too many gpus", {"gpu_count": 9}, {}, GpuUnavailableError, "9 x NVIDIA RTX A4000",
     "trainctl runpod gpus"),
    ("over budget", {"max_hours": 40}, {}, BudgetExceededError,
     "Projected cost $6.80 (40 h x $0.170/h) is over budget_usd $5.00",
     "Lower --max-hours to 29.4"),
    ("over budget with spend", {"spent_usd": 4.9}, {}, BudgetExceededError,
     "+ $4.90 already spent", "budget_usd"),
    ("low balance", {}, {"balance_usd": 0.6}, InsufficientBalanceError,
     "balance $0.60 is below one hour of spend ($0.67: this pod $0.17/h + running pods "
     "$0.50/h)", "console.runpod.io/user/billing"),
    ("user's api key", {"env": {"RUNPOD_API_KEY": "rpa_mine"}}, {}, UnsafeEnvironmentError,
     "RUNPOD_API_KEY can't be sent to the pod: RunPod injects a pod-scoped", "Remove"),
    ("api key as secret", {"secrets": {"RUNPOD_API_KEY": "mine"}}, {}, UnsafeEnvironmentError,
     "RUNPOD_API_KEY can't be sent", "Remove"),
    ("runpod namespace", {"env": {"RUNPOD_POD_ID": "x"}}, {}, UnsafeEnvironmentError,
     "RunPod's own", "Remove"),
    ("secret in clear", {"env": {"HF_TOKEN": "hf_abc"}}, {}, UnsafeEnvironmentError,
     "HF_TOKEN looks like a credential and would reach the pod in clear",
     "--secret HF_TOKEN=SECRET_NAME"),
    ("bad secret name", {"secrets": {"HF_TOKEN": "has space"}}, {}, UnsafeEnvironmentError,
     "'has space' is not a RunPod secret name", "letters, digits"),
    ("reserved secret name", {"secrets": {"HF_TOKEN": "RUNPOD_thing"}}, {},
     UnsafeEnvironmentError, "not a RunPod secret name", "not RUNPOD"),
    ("bad env name", {"env": {"MY-VAR": "1"}}, {}, UnsafeEnvironmentError,
     "'MY-VAR' is not an environment variable name", "letters, digits and _"),
    ("env overrides marker", {"env": {"TRAIN_OPS_SESSION_ID": "other"}}, {},
     UnsafeEnvironmentError, "TRAIN_OPS_SESSION_ID is set by trainctl itself", "Remove"),
    ("too many env", {"env": {f"V{i}": "x" for i in range(50)}}, {}, InvalidPodRequestError,
     "RunPod takes at most 50", "fewer"),
    ("bad cloud", {"cloud": "aws"}, {}, InvalidPodRequestError,
     "Unknown --cloud 'aws'. Valid: secure, community", "secure, community"),
    ("zero gpus", {"gpu_count": 0}, {}, InvalidPodRequestError, "--gpu-count 0", "1 to 16"),
    ("zero hours", {"max_hours": 0}, {}, InvalidPodRequestError, "--max-hours 0", "above 0"),
    ("tiny disk", {"container_disk_gb": 5}, {}, InvalidPodRequestError,
     "--container-disk-gb 5", "10 to 2000"),
    ("bad image", {"image": "not an image"}, {}, InvalidPodRequestError,
     "--image 'not an image' is not an image reference", "runpod/pytorch:TAG"),
    ("bad cuda", {"image_cuda": "12"}, {}, InvalidPodRequestError,
     "Unknown CUDA version '12'", "12.8"),
    ("bid on demand", {"bid_per_gpu": 0.1}, {}, InvalidPodRequestError,
     "--bid-per-gpu 0.1 needs --interruptible", "--interruptible"),
    ("bid too low", {"interruptible": True, "bid_per_gpu": 0.01}, {}, InvalidPodRequestError,
     "below RunPod's current minimum $0.100", "at least 0.1"),
    ("unknown volume", {"network_volume_id": "nv9"}, {}, InvalidPodRequestError,
     "No network volume 'nv9'", "console.runpod.io"),
    ("deadline passed", {"deadline_utc": READ_AT - timedelta(minutes=1)}, {},
     InvalidPodRequestError, "deadline 2025-01-01 11:59:00 UTC has passed", "--max-hours"),
    ("no agent", {"agent_command": ()}, {}, InvalidPodRequestError, "No agent command", "argv"),
    ("no session", {"session_id": " "}, {}, InvalidPodRequestError, "session id", "launch"),
    ("negative budget", {"budget_usd": -1.0}, {}, InvalidPodRequestError,
     "budget_usd -1.0 must be above 0", "trainctl.toml"),
]


@pytest.mark.parametrize("label, changes, fact_changes, error, message, hint", BAD,
                         ids=[row[0] for row in BAD])
def test_bad_requests_are_refused_with_one_line_and_the_fix(label, changes, fact_changes, error,
                                                            message, hint):
    with pytest.raises(error) as info:
        plan(request(**changes), facts(**fact_changes))
    e = info.value
    assert message in str(e)
    assert hint in (e.hint or "")
    assert "\n" not in str(e) and "\n" not in e.hint
    if isinstance(e, (InvalidPodRequestError, UnsafeEnvironmentError, BudgetExceededError,
                      UnknownGpuTypeError)):
        assert e.exit_code == EXIT_USAGE
    else:  # RunPod can't serve it now (capacity, balance): the provider's code
        assert e.exit_code == EXIT_PROVIDER


def test_unavailable_gpu_lists_priced_alternatives_cheapest_first():
    f = facts(offers=offers())
    a4000 = find_gpu(f.offers, "nvidia rtx a4000")
    assert find_gpu(f.offers, "RTX A4000") is a4000  # the display name works too
    listed = alternatives(f.offers, a4000, "secure", "interruptible", 1)
    assert listed[:3] == ["NVIDIA RTX A4000 (16 GB) community interruptible $0.06/h",
                          "NVIDIA RTX A4000 (16 GB) secure on-demand $0.17/h",
                          "NVIDIA RTX A4000 (16 GB) community on-demand $0.09/h"]
    others = alternatives(f.offers, find_gpu(f.offers, "NVIDIA A40"), "community", "on-demand", 1)
    assert others == ["NVIDIA A40 (48 GB) secure on-demand $0.40/h",
                      "NVIDIA A40 (48 GB) secure interruptible $0.20/h"]
    more = alternatives(f.offers, None, "secure", "on-demand", 1, limit=3)
    assert more == ["NVIDIA RTX A4000 (16 GB) secure on-demand $0.17/h",
                    "NVIDIA RTX A4500 (20 GB) secure on-demand $0.19/h",
                    "NVIDIA A40 (48 GB) secure on-demand $0.40/h"]


def test_gpus_table_shows_memory_prices_and_stock():
    table = render_gpu_table(offers(), READ_AT)
    lines = table.splitlines()
    assert lines[0].split() == ["GPU", "MEM", "SECURE", "COMMUNITY", "SECURE", "SPOT",
                                "COMMUNITY", "SPOT"]
    a40 = next(line for line in lines if line.startswith("NVIDIA A40"))
    assert "48 GB" in a40 and "$0.40 High" in a40 and " - " in a40
    assert "read from RunPod at 2025-01-01 12:00:00 UTC" in lines[-1]
    rows = {r["gpu"]: r for r in gpu_table(offers())}
    assert rows["NVIDIA H100 80GB HBM3"]["secure_stock"] == "Low"
    assert rows["NVIDIA RTX A4000"]["community_interruptible_usd_hr"] == 0.06


def test_facts_read_from_runpod_give_the_same_plan_as_the_pure_offers(fake: FakeRunPod, client):
    read = gather_facts(client, 1, network_volume_id="nv1abc", now=READ_AT)
    assert read.offers == offers()
    assert read.balance_usd == 25.0 and read.network_volumes == {"nv1abc": "EU-RO-1"}
    expected = plan(request(), dataclasses.replace(facts(), spend_per_hr_usd=0.0))
    assert plan(request(), read) == expected
    assert fake.operations() == ["gpuTypes", "myself", "myself"]


def test_gpus_listing_reads_offers_for_the_gpu_count_with_the_time(fake: FakeRunPod, client):
    fake.gpus["NVIDIA RTX A4000"].max_count = 2
    listed, read_at = read_offers(client, gpu_count=4)
    assert read_at.tzinfo is not None
    a4000 = find_gpu(listed, "NVIDIA RTX A4000")
    assert not a4000.available("secure", "on-demand", 4)  # too many for that type
    assert find_gpu(listed, "NVIDIA RTX A4500").available("secure", "on-demand", 4)
    assert "RTX A4000" in render_gpu_table(listed, read_at, gpu_count=4)

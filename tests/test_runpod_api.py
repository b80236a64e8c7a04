"""The RunPod API layer against the fake on loopback: every operation trainctl sends, with variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env
from tests.fake_runpod import (
    API_KEY,
    NOT_FOUND_TO_TERMINATE,
    FakeRunPod,
    assert_golden,
    client,
    fake,
)
from trainctl.cloud.runpod import api
from trainctl.cloud.runpod.api import ApiKey, RunPodClient, resolve_api_key
from trainctl.cloud.runpod.errors import (
    ApiKeyRejectedError,
    GpuUnavailableError,
    InsufficientBalanceError,
    InvalidPodRequestError,
    NoApiKeyError,
    RunPodApiError,
)

__all__ = ["client", "fake"]  # fixtures

GOLDEN = Path(__file__).parent / "golden" / "runpod"

# Quotes, newlines, braces, backslashes, GraphQL syntax and non-ASCII: every one of them breaks
# or alters a query the SDK builds by pasting values.
HOSTILE = [
    'say "hi"',
    "two\nlines\r\nand a tab\t",
    '"}) { id } mutation { podTerminate(input: {podId: "x"}) }',
    "back\\slash \\\" \\n",
    "{{ braces }} {$var}",
    "ünïcödé — 日本語 🚀",
    "#comment-like",
]


def test_import_of_the_provider_layer_loads_no_sdk():
    code = textwrap.dedent("""
        import sys
        import trainctl.cloud.runpod.api, trainctl.cloud.runpod.catalog
        import trainctl.cloud.runpod.plan, trainctl.cloud.runpod.pods
        import trainctl.cloud.runpod.startscript, trainctl.cloud.runpod.errors
        print(",".join(m for m in ("runpod", "requests") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=clean_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


# --- the API key -------------------------------------------------------------------------------

@pytest.mark.parametrize("env_key, config, expected", [
    ("from-env", None, ("from-env", "RUNPOD_API_KEY")),
    ("from-env", '[default]\napi_key = "from-file"\n', ("from-env", "RUNPOD_API_KEY")),
    ("", '[default]\napi_key = "from-file"\n', ("from-file", "~/.runpod/config.toml")),
    ("  ", '[default]\napi_key = " padded "\n', ("padded", "~/.runpod/config.toml")),
    (None, '[other]\napi_key = "not-default"\n', None),
    (None, "this is = not [toml", None),
    (None, '[default]\napi_key = ""\n', None),
    (None, None, None),
])
def test_api_key_comes_from_the_environment_then_the_runpod_config(tmp_path, env_key, config,
                                                                   expected):
    if config is not None:
        (tmp_path / ".runpod").mkdir()
        (tmp_path / ".runpod" / "config.toml").write_text(config)
    environ = {} if env_key is None else {"RUNPOD_API_KEY": env_key}
    if expected is None:
        with pytest.raises(NoApiKeyError) as info:
            resolve_api_key(environ, home=tmp_path)
        assert "\n" not in str(info.value)
        assert "RUNPOD_API_KEY" in str(info.value) and "~/.runpod/config.toml" in str(info.value)
        assert "runpod config" in info.value.hint
    else:
        key = resolve_api_key(environ, home=tmp_path)
        assert (key.value, key.source) == expected
        assert expected[0] not in repr(key)


def test_a_rejected_key_is_named_by_where_it_came_from(fake: FakeRunPod):
    bad = RunPodClient(ApiKey("wrong", "~/.runpod/config.toml"), retry_delays_s=())
    with pytest.raises(ApiKeyRejectedError, match=r"config\.toml \(HTTP 401\)"):
        bad.gpu_types()  # trainctl's own transport
    with pytest.raises(ApiKeyRejectedError, match=r"config\.toml"):
        bad.list_pods()
    assert [r["status"] for r in fake.requests] == [401, 401]


def test_reads_use_the_key_from_home_config_of_this_test(fake: FakeRunPod):
    home = Path(os.environ["HOME"])
    (home / ".runpod").mkdir()
    (home / ".runpod" / "config.toml").write_text(f'[default]\napi_key = "{API_KEY}"\n')
    c = RunPodClient.from_environment(retry_delays_s=())
    assert c.list_pods() == []
    assert fake.requests[-1]["auth"] == "user"
    assert fake.requests[-1]["user_agent"].startswith("trainctl/")


# --- what is sent -------------------------------------------------------------------------------

def test_every_operation_trainctl_sends_matches_the_golden_file():
    sent = "\n\n".join(f"# {name}\n{text}" for name, text in [
        ("create on-demand", api.CREATE_ON_DEMAND),
        ("create interruptible", api.CREATE_INTERRUPTIBLE),
        ("stop", api.STOP_POD), ("terminate", api.TERMINATE_POD),
        ("gpu types", api.GPU_TYPES), ("account", api.ACCOUNT), ("pods", api.LIST_PODS),
        ("pod", api.GET_POD), ("network volumes", api.NETWORK_VOLUMES)]) + "\n"
    assert_golden(GOLDEN / "operations.graphql", sent)
    for text in (api.CREATE_ON_DEMAND, api.CREATE_INTERRUPTIBLE, api.STOP_POD, api.TERMINATE_POD,
                 api.GPU_TYPES, api.LIST_PODS, api.GET_POD, api.NETWORK_VOLUMES):
        assert '"' not in text, "values travel as variables, never inside the query"


@pytest.mark.parametrize("query, variables, message", [
    (api.CREATE_ON_DEMAND, {"input": {"name": "n", "imageName": "i", "gpuTypeId": "NVIDIA A40",
                                      "cloudType": "SECURE", "bogus": 1}},
     'Field "bogus" is not defined by type "PodFindAndDeployOnDemandInput"'),
    (api.CREATE_ON_DEMAND, {}, 'Variable "$input" of required type'),
    (api.CREATE_ON_DEMAND.replace("PodFindAndDeployOnDemandInput", "PodRentInterruptableInput"),
     {"input": {}}, "expecting type"),
    ('mutation { podFindAndDeployOnDemand(input: {name: "pasted"}) { id } }', {},
     "as a variable only"),
    ("query Q { gpuTypes { id } pod(input: $missing) { id } }", {}, 'Variable "$missing"'),
])
def test_the_fake_validates_requests_as_a_graphql_server_would(fake: FakeRunPod, client, query,
                                                               variables, message):
    with pytest.raises(RunPodApiError) as info:
        client.graphql(query, variables, operation="test", retry=False)
    assert message in str(info.value)


def _create(c: RunPodClient, **over):
    pod_input = {"name": "n", "imageName": "img", "gpuTypeId": "NVIDIA RTX A4000",
                 "gpuCount": 1, "cloudType": "SECURE", "env": []}
    pod_input.update(over)
    return c.create_pod("podFindAndDeployOnDemand", pod_input)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_names_and_env_values_reach_runpod_intact(fake: FakeRunPod, client, value):
    env = [{"key": "PLAIN", "value": value}, {"key": "TRAIN_OPS_SESSION_ID", "value": value}]
    pod = _create(client, name=value, env=env, dockerArgs=value)
    sent = fake.requests[-1]
    assert sent["query"] == api.CREATE_ON_DEMAND
    assert sent["variables"]["input"]["name"] == value
    stored = fake.pods[pod["id"]].input
    assert stored["name"] == value and stored["env"] == env and stored["dockerArgs"] == value
    # ...and read back unchanged
    listed = {p["id"]: p for p in client.list_pods()}[pod["id"]]
    assert listed["name"] == value
    assert f"PLAIN={value}" in listed["env"]
    assert client.get_pod(pod["id"])["name"] == value


def test_interruptible_pods_are_rented_with_a_bid(fake: FakeRunPod, client):
    pod = client.create_pod("podRentInterruptable", {
        "name": "spot", "imageName": "img", "gpuTypeId": "NVIDIA RTX A4000", "gpuCount": 2,
        "cloudType": "COMMUNITY", "bidPerGpu": 0.07})
    assert fake.requests[-1]["query"] == api.CREATE_INTERRUPTIBLE
    assert fake.pods[pod["id"]].kind == "podRentInterruptable"
    assert pod["costPerHr"] == pytest.approx(0.14)


def test_gpu_types_ask_both_clouds_for_the_gpu_count(fake: FakeRunPod, client):
    types = {g["id"]: g for g in client.gpu_types(gpu_count=2)}
    assert fake.requests[-1]["variables"] == {
        "secure": {"gpuCount": 2, "secureCloud": True},
        "community": {"gpuCount": 2, "secureCloud": False}}
    assert types["NVIDIA RTX A4000"]["secure"]["uninterruptablePrice"] == 0.17
    assert types["NVIDIA A40"]["community"] is None  # no community stock


@pytest.mark.parametrize("pod_id", ['x") { id } #', "a b", "", "a\nb", "ünï", "x" * 65])
def test_pod_ids_are_checked_before_any_request(fake: FakeRunPod, client, pod_id):
    with pytest.raises(InvalidPodRequestError, match="Not a RunPod pod id"):
        client.get_pod(pod_id)
    with pytest.raises(InvalidPodRequestError):
        client.terminate_pod(pod_id)
    assert fake.requests == []


# --- failures --------------------------------------------------------------------------------

def test_reads_retry_server_errors_and_dropped_answers(fake: FakeRunPod, client):
    fake.fail("gpuTypes", status=502)
    fake.fail("myself", drop=True)
    assert client.gpu_types()
    assert client.list_pods() == []
    assert fake.operations() == ["gpuTypes", "gpuTypes", "myself", "myself"]


def test_reads_give_up_with_one_line_after_their_retries(fake: FakeRunPod, client):
    fake.fail("gpuTypes", status=503, times=10)
    with pytest.raises(RunPodApiError) as info:
        client.gpu_types()
    assert "HTTP 503" in str(info.value) and "\n" not in str(info.value)
    assert fake.operations() == ["gpuTypes"] * 3


def test_a_create_is_never_retried(fake: FakeRunPod, client):
    fake.fail("podFindAndDeployOnDemand", status=502, after=True)
    with pytest.raises(api.AmbiguousCreateError, match="may exist"):
        _create(client)
    assert fake.operations() == ["podFindAndDeployOnDemand"]
    assert len(fake.pods) == 1  # it did happen: pods.launch_pod cleans such a pod up


@pytest.mark.parametrize("message, error", [
    ("There are no longer any instances available with the requested specifications. "
     "Please refresh and try again.", GpuUnavailableError),
    ("There are not enough free GPUs on the host machine to start this pod.",
     GpuUnavailableError),
    ("Insufficient balance to deploy this pod.", InsufficientBalanceError),
    ("Something went wrong. Please try again later or contact support.", RunPodApiError),
])
def test_runpod_error_messages_become_typed_errors(fake: FakeRunPod, client, message, error):
    fake.fail("podFindAndDeployOnDemand", message)
    with pytest.raises(error) as info:
        _create(client)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.hint


def test_terminate_of_a_pod_that_is_gone_says_so_instead_of_failing(fake: FakeRunPod, client):
    pod = _create(client)
    assert client.terminate_pod(pod["id"]) is True
    assert client.terminate_pod(pod["id"]) is False
    assert json.dumps(fake.requests[-1]["variables"]) == json.dumps(
        {"input": {"podId": pod["id"]}})
    fake.fail("podTerminate", NOT_FOUND_TO_TERMINATE)
    assert client.terminate_pod("abc123") is False


def test_a_pod_scoped_key_ends_its_own_pod_and_nothing_else(fake: FakeRunPod, client):
    mine, other = _create(client), _create(client)
    pod_key = ApiKey(fake.pod_environment(mine["id"])["RUNPOD_API_KEY"], "pod")
    as_pod = RunPodClient(pod_key, retry_delays_s=())
    with pytest.raises(RunPodApiError, match="scoped"):
        as_pod.gpu_types()
    with pytest.raises(RunPodApiError, match="scoped"):
        as_pod.terminate_pod(other["id"])
    assert as_pod.terminate_pod(mine["id"]) is True
    assert fake.terminated == [(mine["id"], "pod")]


def test_no_read_needs_or_imports_the_runpod_sdk(fake: FakeRunPod, client, monkeypatch):
    monkeypatch.setitem(sys.modules, "runpod", None)  # as if `pip install trainctl` alone
    pod = _create(client)
    assert [p["id"] for p in client.list_pods()] == [pod["id"]]
    assert client.get_pod(pod["id"])["id"] == pod["id"]
    assert client.network_volumes() == {"nv1abc": "EU-RO-1"}
    assert client.gpu_types()
    assert fake.requests[-1]["user_agent"].startswith("trainctl/")

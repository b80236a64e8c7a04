"""README.md's RunPod section works as written: its trainctl.toml is valid, and its commands,
in order, against the fake RunPod API and moto's S3 (what the README's own test can't reach)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_entry_point
from tests.fake_runpod import fake
from tests.runpod_world import World, world

__all__ = ["fake", "world"]  # fixtures


def section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("\n## RunPod\n", 1)[1].split("\n## ", 1)[0]


def commands() -> list[str]:
    found = []
    for block in re.findall(r"```bash\n(.*?)```", section(), re.DOTALL):
        found += [re.split(r"\s{2,}#", line)[0].strip() for line in block.splitlines() if line.strip()]
    return found


def test_the_sections_config_is_valid():
    from trainctl.config import validate

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    [block] = re.findall(r"```toml\n(.*?)```", section(), re.DOTALL)
    values = validate(tomllib.loads(block))
    assert values["runpod"]["secrets"] == {"AWS_ACCESS_KEY_ID": "trainctl_key_id",
                                           "AWS_SECRET_ACCESS_KEY": "trainctl_secret"}


@pytest.mark.slow
def test_every_command_of_the_section_works_in_order(world: World):
    listed = commands()
    assert len(listed) >= 9 and all(c.startswith("trainctl ") for c in listed)
    bin_dir = write_entry_point(world.tmp / "bin")
    env = world.env(PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
                    COLUMNS="120")
    for command in listed:
        r = subprocess.run(["bash", "-c", command], cwd=world.project, env=env, capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0 and "Traceback" not in r.stderr, f"{command}\n{r.stdout}{r.stderr}"
    assert world.fake.pods == {}  # the last command ended the last pod
    [sid] = world.session_ids()
    assert [a["attempt"] for a in world.session(sid)["attempts"]] == [0, 1]

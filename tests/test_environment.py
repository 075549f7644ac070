"""The installed environment is the locked one: every package of requirements.lock at its version,
nothing more (but pip itself and this project), so a fresh install is the tested install."""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tests.conftest import REPO

NOT_LOCKED = {"pip", "model-lab"}  # the venv's installer and the project itself (pip install -e .)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked(path: Path) -> dict[str, str]:
    """Package -> version for every pin of a lock file whose marker holds on this interpreter."""
    out = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m and (m.group(3) is None or Marker(m.group(3)).evaluate()):
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def test_the_lock_parser_reads_pins_and_markers(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("a-b==1.0 \\\n    --hash=sha256:00\n    # via x\n"
                    "Win_Only==2 ; sys_platform == 'win32' \\\n    --hash=sha256:11\n"
                    f"here==3.1 ; python_full_version >= '{sys.version_info[0]}.{sys.version_info[1]}' \\\n"
                    "psycopg[binary]==3.3.9 \\\n")
    assert locked(lock) == {"a-b": "1.0", "here": "3.1", "psycopg": "3.3.9"}


def test_the_installed_environment_equals_the_lock():
    if not list(Path(sys.prefix).glob(".installed-*")):
        pytest.skip(f"not the environment `make setup` builds ({sys.prefix}): nothing to compare")
    want, have = locked(REPO / "requirements.lock"), installed()
    assert len(want) > 100  # the parser read the lock
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want) - NOT_LOCKED)
    other = sorted(f"{n} {have[n]} (locked {want[n]})" for n in set(want) & set(have) if have[n] != want[n])
    assert not (missing or extra or other), f"missing {missing}, not in the lock {extra}, other versions {other}"


def test_every_direct_dependency_is_in_the_lock_at_its_pin():
    want = locked(REPO / "requirements.lock")
    for line in (REPO / "requirements.in").read_text().splitlines():
        m = PIN.match(line.split("#")[0].strip())
        if m:
            assert want.get(canonicalize_name(m.group(1))) == m.group(2), f"{line.strip()}: make lock"


def test_the_bentofile_pins_what_the_lock_pins():
    """A Bento installs bentofile.yaml's packages: the same versions as the tested environment."""
    want = locked(REPO / "requirements.lock")
    text = (REPO / "bentofile.yaml").read_text()
    pins = [PIN.match(line.strip().removeprefix("- ").split("#")[0].strip())
            for line in text.splitlines() if "==" in line and line.strip().startswith("- ")]
    assert pins and all(pins)
    for m in pins:
        assert want.get(canonicalize_name(m.group(1))) == m.group(2), f"bentofile.yaml: {m.group(0)} vs the lock"

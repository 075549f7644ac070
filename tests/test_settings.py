"""The service's settings (serving/config.py): each written once, read from the environment with one
line for a bad value, and documented from the code."""
from __future__ import annotations

from dataclasses import fields

import pytest

from serving import config
from serving.config import Settings
from tests.conftest import REPO


def test_every_setting_has_its_variable_and_meaning_once():
    envs = [f.metadata.get("env") for f in fields(Settings)]
    assert all(e and e.startswith("LAB_") for e in envs) and len(set(envs)) == len(envs)
    assert all(f.metadata["doc"] for f in fields(Settings))


def test_settings_come_from_the_environment_and_derived_defaults_follow_them():
    s = Settings.from_env({"LAB_WORKERS": "2", "LAB_MAX_INFLIGHT": "100", "LAB_LOG_FORMAT": "JSON",
                           "LAB_HEADER_TIMEOUT": "2.5", "LAB_BACKENDS": "onnx, torch", "LAB_MODELS": ""})
    assert (s.workers, s.max_inflight, s.max_inflight_per_client, s.log_format) == (2, 100, 25, "json")
    assert s.header_timeout == 2.5 and s.backends == ("onnx", "torch") and s.models == ()
    assert Settings.from_env({"LAB_MAX_INFLIGHT_PER_CLIENT": "0"}).max_inflight_per_client == 0
    d = Settings.from_env({})
    assert d == Settings() and d.max_inflight_per_client == d.max_inflight // 4 and d.threads >= 1


@pytest.mark.parametrize("env,value,message", [
    ("LAB_WORKERS", "two", "LAB_WORKERS='two' is not an integer"),
    ("LAB_HEADER_TIMEOUT", "0", "LAB_HEADER_TIMEOUT=0.0 must be >= 0.1"),
    ("LAB_MAX_HEADERS", "4", "LAB_MAX_HEADERS=4 must be >= 8"),
    ("LAB_LOG_FORMAT", "xml", "LAB_LOG_FORMAT='xml': valid values are text, json"),
    ("LAB_BACKENDS", "onnx,tpu", "unknown backend(s) ['tpu']"),
    ("LAB_DEFAULT_BACKEND", "gpu9", "unknown backend(s) ['gpu9']"),
])
def test_a_bad_value_is_one_line(env, value, message):
    with pytest.raises(SystemExit) as e:
        Settings.from_env({env: value})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_documented_table_is_the_code():
    docs = (REPO / "docs" / "operations.md").read_text()
    begin, end = config.DOCS_MARKERS
    assert docs.split(begin, 1)[1].split(end, 1)[0].strip() == config.table().strip(), \
        "docs/operations.md is out of date: python -m serving.config --docs"

"""The A/B example a user copies: its files are valid as shipped, and its script runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sinkguard.interventions.policy import NO_POLICY, load_policies
from sinkguard.serving.loader import check_ab
from sinkguard.serving.settings import load_serve_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ab_test"


def test_the_ab_example_config_is_valid_and_its_arms_are_policies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative log path is created here, not in the repo
    config = load_serve_config(EXAMPLE / "serve.json")
    policies = load_policies(EXAMPLE / "policies.yaml")
    assert config.ab is not None and config.ab.control == NO_POLICY
    assert Path(config.policies).name == "policies.yaml"
    check_ab(config.ab, [NO_POLICY, *policies.names])


def test_the_traffic_script_explains_itself():
    done = subprocess.run([sys.executable, str(EXAMPLE / "traffic.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "x-sinkguard-arm" in done.stdout

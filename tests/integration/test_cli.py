"""The `sinkguard` command as a user runs it: the stable scan interface and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sinkguard", *args], capture_output=True, text=True, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_every_subcommand_has_help():
    for command in ([], ["scan"], ["calibrate"], ["demo"], ["pull-model"], ["profile"], ["select-heads"], ["eval"],
                    ["ab"], ["ab", "report"]):
        proc = run_cli(*command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "Usage" in proc.stdout


def test_scan_writes_the_documented_report(tmp_path: Path):
    prompts = tmp_path / "prompts.jsonl"
    text = Path("/usr/share/common-licenses/GPL-3").read_text()[2000:3500] if Path(
        "/usr/share/common-licenses/GPL-3").exists() else (Path(json.__file__).read_text()[:1500])
    prompts.write_text(json.dumps({"text": text}) + "\n\n" + json.dumps({"text": "Hello there, the world."}) + "\n")
    proc = run_cli("scan", "--prompts", str(prompts), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["schema"] == "sinkguard.scan" and report["schema_version"] == 2
    assert len(report["prompts"]) == 2
    sinks = report["prompts"][0]["sinks"]
    assert sinks, "the licence excerpt has sinks"
    for sink in sinks:
        assert {"position", "token", "birth_layer", "lifetime", "kind", "forming_layer"} <= set(sink)
        assert sink["kind"] in {"primary", "secondary", "noise"}
        assert 0 <= sink["birth_layer"] < report["model"]["num_layers"]
    assert any(s["kind"] == "secondary" for s in sinks)
    assert report["summary"]["sink_levels"]
    for figure in ("sink_score_heatmap", "sink_levels", "sink_score_curves", "mass_by_layer", "formation"):
        assert (tmp_path / "out" / f"{figure}.png").stat().st_size > 1000
    assert "sink levels" in proc.stdout


def test_bad_prompt_files_fail_clearly(tmp_path: Path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "caf\xe9"}\n')
    assert_clean_error(run_cli("scan", "--prompts", str(latin1)), "not UTF-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "fine"}\n{"text": "   "}\n')
    assert_clean_error(run_cli("scan", "--prompts", str(empty)), "empty.jsonl:2", "empty prompt")
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"prompt": "x"}\n')
    assert_clean_error(run_cli("scan", "--prompts", str(no_text)), "'text'")
    assert_clean_error(run_cli("scan", "--prompts", str(tmp_path / "missing.jsonl")), "not found")


def test_bad_models_fail_clearly(tmp_path: Path, random_model_dir: Path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "hello"}\n')
    assert_clean_error(run_cli("scan", "--model", str(tmp_path / "nope"), "--prompts", str(prompts)), "does not exist")
    fake_gguf = tmp_path / "broken.gguf"
    fake_gguf.write_bytes(b"not a gguf file")
    proc = run_cli("scan", "--model", str(fake_gguf), "--prompts", str(prompts))
    assert_clean_error(proc, "GGUF")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for item in random_model_dir.iterdir():
        (corrupt / item.name).write_bytes(item.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_clean_error(run_cli("scan", "--model", str(corrupt), "--prompts", str(prompts)), "could not load model")
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["X"]}))
    assert_clean_error(run_cli("scan", "--model", str(unsupported), "--prompts", str(prompts)), str(unsupported))


def test_prompt_longer_than_context_and_foreign_profile(tmp_path: Path, random_model_dir: Path, profile):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "word " * 400}) + "\n")  # random model context: 128
    assert_clean_error(run_cli("scan", "--model", str(random_model_dir), "--prompts", str(long)),
                       "more than the model's context of 128")
    proc = run_cli("scan", "--model", str(random_model_dir), "--prompts", str(long), "--max-tokens", "100",
                   "--no-figures", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "no secondary sinks found" in proc.stdout
    profile.save(tmp_path / "smol-profile")
    assert_clean_error(run_cli("scan", "--model", str(random_model_dir), "--prompts", str(long), "--max-tokens", "100",
                               "--profile", str(tmp_path / "smol-profile")), "does not match model")


@pytest.mark.slow
def test_calibrate_then_show_profile(tmp_path: Path):
    proc = run_cli("calibrate", "-n", "3", "--tokens", "128", "--out", str(tmp_path / "prof"))
    assert proc.returncode == 0, proc.stderr
    shown = run_cli("profile", str(tmp_path / "prof"))
    assert shown.returncode == 0 and "reference position 0" in shown.stdout


def test_select_heads_then_scan_with_the_policy_it_wrote(tmp_path: Path, profile):
    profile.save(tmp_path / "prof")
    policy_file = tmp_path / "act.yaml"
    proc = run_cli("select-heads", "--profile", str(tmp_path / "prof"), "--layers", "3,8", "-n", "2", "-t", "64",
                   "--out", str(policy_file))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "act.selection.json").read_text())
    assert len(report["candidates"]) == 2 * profile.model.num_heads
    assert "tried 18 (layer, head) pairs" in proc.stdout.replace("\n", " ")
    if not report["kept"]:  # an empty selection is a result; scan with a fixed ACT policy instead
        policy_file.write_text("policies:\n  - name: act\n    interventions:\n"
                               "      - {kind: attention_redistribution, beta: 0.0, layers: [3, 8]}\n")
    proc = run_cli("scan", "-n", "2", "-t", "64", "--profile", str(tmp_path / "prof"), "--policies", str(policy_file),
                   "--policy", "act", "--no-figures", "--out", str(tmp_path / "scan"))
    assert proc.returncode == 0, proc.stderr
    effect = json.loads((tmp_path / "scan" / "policy_effect.json").read_text())
    assert all((tmp_path / "scan" / side / "report.json").exists() for side in ("before", "after"))
    assert effect["policy"] == "act" and effect["perplexity_after"] != effect["perplexity_before"]
    assert "perplexity:" in proc.stdout
    assert_clean_error(run_cli("scan", "--policy", "act", "--policies", str(policy_file)), "--policy needs")
    assert_clean_error(run_cli("scan", "--profile", str(tmp_path / "prof"), "--policies", str(policy_file),
                               "--policy", "nope"), "unknown policy 'nope'")


def test_ab_report_reads_a_log_and_fails_clearly_on_a_bad_one(tmp_path: Path):
    rows = [{"request_id": f"r{i}", "arm": "act" if i % 2 else "none", "assignment": "sticky",
             "latency_s": 1.0 + 0.3 * (i % 2) + 0.01 * (i % 7), "mean_logprob": -1.5, "secondary_sinks": i % 3,
             "interventions": 5 * (i % 2)} for i in range(60)]
    log = tmp_path / "ab.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = run_cli("ab", "report", str(log), "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["control"] == "none" and report["arms"]["act"]["requests"] == 30
    assert report["comparisons"]["act"]["latency_s"]["significant"]
    log.write_text("{not json\n")
    assert_clean_error(run_cli("ab", "report", str(log)), "ab.jsonl:1: not a JSON line")
    assert_clean_error(run_cli("ab", "report", str(tmp_path / "missing.jsonl")), "A/B log not found")

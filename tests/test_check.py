"""`minifd check`: the report, the JSON, and a deliberately broken kernel caught with a shrunk example."""

import json
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

import minifd.kernels.rms_norm as rms_norm_module
from minifd.cli import main_group
from minifd.properties import PROPERTIES


def test_check_on_the_cpu_passes_and_writes_json(tmp_path):
    report_path = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "-m", "minifd", "check", "--device", "cpu", "--examples", "5",
                             "--json", str(report_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("minifd check on numpy") and "CPU" in lines[0]
    for name in PROPERTIES:
        assert any(line.startswith(name + " ") and line.endswith("ok") for line in lines), name
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["platform"]["backend"] == "cpu" and report["examples"] == 5
    assert [entry["name"] for entry in report["properties"]] == list(PROPERTIES)
    for entry in report["properties"]:
        assert entry["passed"] and entry["failure"] == "" and entry["examples"] == 5
        assert 0 <= entry["worst_error"] <= entry["bound"] and entry["seconds"] >= 0
    assert any(entry["recomputed"] > 0 for entry in report["properties"] if entry["name"].startswith("decode"))


def test_a_broken_kernel_fails_with_a_shrunk_example(monkeypatch, tmp_path):
    """RMSNorm's CPU path made 0.1% too large for rows of 17 or more: the check must fail, shrink to
    the smallest such row and say how to replay it."""
    correct = rms_norm_module._rms_norm_numpy

    def broken(x, weight, eps):
        out = correct(x, weight, eps)
        return out if x.shape[1] < 17 else out * np.float32(1.001)

    monkeypatch.setattr(rms_norm_module, "_rms_norm_numpy", broken)
    report_path = tmp_path / "check.json"
    result = CliRunner().invoke(main_group, ["check", "--device", "cpu", "--only", "rms_norm", "--examples", "30",
                                             "--json", str(report_path)])
    assert result.exit_code == 1, result.output
    assert "shrunk falsifying example: case = {'rows': 1, 'hidden': 17, " in result.output
    assert "normed[0, " in result.output and "the float64 reference is" in result.output
    assert "PROPERTIES['rms_norm'].check({'rows': 1, 'hidden': 17, " in result.output
    entry, = json.loads(report_path.read_text())["properties"]
    assert not entry["passed"] and "'hidden': 17" in entry["failure"]


def test_every_property_runs_even_after_a_failure(monkeypatch):
    def unnormalised(x, weight, eps, residual):
        return x if residual is None else (x, x)

    monkeypatch.setattr(rms_norm_module, "_rms_norm_numpy", unnormalised)
    result = CliRunner().invoke(main_group, ["check", "--device", "cpu", "--only", "rms_norm,silu_mul",
                                             "--examples", "3"])
    assert result.exit_code == 1
    assert "rms_norm failed on cpu" in result.output
    assert any(line.startswith("silu_mul ") and line.endswith("ok") for line in result.output.splitlines())
    assert "1 of 2 properties passed; failed: rms_norm" in result.output


def test_an_unknown_property_is_a_user_error():
    result = subprocess.run([sys.executable, "-m", "minifd", "check", "--device", "cpu", "--only", "gemm"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("minifd: error: --only gemm: no such property") and result.stdout == ""

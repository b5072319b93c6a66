"""scripts/ppo_screening.py: its argument parsing and report table (the training path is notebook 04's)."""
import argparse
import json

import pytest
from script_support import load_script



@pytest.fixture(scope="module")
def screening():
    return load_script("ppo_screening")


def test_assignments_parse_json_values(screening):
    assert screening._assignment('entropy_coef_per_head={"op": 3.0}') == ("entropy_coef_per_head", {"op": 3.0})
    assert screening._assignment("target_kl=null") == ("target_kl", None)
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=JSON_VALUE"):
        screening._assignment("lr")
    with pytest.raises(argparse.ArgumentTypeError, match="lr: value"):
        screening._assignment("lr=fast")


def test_report_has_one_row_per_run(screening, tmp_path):
    row = {"name": "opent3", "train_seed": 0, "overrides": {"entropy_coef_per_head": {"op": 3.0}}, "env_steps": 9216,
           "train_s": 316, "train_return_first20pct": 1.2132, "train_return_last20pct": 1.2247, "greedy_vs_wait": 0.0787,
           "sampled_vs_wait": -0.0012, "sampled_vs_wait_se": 0.0143, "greedy_ops_first_seed": "1,1,0"}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(row) + "\n" + json.dumps({**row, "train_seed": 1}) + "\n")
    screening.write_report(results, tmp_path / "report.md")
    lines = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(lines) == 4 and "| opent3 |" in lines[2] and "+0.079" in lines[2] and "-0.001 (0.014)" in lines[2]
    results.write_text("\n")
    with pytest.raises(ValueError, match="no screening run"):
        screening.write_report(results, tmp_path / "report.md")

"""The probe and study scripts on a tiny env: scripts/random_growth_probe.py, growth_vs_wait_probe.py,
follow_through_probe.py and kernel_paths_study.py."""
import sys

import numpy as np
import pandas as pd
import pytest

from esper_lib.constants import LifecycleOp
from esper_lib.envs import native
from esper_lib.envs.morpho import MorphoEnv
from script_support import load_script

TINY = ["--env", "max_epochs=6", "--env", "train_size=64", "--env", "val_size=40", "--env", "batch_size=32"]


def _script():
    return load_script("random_growth_probe")


def test_prints_every_variant(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["random_growth_probe.py", *TINY, "--seeds", "2"])
    _script().main()
    out = capsys.readouterr().out
    for variant in ("plain", "no_prune", "good_args", "no_prune+good_args"):
        assert f"  {variant} " in out


def test_variants_never_prune_and_germinate_with_the_good_arguments():
    module = _script()
    env = MorphoEnv(max_epochs=8, train_size=64, val_size=40, batch_size=32)
    ctrl = module.RandomVariant(0, no_prune=True, good_args=True)
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        ctrl.reset(seed=seed)
        done = False
        while not done:
            action = ctrl.act(obs)
            assert action[0] != LifecycleOp.PRUNE
            if action[0] == LifecycleOp.GERMINATE:
                assert [action[2], action[3], action[5]] == [module.GOOD_ARGS[k] for k in ("blueprint", "style", "alpha_target")]
            obs, _, terminated, truncated, info = env.step(action)
            assert info["action_valid"]
            done = terminated or truncated
    assert np.isfinite(ctrl.rng.random())


def test_growth_vs_wait_probe_prints_the_paired_difference(monkeypatch, capsys):
    module = load_script("growth_vs_wait_probe")
    monkeypatch.setattr(sys, "argv", ["growth_vs_wait_probe.py", *TINY, "--seeds", "2"])
    module.main()
    out = capsys.readouterr().out
    assert "always-WAIT, return" in out and "per seed [" in out


def test_growth_vs_wait_probe_ranks_the_family(monkeypatch, capsys):
    module = load_script("growth_vs_wait_probe")
    monkeypatch.setattr(sys, "argv", ["growth_vs_wait_probe.py", *TINY, "--env", "num_slots=1", "--env", "host_channels=[4]",
                                      "--seeds", "2", "--family"])
    module.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 7  # one slot x the 7 CNN blueprints (no every-slot members with one slot)
    means = [float(line.split()[0]) for line in lines]
    assert means == sorted(means, reverse=True) and all("@0" in line for line in lines)


def test_probe_helpers_by_hand():
    import argparse

    import pytest

    from esper_lib.notebooks.helpers import mean_and_se, probe_parser, probe_wait_baseline

    # d = [1, 2, 3, 6]: mean 3, sample std sqrt(14/3), SE sqrt(14/3) / 2 = 1.080
    assert mean_and_se([1.0, 2.0, 3.0, 6.0]) == "+3.000 (SE 1.080)"
    args = probe_parser("probe", seeds=8, first_seed=100).parse_args(["--env", "max_epochs=3", "--seeds", "1"])
    assert args.env == [("max_epochs", 3)] and args.seeds == 1
    with pytest.raises(SystemExit, match="--seeds must be >= 2"):
        probe_wait_baseline(args, 100)
    with pytest.raises(SystemExit):  # argparse names the bad override and exits
        probe_parser("probe", seeds=8, first_seed=100).parse_args(["--env", "max_epochs"])
    env_fn, seeds, wait = probe_wait_baseline(argparse.Namespace(env=[("max_epochs", 2), ("train_size", 32), ("val_size", 20)], seeds=2), 7)
    assert list(seeds) == [7, 8] and list(wait.seed) == [7, 8] and env_fn().max_epochs == 2


def test_growth_vs_wait_family_spans_styles_and_the_germination_epoch(monkeypatch, capsys):
    module = load_script("growth_vs_wait_probe")
    monkeypatch.setattr(sys, "argv", ["growth_vs_wait_probe.py", *TINY, "--seeds", "2", "--family", "--all-styles", "--germinate-at", "2"])
    module.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 7 * 3 * 4 + 7 * 4  # slot x blueprint x style, and every slot per blueprint and style
    assert any("linear_multiply" in line for line in lines) and all("@2" in line and "@0" not in line for line in lines)


def test_follow_through_probe_prints_every_opening_under_every_follow_up(monkeypatch, capsys):
    module = load_script("follow_through_probe")
    monkeypatch.setattr(sys, "argv", ["follow_through_probe.py", *TINY, "--seeds", "2", "--germinate", "CONV_LIGHT:LINEAR_ADD",
                                      "--follow-ups", "random", "advance_or_fossilize"])
    module.main()
    out = capsys.readouterr().out
    assert "follow-up random (never -)" in out and "follow-up advance_or_fossilize (never WAIT, GERMINATE" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [r[0] for r in rows] == ["wait", "random_args", "best", "conv_light:linear_add"] * 2
    assert all("opening effect" in " ".join(r) for r in rows if r[0] != "wait")


def test_follow_through_opening_then_only_the_allowed_ops():
    module = load_script("follow_through_probe")
    env = MorphoEnv(max_epochs=8, train_size=64, val_size=40, batch_size=32)
    opening = module.make_action(LifecycleOp.GERMINATE, slot=0, blueprint=1, style=1, tempo=0, alpha_target=2)
    excluded = module.FOLLOW_UPS["no_prune_no_set_alpha"]
    ctrl = module.OpeningThenRandom(3, opening, excluded)
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        ctrl.reset(seed=seed)
        actions, done = [], False
        while not done:
            actions.append(ctrl.act(obs))
            obs, _, terminated, truncated, info = env.step(actions[-1])
            assert info["action_valid"]
            done = terminated or truncated
        assert np.array_equal(actions[0], opening)
        assert all(a[0] not in excluded for a in actions[1:])
        assert any(a[0] != LifecycleOp.WAIT for a in actions[1:])
    random_opening = module.OpeningThenRandom(3, module.RANDOM_ARGS)
    obs, _ = env.reset(seed=0)
    random_opening.reset(seed=0)
    assert random_opening.act(obs)[0] == LifecycleOp.GERMINATE
    with pytest.raises(SystemExit, match="BLUEPRINT:STYLE"):
        module.germination(module.FixedSchedule(slot=0, blueprint=module.BlueprintAction.NORM, germinate_at=0), "NOPE", "LINEAR_ADD")


@pytest.mark.skipif(not native.available(), reason="no C compiler here: the C kernels cannot be built")
def test_kernel_paths_study_pairs_every_controller_on_both_paths(monkeypatch, capsys, tmp_path):
    module = load_script("kernel_paths_study")
    before = native.switched_on()
    monkeypatch.setattr(sys, "argv", ["kernel_paths_study.py", *TINY, "--seeds", "2", "--out", str(tmp_path / "paths.csv")])
    module.main()
    assert native.switched_on() == before  # the switch is restored
    table = pd.read_csv(tmp_path / "paths.csv")
    assert list(table.controller) == ["always_wait", "best_schedule", "heuristic", "random_masked"]
    assert (table.episodes == 2).all() and (table.same_actions == 2).all()  # the same actions on both paths
    assert (table.max_abs_diff <= 0.3).all() and (table.diff_ci_low <= table.diff_mean).all() and (table.diff_mean <= table.diff_ci_high).all()
    assert "random_masked" in capsys.readouterr().out

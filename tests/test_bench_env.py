"""benchmarks/bench_env.py: the controllers it times (the `schedule` one plays the best fixed schedule);
benchmarks/bench_training_layout.py: both training layouts, same updates."""
import json
from pathlib import Path

import numpy as np
import pytest

from esper_lib.constants import LifecycleOp
from esper_lib.envs.morpho import MorphoEnv
from esper_lib.evaluation.schedules import ScheduleController, schedule_from_dict
from script_support import load_script


@pytest.fixture(autouse=True)
def restore_the_kernel_switch(monkeypatch):
    """The benches switch the kernels for their worker processes through ESPER_NATIVE (and in this process): put
    both back, so that later tests (notebook 04 starts its kernel with this process's environment) see the run's."""
    import os

    from esper_lib.envs import native

    monkeypatch.setenv("ESPER_NATIVE", os.environ.get("ESPER_NATIVE", "1"))  # undone at teardown, whatever a bench set
    before = native._enabled
    yield
    native.enable(before)


def test_schedule_controllers_play_the_best_fixed_schedule_within_the_masks():
    bench = load_script("bench_env", folder="benchmarks")
    ctrls = bench._controllers("schedule", 2)
    assert len(ctrls) == 2 and all(isinstance(c, ScheduleController) for c in ctrls)
    recorded = json.loads((Path(__file__).resolve().parents[1] / "docs/figures/headroom_best_schedule.json").read_text())["schedule"]
    assert ctrls[0].schedule == schedule_from_dict(recorded)  # the file scripts/headroom_study.py writes
    env = MorphoEnv(max_epochs=16, train_size=64, val_size=40, batch_size=32)  # long enough to blend and fossilize
    obs, _ = env.reset(seed=0)
    ops, done = [], False
    while not done:
        obs, _, done, _, info = env.step(ctrls[0].act(obs))
        assert info["action_valid"]
        ops.append(info["op"])
    assert ops[:2] == [LifecycleOp.GERMINATE, LifecycleOp.ADVANCE] and LifecycleOp.FOSSILIZE in ops
    assert np.count_nonzero(env._stages()) == len(ctrls[0].schedule.seedings)  # every planned seed is in its slot


def test_kind_all_times_the_four_controllers(monkeypatch, capsys):
    bench = load_script("bench_env", folder="benchmarks")
    timed = []
    monkeypatch.setattr(bench, "bench_single", lambda env_fn, kind, steps: (timed.append(kind) or 10.0, dict.fromkeys(("train", "evaluate", "counterfactuals", "rest"), 1.0)))
    monkeypatch.setattr("sys.argv", ["bench_env.py", "--steps", "1", "--controller", "all", "--no-vector"])
    bench.main()
    assert timed == ["wait", "random", "schedule", "grown"] and "schedule   MorphoEnv x1" in capsys.readouterr().out


def test_env_threads_reach_the_env_and_the_header(monkeypatch, capsys):
    bench = load_script("bench_env", folder="benchmarks")
    made = []
    monkeypatch.setattr(bench, "make_morpho_env", lambda **kw: made.append(kw) or MorphoEnv(**kw))
    monkeypatch.setattr("sys.argv", ["bench_env.py", "--steps", "1", "--controller", "wait", "--no-vector", "--env-threads", "2"])
    bench.main()
    assert made and all(kw["num_threads"] == 2 for kw in made)
    assert "2 torch thread(s) per env" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["bench_env.py", "--env-threads", "0"])
    with pytest.raises(SystemExit):
        bench.main()


def test_grown_controllers_grow_a_norm_seed_in_every_slot():
    bench = load_script("bench_env", folder="benchmarks")
    (ctrl,) = bench._controllers("grown", 1)
    env = MorphoEnv(max_epochs=12, train_size=64, val_size=40, batch_size=32)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        obs, _, done, _, info = env.step(ctrl.act(obs))
        assert info["action_valid"]
    assert [type(s.seed).__name__ for s in env.host.slots] == ["NormSeed"] * 3


def test_training_layout_bench_times_both_layouts_with_the_same_updates(tmp_path):
    import dataclasses

    import pandas as pd

    bench = load_script("bench_training_layout", folder="benchmarks")
    config = dataclasses.replace(bench.notebook_config(1), num_steps=4, seq_len=4, seed_group_size=2, num_envs=2, feature_dim=16, hidden_dim=16)
    env = {"max_epochs": 4, "batches_per_epoch": 1, "train_size": 64, "val_size": 40, "batch_size": 32}
    seconds = {layout: bench.time_layout(layout, config, [0, 1], tmp_path, env) for layout in ("async-1", "sync-N")}
    assert all(s > 0 for s in seconds.values())
    for seed in (0, 1):  # the layouts differ in time only
        a = pd.read_csv(tmp_path / "async-1" / f"seed_{seed}" / "metrics.csv").drop(columns=["collect_s", "update_s", "steps_per_s"])
        s = pd.read_csv(tmp_path / "sync-N" / f"seed_{seed}" / "metrics.csv").drop(columns=["collect_s", "update_s", "steps_per_s"])
        pd.testing.assert_frame_equal(a, s)
    with pytest.raises(ValueError, match="layout must be"):
        bench.time_layout("threads", config, [0], tmp_path, env)


def test_training_layout_bench_compares_the_kernel_paths(tmp_path, monkeypatch):
    import dataclasses

    from esper_lib.envs import native

    if not native.available():
        pytest.skip("no C compiler here: the native kernels cannot be built")
    monkeypatch.setenv("ESPER_NATIVE", "0")  # restored after the test (time_layout sets it for the workers)
    before = native._enabled
    bench = load_script("bench_training_layout", folder="benchmarks")
    config = dataclasses.replace(bench.notebook_config(1), num_steps=4, seq_len=4, seed_group_size=2, num_envs=2, feature_dim=16, hidden_dim=16)
    env = {"max_epochs": 4, "batches_per_epoch": 1, "train_size": 64, "val_size": 40, "batch_size": 32}
    try:
        for layout in ("sync-N/torch", "sync-N/native"):
            assert bench.time_layout(layout, config, [0], tmp_path, env) > 0
            assert native._enabled == layout.endswith("native")
    finally:
        native.enable(before)
    for kernels in ("torch", "native"):
        assert (tmp_path / kernels / "sync-N" / "seed_0" / "metrics.csv").exists()


@pytest.mark.parametrize("controller", ["wait", "grown"])
def test_profile_env_lists_ops_per_step(controller, monkeypatch):
    from esper_lib.envs import native

    monkeypatch.setattr(native, "_enabled", False)  # the torch path (ESPER_NATIVE=1 would replace Adam's op)
    prof = load_script("profile_env", folder="benchmarks")
    rows = prof.profile_steps(controller, steps=1, warmup=1)
    assert rows and all(ms >= 0 and calls > 0 for _, ms, calls in rows)
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert any(name == "aten::_fused_adam_" for name, _, _ in rows)  # the host's optimizer runs every minibatch


def test_native_kernel_bench_times_every_layer_on_both_paths(capsys, monkeypatch):
    from esper_lib.envs import native

    if not native.available():
        pytest.skip("no C compiler here: the native kernels cannot be built")
    before = native._enabled
    bench = load_script("bench_native_kernels", folder="benchmarks")
    monkeypatch.setattr("sys.argv", ["bench_native_kernels.py", "--calls", "1", "--repeats", "1"])
    try:
        bench.main()
    finally:
        native.enable(before)
    out = capsys.readouterr().out
    assert all(what in out for what, *_ in bench.SHAPES) and "max-pool 2x2" in out
    assert "4->8 8x8 k3" in out and "oneDNN" in out  # the host's widest convolution is oneDNN's on the torch path
    bare = out.split("bare C calls")[1].splitlines()[1:]  # forward and backward us and GFLOP/s per layer
    assert len(bare) == len(bench.SHAPES) and all(len(line.split()) >= 4 and float(line.split()[-1]) > 0 for line in bare)


def test_native_both_times_each_configuration_on_both_paths_and_prints_the_ratio(monkeypatch, capsys):
    from esper_lib.envs import native

    if not native.available():
        pytest.skip("no C compiler here: the native kernels cannot be built")
    monkeypatch.setenv("ESPER_NATIVE", "0")  # restored after the test (the bench sets it for worker processes)
    before = native.switched_on()
    bench = load_script("bench_env", folder="benchmarks")
    seen = []

    def fake_single(env_fn, kind, steps):
        seen.append((kind, native.switched_on()))
        return (20.0 if native.switched_on() else 10.0), dict.fromkeys(("train", "evaluate", "counterfactuals", "rest"), 1.0)

    monkeypatch.setattr(bench, "bench_single", fake_single)
    monkeypatch.setattr("sys.argv", ["bench_env.py", "--steps", "1", "--controller", "wait", "--no-vector", "--native", "both"])
    try:
        bench.main()
    finally:
        native.enable(before)
    assert seen == [("wait", False), ("wait", True)]  # the torch path first, then the kernels
    out = capsys.readouterr().out
    assert "on/off" in out and "2.00x" in out


def test_native_both_falls_back_to_the_torch_path_where_the_kernels_cannot_be_built(monkeypatch, capsys):
    bench = load_script("bench_env", folder="benchmarks")
    monkeypatch.setattr(bench, "native", None)  # as on a tree without the kernels
    seen = []
    monkeypatch.setattr(bench, "bench_single", lambda env_fn, kind, steps: (seen.append(kind) or 10.0, dict.fromkeys(("train", "evaluate", "counterfactuals", "rest"), 1.0)))
    monkeypatch.setattr("sys.argv", ["bench_env.py", "--steps", "1", "--controller", "wait", "--no-vector", "--native", "both"])
    bench.main()
    assert seen == ["wait"] and "timing the torch path only" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["bench_env.py", "--steps", "1", "--native", "on"])
    with pytest.raises(SystemExit):
        bench.main()


def test_batched_hosts_study_times_both_layouts(capsys, monkeypatch):
    from esper_lib.envs import native

    if not native.available():
        pytest.skip("no C compiler here: the native kernels cannot be built")
    before = native.switched_on()
    study = load_script("study_batched_hosts", folder="benchmarks")
    monkeypatch.setattr("sys.argv", ["study_batched_hosts.py", "--hosts", "2", "--calls", "1", "--repeats", "1"])
    study.main()
    assert native.switched_on() == before  # the switch is restored
    out = capsys.readouterr().out
    assert "one host after another" in out and "batched" in out and "block 2" in out
    assert "% of it" in out


@pytest.mark.parametrize("native_flag", ["off", "on"])
def test_run_episodes_plays_whole_episodes(native_flag, monkeypatch, capsys):
    from esper_lib.envs import native

    if native_flag == "on" and not native.available():
        pytest.skip("no C compiler here: the native kernels cannot be built")
    runner = load_script("run_episodes", folder="benchmarks")
    monkeypatch.setattr("sys.argv", ["run_episodes.py", "--controller", "grown", "--episodes", "1", "--native", native_flag])
    runner.main()
    assert native.switched_on() is (native_flag == "on")
    assert f"grown, kernels {native_flag}: {MorphoEnv().max_epochs} env steps" in capsys.readouterr().out  # one whole episode
    monkeypatch.setattr("sys.argv", ["run_episodes.py", "--episodes", "0"])
    with pytest.raises(SystemExit):
        runner.main()

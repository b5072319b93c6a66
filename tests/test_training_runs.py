"""Training runs on the morpho env: files, live metrics, calibration rows, held-out evaluation."""
import numpy as np
import pandas as pd
import pytest

from esper_lib.evaluation.baselines import AlwaysWaitController
from esper_lib.ppo import PPOConfig
from esper_lib.training_runs import (
    LiveMetrics,
    calibration_summary,
    describe_first_epoch,
    describe_germination,
    describe_outcome,
    distinct_op_sequences,
    evaluate_runs,
    greedy_controller,
    op_probabilities_along_episode,
    train_morpho_policy,
)

ENV = dict(max_epochs=4, train_size=64, val_size=40, batch_size=32)
CFG = dict(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=2, epochs=1, feature_dim=16, hidden_dim=16, total_updates=2, num_threads=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    seen = []
    r = train_morpho_policy(PPOConfig(**CFG, seed=5), ENV, out, vector_env="sync", checkpoint_every=1, progress=False,
                            callbacks=[lambda tr, row: seen.append(pd.read_csv(out / "metrics.csv").shape[0])])
    r.seen_rows = seen
    return r


def test_run_writes_its_files_and_metrics_live(run):
    out = run.checkpoint.parent
    for name in ("metrics.csv", "tamiyo_v2_ppo.pt", "op_usage.csv", "training_episodes.csv", "calibration.csv"):
        assert (out / name).exists(), name
    assert run.seen_rows == [1, 2]  # metrics.csv grows after every update, before the run ends
    assert len(run.metrics) == 2 and run.train_seed == 5 and run.train_seconds > 0
    # 2 envs x 8 steps, 4-epoch episodes: 4 complete episodes per rollout, 2 rollouts
    assert len(run.calibration) == 8 and len(run.episodes) == 8
    assert np.allclose(run.calibration.undiscounted_return.sort_values().to_numpy(),
                       run.episodes["return"].sort_values().to_numpy(), atol=1e-5)


def test_evaluation_pairs_ppo_and_baselines_on_the_same_seeds(run):
    res = evaluate_runs([run], {"wait": AlwaysWaitController()}, ENV, [100, 101, 102], progress=False)
    assert sorted(res.controller.unique()) == ["ppo", "wait"]
    assert res.groupby("controller").seed.apply(sorted).tolist() == [[100, 101, 102]] * 2
    assert (res[res.controller == "ppo"].train_seed == 5).all() and res[res.controller == "wait"].train_seed.isna().all()
    assert (res[res.controller == "wait"].ops == ",".join(["0"] * 4)).all()
    d = distinct_op_sequences(res)
    assert d.set_index("controller").loc["wait", "distinct_sequences"] == 1
    with pytest.raises(ValueError, match="heldout_seeds"):
        evaluate_runs([run], {}, ENV, [], progress=False)


def test_evaluation_can_add_the_sampled_policy(run):
    kwargs = dict(sampled_label="ppo_sampled", progress=False)
    res = evaluate_runs([run], {"wait": AlwaysWaitController()}, ENV, [100, 101, 102], **kwargs)
    assert sorted(res.controller.unique()) == ["ppo", "ppo_sampled", "wait"]
    sampled = res[res.controller == "ppo_sampled"]
    assert sampled.seed.tolist() == [100, 101, 102] and (sampled.train_seed == 5).all()
    again = evaluate_runs([run], {}, ENV, [100, 101, 102], **kwargs)
    assert again[again.controller == "ppo_sampled"]["ops"].tolist() == sampled["ops"].tolist()  # seeded: reproducible
    for bad in ("ppo", "wait"):
        with pytest.raises(ValueError, match="sampled_label"):
            evaluate_runs([run], {"wait": AlwaysWaitController()}, ENV, [100], sampled_label=bad, progress=False)


def test_calibration_summary_and_live_metrics(run, tmp_path):
    s = calibration_summary([run], last_updates=1)
    assert len(s) == 1 and s.episodes.iloc[0] == 4
    live = LiveMetrics(tmp_path / "m.csv")
    live(None, {"update": 0, "x": 1.0})
    live(None, {"update": 1, "x": 2.0})
    assert pd.read_csv(tmp_path / "m.csv").x.tolist() == [1.0, 2.0]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="vector_env"):
        train_morpho_policy(PPOConfig(**CFG), ENV, tmp_path, vector_env="ray-ish", progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_morpho_policy(PPOConfig(**CFG), ENV, tmp_path, checkpoint_every=-1, progress=False)
    with pytest.raises(ValueError, match="max_epochs"):
        train_morpho_policy(PPOConfig(**CFG), {**ENV, "max_epochs": 0}, tmp_path, progress=False)


def test_tensorboard_logging_is_an_optional_extra(tmp_path):
    """With tensorboard installed, scalars are written per update; without it, a clear ImportError names the extra."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install -e \.\[tensorboard\]"):
            train_morpho_policy(PPOConfig(**CFG), ENV, tmp_path, vector_env="sync", tensorboard=True, progress=False)
        return
    train_morpho_policy(PPOConfig(**CFG), ENV, tmp_path, vector_env="sync", tensorboard=True, progress=False)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _synthetic_results() -> pd.DataFrame:
    """Two training seeds x 6 held-out seeds; PPO = WAIT + 0.1 (seed 0) / + 0.2 (seed 1), sampled = WAIT - 0.05."""
    rows = []
    for seed in range(6):
        wait = 1.0 + 0.01 * seed
        rows += [{"controller": "always_wait", "train_seed": np.nan, "seed": seed, "return": wait, "ops": "0,0"},
                 {"controller": "random_masked", "train_seed": np.nan, "seed": seed, "return": wait - 0.3, "ops": f"{seed},1"},
                 {"controller": "best_schedule", "train_seed": np.nan, "seed": seed, "return": wait + 0.3, "ops": "1,5"}]
        for train_seed, gain in ((0, 0.1), (1, 0.2)):
            rows.append({"controller": "ppo", "train_seed": train_seed, "seed": seed, "return": wait + gain, "ops": "1,5"})
            rows.append({"controller": "ppo_sampled", "train_seed": train_seed, "seed": seed, "return": wait - 0.05, "ops": "1,0"})
    return pd.DataFrame(rows)


def test_describe_outcome_states_winner_share_and_readouts():
    text = describe_outcome(_synthetic_results(), n_resamples=200)
    assert "seed 0: +0.100 (95% CI [+0.100, +0.100])" in text and "seed 1: +0.200" in text
    assert "+0.150" in text and "**beats** always-WAIT" in text  # aggregate of the two training seeds
    assert "Against the random masked policy: +0.450" in text
    assert "captures **50%**" in text  # (0.15) / (0.30)
    assert "**sampling**" in text and "-0.050" in text
    assert "seed 0: 1 distinct of 6" in text
    no_sampled = describe_outcome(_synthetic_results().query("controller != 'ppo_sampled'"), n_resamples=200)
    assert "sampling" not in no_sampled


def test_parallel_runs_equal_the_same_runs_one_after_the_other(tmp_path):
    """``train_morpho_policies(workers=2)`` (spawned processes) gives each seed the run it gets alone."""
    from esper_lib.training_runs import train_morpho_policies

    config = PPOConfig(**CFG)
    one_by_one = train_morpho_policies(config, ENV, tmp_path / "seq", [3, 4], vector_env="sync", progress=False)
    parallel = train_morpho_policies(config, ENV, tmp_path / "par", [3, 4], workers=2, vector_env="sync", progress=False)
    assert [r.train_seed for r in parallel] == [3, 4]
    for a, b in zip(one_by_one, parallel):
        assert b.checkpoint == tmp_path / "par" / f"seed_{b.train_seed}" / "tamiyo_v2_ppo.pt" and b.checkpoint.exists()
        timing = ["collect_s", "update_s", "steps_per_s"]
        pd.testing.assert_frame_equal(a.metrics.drop(columns=timing), b.metrics.drop(columns=timing))
        pd.testing.assert_frame_equal(a.episodes, b.episodes)


def test_parallel_runs_reject_bad_arguments(tmp_path):
    from esper_lib.training_runs import train_morpho_policies

    with pytest.raises(ValueError, match="workers"):
        train_morpho_policies(PPOConfig(**CFG), ENV, tmp_path, [0], workers=0)
    with pytest.raises(ValueError, match="train_seeds"):
        train_morpho_policies(PPOConfig(**CFG), ENV, tmp_path, [1, 1])
    with pytest.raises(ValueError, match="train_seed"):
        train_morpho_policies(PPOConfig(**CFG), ENV, tmp_path, [0, -1], workers=2, vector_env="sync", progress=False)


def test_seed_groups_play_the_same_hosts_and_centre_advantages_within_the_group():
    """seed_group_size=2 with 4 morpho envs: envs 0-1 and 2-3 share their hosts; advantages sum to 0 per group and step."""
    from functools import partial

    import torch

    from esper_lib.envs.morpho import MorphoEnv
    from esper_lib.ppo import PPOTrainer

    config = PPOConfig(**{**CFG, "num_envs": 4, "minibatch_sequences": 4}, seed_group_size=2)
    trainer = PPOTrainer(partial(MorphoEnv, **ENV), config)
    try:
        trainer.collect()  # 8 steps = two 4-epoch episodes; the autoreset after the last step starts a third
        hosts = [e.unwrapped.host.host_parameters() for e in trainer.env.envs]
        same = lambda i, j: all(torch.equal(p, q) for p, q in zip(hosts[i], hosts[j]))  # noqa: E731
        assert same(0, 1) and same(2, 3) and not same(0, 2)
        trainer.update()
        sums = trainer.buffer.advantages.reshape(2, 2, -1).sum(dim=1)
        assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-6)
    finally:
        trainer.close()


def test_evaluation_with_workers_gives_the_same_rows(run):
    baselines = {"wait": AlwaysWaitController()}
    kwargs = dict(sampled_label="ppo_sampled", progress=False)
    one = evaluate_runs([run], baselines, ENV, [100, 101], **kwargs)
    two = evaluate_runs([run], baselines, ENV, [100, 101], workers=2, **kwargs)
    pd.testing.assert_frame_equal(one.drop(columns="wall_s"), two.drop(columns="wall_s"))
    with pytest.raises(ValueError, match="workers"):
        evaluate_runs([run], baselines, ENV, [100], workers=0)


def test_op_probabilities_follow_the_greedy_episode_the_evaluation_plays(run):
    profile = op_probabilities_along_episode(greedy_controller(run.checkpoint), ENV, 100)
    assert list(profile.epoch) == [0, 1, 2, 3]
    probs = profile.filter(like="p_").to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and (probs >= 0).all()
    assert (profile.loc[0, ["p_PRUNE", "p_FOSSILIZE", "p_ADVANCE", "p_SET_ALPHA_TARGET"]] == 0).all()  # masked: no seed yet
    # greedy: the op taken is the most probable one, and the ops are those the evaluation records
    assert (profile.op == profile.filter(like="p_").idxmax(axis=1).str[2:]).all()
    from esper_lib.constants import OP_NAMES

    played = evaluate_runs([run], {}, ENV, [100], progress=False).ops.iloc[0]
    assert ",".join(str(OP_NAMES.index(op)) for op in profile.op) == played


def test_describe_germination_names_the_first_germination_or_its_absence():
    late = pd.DataFrame({"epoch": [0, 1, 2], "op": ["WAIT", "WAIT", "GERMINATE"], "p_WAIT": [0.9, 0.7, 0.4], "p_GERMINATE": [0.1, 0.3, 0.6]})
    never = pd.DataFrame({"epoch": [0, 1, 2], "op": ["WAIT"] * 3, "p_WAIT": [0.95, 0.7, 0.6], "p_GERMINATE": [0.05, 0.3, 0.4]})
    text = describe_germination({0: late, 1: never})
    assert "seed 0 germinates first at epoch 2 (p(GERMINATE) 0.60)" in text
    assert "seed 1 never germinates: p(GERMINATE) on its path starts at 0.05 and peaks at 0.40 (epoch 2), below p(WAIT) 0.60" in text
    with pytest.raises(ValueError, match="profiles"):
        describe_germination({})
    with pytest.raises(ValueError, match="traces"):
        describe_first_epoch({})
    with pytest.raises(TypeError, match="controller must be a PolicyController"):
        op_probabilities_along_episode(AlwaysWaitController(), ENV, 0)


def test_first_epoch_probe_records_every_update_and_changes_nothing(run, tmp_path):
    trace = pd.read_csv(run.checkpoint.parent / "first_epoch.csv")
    assert list(trace["update"]) == list(run.metrics["update"]) and run.first_epoch is not None
    p = trace.filter(like="p_").drop(columns=["p_blueprint", "p_style"])
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert (p.drop(columns=["p_WAIT", "p_GERMINATE"]) == 0).all().all()  # an empty host: only WAIT and GERMINATE are valid
    assert trace.blueprint.isin(["CONV_LIGHT", "ATTENTION", "NORM", "DEPTHWISE", "BOTTLENECK", "CONV_SMALL", "CONV_HEAVY"]).all()
    assert ((trace.p_blueprint > 0) & (trace.p_blueprint <= 1)).all() and trace["style"].notna().all()
    plain = train_morpho_policy(PPOConfig(**CFG, seed=5), ENV, tmp_path / "plain", vector_env="sync", progress=False, first_epoch_probe=False)
    pd.testing.assert_frame_equal(plain.metrics.drop(columns=["collect_s", "update_s", "steps_per_s"]),
                                  run.metrics.drop(columns=["collect_s", "update_s", "steps_per_s"]))
    assert plain.first_epoch is None and not (tmp_path / "plain" / "first_epoch.csv").exists()


def test_describe_first_epoch_gives_start_lowest_and_end():
    df = pd.DataFrame({"update": [0, 1, 2, 3], "p_GERMINATE": [0.5, 0.1, 0.05, 0.2], "blueprint": ["NORM"] * 4, "style": ["LINEAR_ADD"] * 3 + ["LINEAR_MULTIPLY"]})
    text = describe_first_epoch({7: df})
    assert "seed 7: 0.50 at update 0, 0.05 at its lowest (update 2), 0.20 at the end, taking NORM/LINEAR_MULTIPLY there" in text

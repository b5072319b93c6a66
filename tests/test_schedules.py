"""Fixed schedules: the plan is played within the masks, the grid is as documented, selection is an argmax."""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from esper_lib.constants import BlueprintAction, GerminationStyle, LifecycleOp, SeedStage, TempoAction
from esper_lib.envs.blueprints import CNN_BLUEPRINTS
from esper_lib.envs.morpho import MorphoEnv
from esper_lib.evaluation import schedules as sched
from esper_lib.evaluation.schedules import FixedSchedule, ScheduleController, schedule_grid, select_best_schedule

TINY = dict(max_epochs=10, train_size=100, val_size=40, batches_per_epoch=2)
tiny_fn = functools.partial(MorphoEnv, **TINY)


def _play(env: MorphoEnv, ctrl: ScheduleController, seed: int) -> list[dict]:
    obs, _ = env.reset(seed=seed)
    ctrl.reset(seed=seed)
    infos, done = [], False
    while not done:
        action = ctrl.act(obs)
        obs, _, terminated, truncated, info = env.step(action)
        infos.append({**info, "action": action})
        done = terminated or truncated
    return infos


def test_schedule_controller_never_takes_an_invalid_action():
    env = tiny_fn()
    grid = schedule_grid(max_epochs=TINY["max_epochs"])
    members = [grid[0], grid[len(grid) // 2], grid[-1]]
    members.append(
        FixedSchedule(2, BlueprintAction.CONV_SMALL, 0, tempo=TempoAction.FAST, prune_at=4, extra_seedings=((0, 1, 1),))
    )
    members.append(FixedSchedule(1, BlueprintAction.NORM, 0, tempo=TempoAction.FAST, fossilize_at=None))
    for schedule in members:
        for seed in (0, 1):
            infos = _play(env, ScheduleController(schedule), seed)
            assert all(i["action_valid"] for i in infos), schedule.name


def test_a_schedule_germinates_at_its_epoch_advances_and_fossilizes():
    env = tiny_fn()
    schedule = FixedSchedule(1, BlueprintAction.CONV_LIGHT, germinate_at=2, tempo=TempoAction.FAST)
    infos = _play(env, ScheduleController(schedule), seed=0)
    germ = [i["germinations"] for i in infos]
    assert germ[:2] == [0, 0] and germ[2] == 1 and germ[-1] == 1  # germinated during epoch 2, once
    assert infos[2]["action"][0] == LifecycleOp.GERMINATE and infos[2]["action"][1] == 1
    assert infos[2]["action"][2] == BlueprintAction.CONV_LIGHT
    ops = [int(i["action"][0]) for i in infos]
    assert ops.count(LifecycleOp.ADVANCE) == 2  # GERMINATED -> TRAINING -> BLENDING
    assert infos[-1]["fossilizations"] == 1
    assert infos[-1]["seed_stages"][1] == SeedStage.FOSSILIZED
    # the lifecycle's fastest path: germinate 2, advance 3 (after 1 epoch GERMINATED), advance 5
    # (after 2 epochs TRAINING), blend over epochs 5-7 (FAST = 3), HOLDING seen after 7, fossilize 8
    assert ops == [0, 0, 1, 5, 0, 5, 0, 0, 4, 0]


def test_never_fossilize_and_prune_at():
    env = tiny_fn()
    keep = _play(env, ScheduleController(FixedSchedule(0, 1, 0, tempo=TempoAction.FAST, fossilize_at=None)), 0)
    assert keep[-1]["fossilizations"] == 0 and keep[-1]["seed_stages"][0] == SeedStage.HOLDING
    cut = _play(env, ScheduleController(FixedSchedule(0, 1, 0, prune_at=3)), 0)
    assert cut[-1]["prunes"] == 1 and cut[-1]["germinations"] == 1  # a pruned slot is not refilled
    ops = [int(i["action"][0]) for i in cut]
    # PRUNE is taken at the first epoch >= 3 where the env allows it (by default once the seed is blended)
    at = ops.index(LifecycleOp.PRUNE)
    assert at >= 3 and cut[at - 1]["seed_stages"][0] in (SeedStage.BLENDING, SeedStage.HOLDING)


def test_controller_restarts_its_epoch_count_on_a_new_episode_without_reset():
    env = tiny_fn()
    ctrl = ScheduleController(FixedSchedule(0, 1, germinate_at=1))
    first = _play(env, ctrl, 0)
    obs, _ = env.reset(seed=1)  # no ctrl.reset: the first observation (epoch_progress 0) restarts it
    assert ctrl.act(obs)[0] == LifecycleOp.WAIT and ctrl.epoch == 1
    assert first[1]["germinations"] == 1


def test_grid_has_the_documented_size_and_unique_names():
    grid = schedule_grid(num_slots=3, max_epochs=150)
    assert len(grid) == 3 * len(CNN_BLUEPRINTS) * 2 * 1 == 42
    assert len({s.name for s in grid}) == len(grid)
    assert {s.germinate_at for s in grid} == {0, 37}
    small = schedule_grid(num_slots=2, max_epochs=8, blueprints=[6, 7], germinate_at=[0, 2, 4],
                          tempos=[TempoAction.FAST, TempoAction.SLOW])
    assert len(small) == 2 * 2 * 3 * 2 and len({s.name for s in small}) == 24
    assert small[0].name == "s0-conv_small@0-fast"


def test_grid_spans_the_styles_it_is_given_with_distinct_names():
    styles = (GerminationStyle.LINEAR_ADD, GerminationStyle.LINEAR_MULTIPLY)
    grid = schedule_grid(num_slots=3, max_epochs=16, blueprints=[BlueprintAction.NORM], germinate_at=[0], styles=styles, every_slot=True)
    assert len(grid) == 3 * 2 + 2  # slot x style, then one every-slot member per style
    assert [s.style for s in grid[:2]] == list(styles) and grid[0].slot == grid[1].slot == 0
    assert len({s.name for s in grid}) == len(grid)
    assert grid[-1].name == "s0-norm@0+s1-norm@0+s2-norm@0-standard-linear_multiply"
    assert grid[-1].style == GerminationStyle.LINEAR_MULTIPLY and len(grid[-1].seedings) == 3
    assert len(schedule_grid(num_slots=3, max_epochs=16, styles=tuple(GerminationStyle))) == 4 * len(schedule_grid(num_slots=3, max_epochs=16))


def test_select_best_gives_the_same_table_with_worker_processes():
    grid = schedule_grid(num_slots=3, max_epochs=4, blueprints=[BlueprintAction.NORM, BlueprintAction.CONV_LIGHT], germinate_at=[0])[:4]
    env_fn = functools.partial(MorphoEnv, max_epochs=4, train_size=60, val_size=40, batches_per_epoch=1)
    best1, table1 = select_best_schedule(env_fn, grid, train_seeds=[0, 1], progress=False)
    best2, table2 = select_best_schedule(env_fn, grid, train_seeds=[0, 1], progress=False, workers=2)
    assert best1 == best2
    pd.testing.assert_frame_equal(table1, table2)


def _fake_env_fn():
    class Fake:
        num_slots = 3
        unwrapped = None

        def close(self):
            pass

    env = Fake()
    env.unwrapped = env
    return env


def test_select_best_picks_the_argmax_of_its_table(monkeypatch):
    grid = schedule_grid(max_epochs=8)[:6]
    score = {s.name: v for s, v in zip(grid, [0.1, 0.5, 0.3, 0.5, -1.0, 0.2])}

    def fake_evaluate(controller, env_fn, seeds, name=None, **kw):
        return pd.DataFrame({"controller": name, "seed": list(seeds), "return": [score[name] + 0.01 * s for s in seeds]})

    monkeypatch.setattr(sched, "evaluate_controller", fake_evaluate)
    best, table = select_best_schedule(_fake_env_fn, grid, train_seeds=[0, 1, 2], progress=False)
    assert best is grid[1]  # tie with grid[3] goes to the earlier schedule
    assert table["schedule"].iloc[0] == best.name
    assert table["return_mean"].iloc[0] == pytest.approx(table["return_mean"].max())
    assert table["return_mean"].iloc[0] == pytest.approx(0.51)
    assert list(table["rank"]) == [1, 2, 3, 4, 5, 6] and table["n"].eq(3).all()
    with pytest.raises(ValueError, match="metric 'nope'"):
        select_best_schedule(_fake_env_fn, grid, train_seeds=[0], metric="nope", progress=False)


def test_select_best_on_the_real_env_is_consistent():
    grid = schedule_grid(num_slots=3, max_epochs=4, blueprints=[1], germinate_at=[0])
    best, table = select_best_schedule(functools.partial(MorphoEnv, **{**TINY, "max_epochs": 4}), grid, [0], progress=False)
    assert best.name == table["schedule"].iloc[0] and len(table) == 3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(slot=-1, blueprint=1, germinate_at=0), "slot"),
        (dict(slot=0, blueprint=BlueprintAction.LORA, germinate_at=0), "blueprint"),
        (dict(slot=0, blueprint=1, germinate_at=-2), "germinate_at"),
        (dict(slot=0, blueprint=1, germinate_at=0, fossilize_at=1.5), "fossilize_at"),
        (dict(slot=0, blueprint=1, germinate_at=0, prune_at=-1), "prune_at"),
        (dict(slot=0, blueprint=1, germinate_at=0, tempo=7), "tempo"),
        (dict(slot=0, blueprint=1, germinate_at=0, extra_seedings=((0, 1, 2),)), "extra_seedings"),
        (dict(slot=0, blueprint=1, germinate_at=0, extra_seedings=((1, 99, 2),)), r"extra_seedings\[0\].blueprint"),
    ],
)
def test_bad_schedule_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FixedSchedule(**kwargs)


def test_bad_grid_and_controller_arguments_raise_naming_the_argument():
    with pytest.raises(ValueError, match="num_slots"):
        schedule_grid(num_slots=0)
    with pytest.raises(ValueError, match="max_epochs"):
        schedule_grid(max_epochs=0)
    with pytest.raises(ValueError, match="blueprints"):
        schedule_grid(blueprints=[BlueprintAction.MLP])
    with pytest.raises(ValueError, match="germinate_at"):
        schedule_grid(max_epochs=10, germinate_at=[10])
    with pytest.raises(ValueError, match="tempos"):
        schedule_grid(tempos=[])
    with pytest.raises(ValueError, match="styles"):
        schedule_grid(styles=[])
    with pytest.raises(ValueError, match="styles"):
        schedule_grid(styles=["PLAIN"])
    with pytest.raises(ValueError, match="workers"):
        select_best_schedule(_fake_env_fn, schedule_grid(max_epochs=4)[:2], train_seeds=[0], progress=False, workers=0)
    with pytest.raises(ValueError, match="num_slots"):
        ScheduleController(FixedSchedule(2, 1, 0), num_slots=2)
    with pytest.raises(ValueError, match="schedule"):
        ScheduleController("s0")
    with pytest.raises(ValueError, match="train_seeds"):
        select_best_schedule(_fake_env_fn, schedule_grid(max_epochs=4)[:2], train_seeds=[], progress=False)
    with pytest.raises(ValueError, match="schedules"):
        select_best_schedule(_fake_env_fn, [], train_seeds=[0], progress=False)


def test_headroom_table_pairs_the_three_controllers_on_the_heldout_seeds():
    env_fn = functools.partial(MorphoEnv, **{**TINY, "max_epochs": 4})
    best = FixedSchedule(2, BlueprintAction.CONV_LIGHT, 0, tempo=TempoAction.FAST)
    head = sched.headroom_table(env_fn, best, heldout_seeds=[10, 11, 12], random_seed=3, n_resamples=200)
    ep = head.episodes
    assert sorted(ep.controller.unique()) == ["always_wait", "best_schedule", "random_masked"]
    assert all(sorted(g.seed) == [10, 11, 12] for _, g in ep.groupby("controller"))
    assert (ep.invalid_actions == 0).all()
    assert set(ep.loc[ep.controller == "best_schedule", "schedule"]) == {best.name}
    s = head.summary.set_index("controller")
    assert np.isnan(s.loc["always_wait", "diff_mean"]) and s.loc["best_schedule", "n_pairs"] == 3
    wait = ep[ep.controller == "always_wait"].set_index("seed")["return"]
    mine = ep[ep.controller == "best_schedule"].set_index("seed")["return"]
    assert s.loc["best_schedule", "diff_mean"] == pytest.approx(float((mine - wait).mean()))
    with pytest.raises(ValueError, match="heldout_seeds"):
        sched.headroom_table(env_fn, best, heldout_seeds=[])


def test_random_seed_changes_the_random_policy_but_not_the_pairing():
    from esper_lib.evaluation.baselines import EpisodeSeededRandomController

    a = EpisodeSeededRandomController(0)
    b = EpisodeSeededRandomController(1)
    a.reset(seed=5), b.reset(seed=5)
    assert a.rng.integers(1 << 30) != b.rng.integers(1 << 30)
    c = EpisodeSeededRandomController(0)
    c.reset(seed=7), c.rng.random(), c.reset(seed=5)  # the stream of episode 5 does not depend on what came before
    a.reset(seed=5)
    assert a.rng.integers(1 << 30) == c.rng.integers(1 << 30)


def test_schedule_round_trips_through_json():
    import json

    from esper_lib.evaluation.schedules import schedule_from_dict, schedule_to_dict

    for s in schedule_grid(max_epochs=8)[:5] + [FixedSchedule(1, BlueprintAction.NORM, 2, prune_at=5, fossilize_at=None, extra_seedings=((2, BlueprintAction.CONV_LIGHT, 3),))]:
        back = schedule_from_dict(json.loads(json.dumps(schedule_to_dict(s))))
        assert back == s and back.name == s.name
    with pytest.raises(ValueError, match="unknown key"):
        schedule_from_dict({"slot": 0, "blueprint": "NORM", "germinate_at": 0, "colour": 1})
    with pytest.raises(ValueError, match="blueprint"):
        schedule_from_dict({"slot": 0, "blueprint": "NOPE", "germinate_at": 0})


def test_every_slot_members_seed_each_slot():
    grid = schedule_grid(num_slots=3, max_epochs=10, tempos=(TempoAction.FAST,), every_slot=True)
    multi = [s for s in grid if s.extra_seedings]
    assert len(grid) == 3 * len(CNN_BLUEPRINTS) * 2 + len(CNN_BLUEPRINTS) and len(multi) == len(CNN_BLUEPRINTS)
    assert len({s.name for s in grid}) == len(grid)
    env = tiny_fn()
    infos = _play(env, ScheduleController(multi[0]), 0)
    assert infos[-1]["germinations"] == 3 and all(i["action_valid"] for i in infos)

"""The morphogenetic env: API, masks, lifecycle, observation, reward, reproducibility, vector envs."""
from __future__ import annotations

import functools
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from esper_lib.constants import (
    NUM_OPS,
    AlphaSpeedAction,
    AlphaTargetAction,
    BlueprintAction,
    GerminationStyle,
    LifecycleOp,
    SeedStage,
    TempoAction,
)
from esper_lib.envs.blueprints import CNN_BLUEPRINTS, build_blueprint, parameter_count
from esper_lib.envs.lifecycle import DWELL_EPOCHS, MIN_EPOCHS_TRAINING, curve_value
from esper_lib.envs.morpho import MORPHO_ENV_ID, MorphoEnv, make_morpho_env
from esper_lib.envs.spaces import action_space, observation_space
from esper_lib.evaluation.baselines import RandomMaskedController, make_action
from esper_lib.observation import FEATURE_BOUND, feature_index, observation_layout

# Tiny data so a step is a few milliseconds: 2 minibatches of 32, 40 validation images.
# prune_before_blending: the lifecycle tests below drive every PRUNE path (the default gate has its own test)
TINY = dict(max_epochs=12, train_size=64, val_size=40, batch_size=32, prune_before_blending=True)
Op, Stage = LifecycleOp, SeedStage


def tiny_env(**overrides) -> MorphoEnv:
    return MorphoEnv(**{**TINY, **overrides})


def feat(obs: dict, name: str) -> float:
    return float(obs["state"][feature_index(name)])


def stage_of(obs: dict, slot: int) -> SeedStage:
    onehot = [feat(obs, f"slot{slot}.stage_{s.name.lower()}") for s in SeedStage]
    assert sorted(onehot) == [0.0] * (len(SeedStage) - 1) + [1.0]
    return SeedStage(int(np.argmax(onehot)))


def germinate(slot: int, bp=BlueprintAction.CONV_SMALL, style=GerminationStyle.LINEAR_ADD, target=AlphaTargetAction.FULL):
    return make_action(Op.GERMINATE, slot=slot, blueprint=int(bp), style=int(style), tempo=int(TempoAction.FAST), alpha_target=int(target))


WAIT = make_action(Op.WAIT)


def step_ok(env: MorphoEnv, action: np.ndarray) -> dict:
    obs, _, _, _, info = env.step(action)
    assert info["action_valid"] and info["action_executed"], f"refused: {action}"
    return obs


def drive_to(env: MorphoEnv, slot: int, stage: SeedStage, **germ) -> dict:
    """Reach ``stage`` in ``slot`` through valid actions only (DORMANT .. HOLDING)."""
    obs, _ = env.reset(seed=0)
    if stage == Stage.DORMANT:
        return obs
    obs = step_ok(env, germinate(slot, **germ))
    if stage == Stage.GERMINATED:
        return obs
    obs = step_ok(env, make_action(Op.ADVANCE, slot=slot))
    while not obs["action_mask"]["slot_by_op"][Op.ADVANCE, slot]:
        obs = step_ok(env, WAIT)
    if stage == Stage.TRAINING:
        return obs
    obs = step_ok(env, make_action(Op.ADVANCE, slot=slot))
    if stage == Stage.BLENDING:
        return obs
    while stage_of(obs, slot) != Stage.HOLDING:
        obs = step_ok(env, WAIT)
    return obs


# ------------------------------------------------------------------------------ API


def test_check_env_passes_and_spaces_are_the_shared_ones():
    env = tiny_env()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # informative warnings (no spec, render) are not failures
        check_env(env, skip_render_check=True)
    assert env.observation_space == observation_space(3)
    assert env.action_space == action_space(3)
    registered = gym.make(MORPHO_ENV_ID, **TINY)
    assert isinstance(registered.unwrapped, MorphoEnv)
    check_env(registered.unwrapped, skip_render_check=True)
    assert isinstance(make_morpho_env(**TINY), MorphoEnv)


def test_episode_terminates_at_max_epochs_and_never_truncates():
    """The host's run has a fixed length: its last epoch ends the task (no bootstrap past it)."""
    env = tiny_env(max_epochs=3)
    env.reset(seed=1)
    flags = [env.step(WAIT)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (True, False)]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(WAIT)


def test_reward_is_sum_of_terms_and_terminal_only_at_the_end():
    env = tiny_env(max_epochs=4)
    env.reset(seed=2)
    prev = None
    for t in range(4):
        _, reward, terminated, _, info = env.step(germinate(0) if t == 0 else WAIT)
        terms = info["reward_terms"]
        assert set(terms) == {"accuracy_delta", "rent", "terminal"}
        assert reward == pytest.approx(sum(terms.values()))
        assert terms["terminal"] == (pytest.approx(info["val_accuracy"]) if terminated else 0.0)
        if prev is not None:
            assert terms["accuracy_delta"] == pytest.approx(info["val_accuracy"] - prev)
        prev = info["val_accuracy"]
        for key in ("val_accuracy", "val_loss", "train_loss", "train_accuracy"):
            assert np.isfinite(info[key])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_epochs": 0}, "max_epochs"),
        ({"max_epochs": 2.5}, "max_epochs"),
        ({"num_slots": 2}, "num_slots"),
        ({"host_channels": (16, 0, 32)}, "host_channels"),
        ({"seed_budget": -1}, "seed_budget"),
        ({"rent_coef": -0.1}, "rent_coef"),
        ({"rent_coef": float("nan")}, "rent_coef"),
        ({"terminal_coef": -1.0}, "terminal_coef"),
        ({"lr": 0.0}, "lr"),
        ({"seed_lr": -1e-3}, "seed_lr"),
        ({"seed_lr": []}, "seed_lr"),
        ({"seed_lr": [5e-3, 0.0]}, r"seed_lr\[1\]"),
        ({"batch_size": 0}, "batch_size"),
        ({"batches_per_epoch": 0}, "batches_per_epoch"),
        ({"train_size": 5}, "train_size"),
        ({"train_size": 5000}, "train_size"),
        ({"val_size": 3}, "val_size"),
        ({"data_seed": -2}, "data_seed"),
        ({"counterfactual_every": 0}, "counterfactual_every"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_bad_constructor_args_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MorphoEnv(**{**TINY, **kwargs})


def test_global_torch_state_is_left_alone():
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    env = tiny_env(num_threads=1)
    env.reset(seed=3)
    env.step(germinate(1))
    env.step(make_action(Op.ADVANCE, slot=1))
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)


# ------------------------------------------------------------------------------ observation


def test_reset_uses_minus_one_for_everything_not_yet_observed():
    env = tiny_env()
    obs, info = env.reset(seed=0)
    state = obs["state"]
    not_observed = [f for f in observation_layout(3) if "-1 before" in f.normalisation or "-1 without" in f.normalisation]
    assert len(not_observed) > 40
    for f in not_observed:
        assert np.all(state[f.slice] == -1.0), f.name
    assert feat(obs, "epoch_progress") == 0.0
    assert feat(obs, "seed_budget_used") == 0.0
    for i in range(3):
        assert stage_of(obs, i) == Stage.DORMANT
        assert feat(obs, f"slot{i}.has_seed") == 0.0
    assert obs["blueprint_indices"].tolist() == [-1, -1, -1]
    assert 0.0 <= info["initial_val_accuracy"] <= 1.0


def test_history_fills_oldest_first_and_tracks_the_best():
    env = tiny_env()
    env.reset(seed=4)
    accs = []
    for _ in range(3):
        obs, _, _, _, info = env.step(WAIT)
        accs.append(info["val_accuracy"])
    hist = [feat(obs, f"val_accuracy_hist_{i}") for i in range(5)]
    assert hist[:2] == [-1.0, -1.0]
    assert hist[2:] == pytest.approx(accs)
    assert feat(obs, "val_accuracy") == pytest.approx(accs[-1])
    assert feat(obs, "best_accuracy") == pytest.approx(max(accs))
    assert feat(obs, "epoch_progress") == pytest.approx(3 / TINY["max_epochs"])
    assert feat(obs, "last_action_success") == 1.0 and feat(obs, "last_op_wait") == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_features_finite_and_bounded_over_random_episodes(seed):
    env = tiny_env(max_epochs=14, seed_budget=4)
    masked = RandomMaskedController(seed=seed, wait_prob=0.3)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    seen_stages = set()
    for t in range(14):
        assert obs in env.observation_space
        state = obs["state"]
        assert state.dtype == np.float32 and np.all(np.isfinite(state))
        assert np.all(np.abs(state) <= FEATURE_BOUND)
        # mostly valid random actions, some fully random (often invalid) ones
        action = env.action_space.sample() if rng.random() < 0.2 else masked.act(obs)
        obs, reward, _, _, info = env.step(action)
        assert np.isfinite(reward)
        seen_stages.update(info["seed_stages"].tolist())
    assert len(seen_stages) >= 3


# ------------------------------------------------------------------------------ masks

# Valid ops of one slot for (stage, epochs_in_stage), with seed budget left.
MASK_TABLE = [
    (Stage.DORMANT, 0, {Op.GERMINATE}),
    (Stage.GERMINATED, 0, {Op.PRUNE}),
    (Stage.GERMINATED, 1, {Op.PRUNE, Op.ADVANCE}),
    (Stage.TRAINING, MIN_EPOCHS_TRAINING - 1, {Op.PRUNE}),
    (Stage.TRAINING, MIN_EPOCHS_TRAINING, {Op.PRUNE, Op.ADVANCE}),
    (Stage.BLENDING, 1, {Op.PRUNE, Op.SET_ALPHA_TARGET}),
    (Stage.HOLDING, 1, {Op.PRUNE, Op.SET_ALPHA_TARGET, Op.FOSSILIZE}),
    (Stage.FOSSILIZED, 5, set()),
    (Stage.PRUNING, 1, set()),
    (Stage.PRUNED, 1, set()),
    (Stage.EMBARGOED, 2, set()),
    (Stage.RESETTING, 1, set()),
]


def _set_slots(env: MorphoEnv, states: list[tuple[SeedStage, int]]) -> dict:
    for slot, (stage, eis) in zip(env.host.slots, states):
        slot.stage, slot.epochs_in_stage = stage, eis
    return env.action_masks()


@pytest.mark.parametrize("stage, eis, expected", MASK_TABLE, ids=[f"{s.name}-{e}" for s, e, _ in MASK_TABLE])
def test_masks_follow_the_lifecycle_table(stage, eis, expected):
    env = tiny_env()
    env.reset(seed=0)
    masks = _set_slots(env, [(Stage.FOSSILIZED, 3), (stage, eis), (Stage.FOSSILIZED, 3)])
    by_op = masks["slot_by_op"]
    assert by_op.shape == (NUM_OPS, 3) and by_op.dtype == np.int8
    assert {Op(o) for o in range(1, NUM_OPS) if by_op[o, 1]} == expected
    assert not by_op[1:, [0, 2]].any()  # the fossilized neighbours accept nothing
    assert by_op[Op.WAIT].all() and masks["op"][Op.WAIT] == 1
    # op valid iff its row has a valid slot; slot mask is the union of the valid ops' rows
    assert [bool(masks["op"][o]) for o in range(1, NUM_OPS)] == [bool(by_op[o].any()) for o in range(1, NUM_OPS)]
    assert masks["slot"].tolist() == ([0, 1, 0] if expected else [1, 1, 1])
    assert masks["blueprint"].tolist() == [int(BlueprintAction(b) in CNN_BLUEPRINTS) for b in range(13)]
    for head in ("style", "tempo", "alpha_target", "alpha_speed", "alpha_curve"):
        assert masks[head].all()


def test_germinate_is_masked_once_the_budget_is_spent():
    env = tiny_env(seed_budget=1)
    obs, _ = env.reset(seed=0)
    assert obs["action_mask"]["slot_by_op"][Op.GERMINATE].tolist() == [1, 1, 1]
    obs = step_ok(env, germinate(0))
    assert obs["action_mask"]["op"][Op.GERMINATE] == 0
    assert not obs["action_mask"]["slot_by_op"][Op.GERMINATE].any()
    assert feat(obs, "seed_budget_used") == 1.0
    obs, _, _, _, info = env.step(germinate(1))
    assert not info["action_valid"] and stage_of(obs, 1) == Stage.DORMANT


# ------------------------------------------------------------------------------ lifecycle

# (stage reached by valid actions in slot 1, action on slot 1, stage in the next observation)
TRANSITIONS = [
    (Stage.DORMANT, germinate(1), Stage.GERMINATED),
    (Stage.GERMINATED, make_action(Op.ADVANCE, slot=1), Stage.TRAINING),
    (Stage.TRAINING, make_action(Op.ADVANCE, slot=1), Stage.BLENDING),
    (Stage.GERMINATED, make_action(Op.PRUNE, slot=1, alpha_speed=int(AlphaSpeedAction.INSTANT)), Stage.PRUNED),
    (Stage.TRAINING, make_action(Op.PRUNE, slot=1, alpha_speed=int(AlphaSpeedAction.FAST)), Stage.PRUNING),
    (Stage.BLENDING, make_action(Op.PRUNE, slot=1, alpha_speed=int(AlphaSpeedAction.INSTANT)), Stage.PRUNED),
    (Stage.BLENDING, make_action(Op.PRUNE, slot=1, alpha_speed=int(AlphaSpeedAction.SLOW), alpha_curve=3), Stage.PRUNING),
    (Stage.BLENDING, make_action(Op.SET_ALPHA_TARGET, slot=1, alpha_target=0, alpha_speed=0), Stage.HOLDING),
    (Stage.BLENDING, make_action(Op.SET_ALPHA_TARGET, slot=1, alpha_target=0, alpha_speed=2), Stage.BLENDING),
    (Stage.HOLDING, make_action(Op.SET_ALPHA_TARGET, slot=1, alpha_target=0, alpha_speed=1, alpha_curve=1), Stage.BLENDING),
    (Stage.HOLDING, make_action(Op.SET_ALPHA_TARGET, slot=1, alpha_target=0, alpha_speed=0), Stage.HOLDING),
    (Stage.HOLDING, make_action(Op.FOSSILIZE, slot=1), Stage.FOSSILIZED),
    (Stage.HOLDING, make_action(Op.PRUNE, slot=1, alpha_speed=0), Stage.PRUNED),
]


@pytest.mark.parametrize(
    "start, action, expected", TRANSITIONS, ids=[f"{s.name}-{Op(a[0]).name}-{e.name}" for s, a, e in TRANSITIONS]
)
def test_every_valid_action_moves_the_slot_to_the_expected_stage(start, action, expected):
    env = tiny_env()
    obs = drive_to(env, 1, start)
    assert stage_of(obs, 1) == start
    op = Op(int(action[0]))
    assert obs["action_mask"]["op"][op] and obs["action_mask"]["slot_by_op"][op, 1]
    obs, _, _, _, info = env.step(action)
    assert info["action_valid"]
    assert stage_of(obs, 1) == expected
    assert info["seed_stages"][1] == expected
    assert stage_of(obs, 0) == stage_of(obs, 2) == Stage.DORMANT


def test_blend_ramps_alpha_to_the_target_then_holds():
    env = tiny_env()
    obs = drive_to(env, 1, Stage.TRAINING, target=AlphaTargetAction.SEVENTY)
    assert feat(obs, "slot1.alpha") == 0.0 and feat(obs, "slot1.alpha_target") == pytest.approx(0.7)
    alphas, stages = [], []
    obs = step_ok(env, make_action(Op.ADVANCE, slot=1))
    for _ in range(3):
        alphas.append(feat(obs, "slot1.alpha"))
        stages.append(stage_of(obs, 1))
        if stages[-1] == Stage.BLENDING:
            assert feat(obs, "slot1.alpha_mode") == 1.0
        obs = step_ok(env, WAIT)
    # FAST tempo: 3 epochs, linear curve: 0.7/3, 1.4/3, then 0.7 and HOLDING
    assert alphas == pytest.approx([0.7 / 3, 1.4 / 3, 0.7], abs=1e-6)
    assert stages == [Stage.BLENDING, Stage.BLENDING, Stage.HOLDING]
    assert feat(obs, "slot1.alpha_mode") == 0.0 and feat(obs, "slot1.alpha_steps_left") == 0.0


def test_prune_paths_and_embargo_durations():
    env = tiny_env()
    drive_to(env, 1, Stage.GERMINATED)
    obs = step_ok(env, make_action(Op.PRUNE, slot=1, alpha_speed=0))
    stages = [stage_of(obs, 1)]
    for _ in range(6):
        obs = step_ok(env, WAIT)
        stages.append(stage_of(obs, 1))
    expected = (
        [Stage.PRUNED] * DWELL_EPOCHS[Stage.PRUNED]
        + [Stage.EMBARGOED] * DWELL_EPOCHS[Stage.EMBARGOED]
        + [Stage.RESETTING] * DWELL_EPOCHS[Stage.RESETTING]
    )
    assert stages[: len(expected)] == expected and stages[len(expected)] == Stage.DORMANT
    assert obs["action_mask"]["slot_by_op"][Op.GERMINATE, 1] == 1
    assert obs["blueprint_indices"][1] == -1 and feat(obs, "slot1.has_seed") == 0.0

    # a blended seed pruned with the MEDIUM speed ramps alpha down over 5 epochs, then PRUNED
    obs = drive_to(env, 1, Stage.HOLDING)
    obs = step_ok(env, make_action(Op.PRUNE, slot=1, alpha_speed=int(AlphaSpeedAction.MEDIUM), alpha_curve=1))
    alphas = []
    while stage_of(obs, 1) == Stage.PRUNING:
        assert feat(obs, "slot1.alpha_mode") == -1.0
        alphas.append(feat(obs, "slot1.alpha"))
        obs = step_ok(env, WAIT)
    assert len(alphas) == 4 and stage_of(obs, 1) == Stage.PRUNED  # 5th epoch reaches 0 and prunes
    assert all(a > b for a, b in zip(alphas, alphas[1:]))
    assert alphas == pytest.approx([1.0 - curve_value(1, k / 5) for k in range(1, 5)], abs=1e-6)


def test_invalid_actions_are_refused_and_flagged():
    env = tiny_env()
    env.reset(seed=5)
    invalid = [
        make_action(Op.ADVANCE, slot=0),  # nothing to advance
        make_action(Op.FOSSILIZE, slot=2),
        make_action(Op.SET_ALPHA_TARGET, slot=1),
        germinate(0, bp=BlueprintAction.LORA),  # blueprint masked for a CNN
        germinate(0, bp=BlueprintAction.NOOP),
    ]
    for action in invalid:
        obs, reward, _, _, info = env.step(action)
        assert info["action_valid"] is False and info["action_executed"] is False
        assert feat(obs, "last_action_success") == 0.0
        assert feat(obs, f"last_op_{Op(int(action[0])).name.lower()}") == 1.0
        assert info["seed_stages"].tolist() == [0, 0, 0] and info["germinations"] == 0
        assert np.isfinite(reward)
    obs = step_ok(env, germinate(0))
    assert feat(obs, "last_action_success") == 1.0
    obs, _, _, _, info = env.step(germinate(0))  # slot now occupied
    assert not info["action_valid"] and info["germinations"] == 1


@pytest.mark.parametrize(
    "bad", [np.zeros(7, dtype=np.int64), np.array([6, 0, 0, 0, 0, 0, 0, 0]), np.array([0, 3, 0, 0, 0, 0, 0, 0]), np.zeros(8) + 0.5]
)
def test_actions_outside_the_action_space_raise(bad):
    env = tiny_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(bad)


# ------------------------------------------------------------------------------ seeds and host


def test_training_seed_is_isolated_from_the_host():
    env = tiny_env()
    drive_to(env, 0, Stage.TRAINING, bp=BlueprintAction.CONV_HEAVY)
    host, slot = env.host, env.host.slots[0]
    # give the seed a non-trivial output so isolation is really tested
    with torch.no_grad():
        for p in slot.seed.parameters():
            p.normal_(0, 0.5)
    x, y = env._data.x_train[:16], env._data.y_train[:16]

    def grads():
        host.zero_grad(set_to_none=True)
        slot.seed.zero_grad(set_to_none=True)
        logits = host(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        return logits.detach(), [p.grad.clone() for p in host.host_parameters()]

    logits_with, g_with = grads()
    seed_grads = [p.grad for p in slot.seed.parameters()]
    slot.stage = Stage.DORMANT  # same host without the seed in the path
    logits_without, g_without = grads()
    slot.stage = Stage.TRAINING
    assert torch.equal(logits_with, logits_without)
    assert all(torch.equal(a, b) for a, b in zip(g_with, g_without))
    assert any(g is not None and g.abs().sum() > 0 for g in seed_grads)  # the seed learns on the host's error


def test_rent_counts_the_seed_parameters():
    env = tiny_env(rent_coef=0.5, max_epochs=10)
    env.reset(seed=0)
    _, _, _, _, info = env.step(WAIT)
    assert info["reward_terms"]["rent"] == 0.0 and info["seed_params"] == 0
    obs, _, _, _, info = env.step(germinate(2, bp=BlueprintAction.CONV_HEAVY))
    c1, c2 = env.host_channels[1], env.host_channels[2]
    n = parameter_count(build_blueprint(BlueprintAction.CONV_HEAVY, c2))
    host = env.host.base_param_count
    assert info["seed_params"] == n
    assert info["reward_terms"]["rent"] == pytest.approx(-0.5 * n / host / 10)
    assert feat(obs, "seed_param_ratio") == pytest.approx(n / host)
    assert feat(obs, "slot2.seed_param_ratio") == pytest.approx(n / host)
    # a gated seed also pays for its gate
    obs, _, _, _, info = env.step(germinate(1, bp=BlueprintAction.NORM, style=GerminationStyle.GATED_GATE))
    assert info["seed_params"] == n + parameter_count(build_blueprint(BlueprintAction.NORM, c1)) + 2 * c1


def test_fossilized_seed_stays_in_the_host():
    env = tiny_env()
    drive_to(env, 1, Stage.HOLDING, bp=BlueprintAction.CONV_SMALL)
    base = env.host.param_count()
    n = env.host.slots[1].param_count()
    obs, _, _, _, info = env.step(make_action(Op.FOSSILIZE, slot=1))
    slot = env.host.slots[1]
    assert info["host_params"] == base + n and info["fossilizations"] == 1
    before = [p.detach().clone() for p in slot.seed.parameters()]
    for _ in range(2):
        obs, _, _, _, info = env.step(WAIT)
    assert stage_of(obs, 1) == Stage.FOSSILIZED and info["seed_params"] == n
    assert obs["blueprint_indices"][1] == int(BlueprintAction.CONV_SMALL)
    assert not obs["action_mask"]["slot_by_op"][1:, 1].any()  # the slot stays occupied
    # still trained by the host optimizer, still in the forward, still measured
    assert any(not torch.equal(a, p) for a, p in zip(before, slot.seed.parameters()))
    with torch.no_grad():
        logits, cache = env.host.forward_cached(env._data.x_val)
        assert not torch.equal(logits, env.host.forward_ablated(cache, {1}))
    assert feat(obs, "slot1.counterfactual_freshness") == 1.0 and feat(obs, "seeds_holding_or_fossilized") == pytest.approx(1 / 3)


def test_counterfactual_contribution_matches_an_independent_ablation():
    env = tiny_env()
    obs = drive_to(env, 0, Stage.HOLDING, bp=BlueprintAction.CONV_HEAVY)
    slot = env.host.slots[0]
    x, y = env._data.x_val, env._data.y_val
    with torch.no_grad():
        acc = (env.host(x).argmax(1) == y).float().mean().item()
        alpha, slot.alpha = slot.alpha, 0.0
        acc0 = (env.host(x).argmax(1) == y).float().mean().item()
        slot.alpha = alpha
    assert slot.stats.contribution == pytest.approx(acc - acc0)
    assert feat(obs, "slot0.contribution") == pytest.approx(np.clip((acc - acc0) * 10, -1, 1), abs=1e-6)
    assert feat(obs, "slot0.interaction") == 0.0  # a single active seed
    assert feat(obs, "slot0.grad_health") >= 0.0 and feat(obs, "slot0.grad_norm") > -1.0


def test_pairwise_interaction_of_two_active_seeds():
    env = tiny_env()
    env.reset(seed=6)
    script = [germinate(0, bp=BlueprintAction.CONV_HEAVY), germinate(2, bp=BlueprintAction.CONV_SMALL)]
    script += [make_action(Op.ADVANCE, slot=0), make_action(Op.ADVANCE, slot=2), WAIT]
    script += [make_action(Op.ADVANCE, slot=0), make_action(Op.ADVANCE, slot=2), WAIT, WAIT, WAIT]
    for action in script:
        obs = step_ok(env, action)
    assert [stage_of(obs, i) for i in (0, 2)] == [Stage.HOLDING, Stage.HOLDING]
    slots, x, y = env.host.slots, env._data.x_val, env._data.y_val

    def acc(off: tuple[int, ...]) -> float:
        saved = [slots[i].alpha for i in off]
        for i in off:
            slots[i].alpha = 0.0
        with torch.no_grad():
            a = (env.host(x).argmax(1) == y).float().mean().item()
        for i, s in zip(off, saved):
            slots[i].alpha = s
        return a

    interaction = acc(()) - acc((0,)) - acc((2,)) + acc((0, 2))
    for i in (0, 2):
        assert slots[i].stats.interaction == pytest.approx(interaction, abs=1e-6)
        assert feat(obs, f"slot{i}.interaction") == pytest.approx(np.clip(interaction * 10, -1, 1), abs=1e-6)
        assert slots[i].stats.contribution == pytest.approx(acc(()) - acc((i,)), abs=1e-6)
    assert feat(obs, "slot1.interaction") == 0.0


def test_counterfactual_every_k_epochs_decays_freshness():
    env = tiny_env(counterfactual_every=3)
    obs = drive_to(env, 1, Stage.HOLDING)
    fresh = [feat(obs, "slot1.counterfactual_freshness")]
    for _ in range(3):
        obs = step_ok(env, WAIT)
        fresh.append(feat(obs, "slot1.counterfactual_freshness"))
    # measured every 3rd epoch: 1, then 0.8 and 0.64 before the next measurement
    for prev, nxt in zip(fresh, fresh[1:]):
        assert nxt == 1.0 or nxt == pytest.approx(0.8 * prev)
    assert 1 <= fresh.count(1.0) <= 2  # 4 observations, one measurement every 3 epochs
    assert any(f == pytest.approx(0.64) for f in fresh)


def test_all_cnn_blueprints_and_styles_run():
    env = tiny_env(max_epochs=40, seed_budget=20)
    env.reset(seed=0)
    for k, bp in enumerate(CNN_BLUEPRINTS):
        slot = k % 3
        style = GerminationStyle(k % 4)
        step_ok(env, germinate(slot, bp=bp, style=style))
        step_ok(env, make_action(Op.ADVANCE, slot=slot))
        step_ok(env, make_action(Op.PRUNE, slot=slot, alpha_speed=0))
        assert env.host.slots[slot].stage == Stage.PRUNED
        while env.host.slots[(k + 1) % 3].stage != Stage.DORMANT:
            step_ok(env, WAIT)
    assert env._germinations == len(CNN_BLUEPRINTS) == 7


# ------------------------------------------------------------------------------ reproducibility and vector envs


def _rollout(env: MorphoEnv, seed: int, steps: int = 8):
    ctrl = RandomMaskedController(seed=seed, wait_prob=0.4)
    obs, _ = env.reset(seed=seed)
    out = [obs["state"].copy()]
    for _ in range(steps):
        obs, r, _, _, info = env.step(ctrl.act(obs))
        out += [obs["state"].copy(), np.array([r, info["val_accuracy"], info["train_loss"]])]
    return out


def test_same_seed_same_episode_different_seed_different_episode():
    a, b = _rollout(tiny_env(), 7), _rollout(tiny_env(), 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = _rollout(tiny_env(), 8)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # the same env instance reproduces itself after other episodes, also with data_seed=None
    env = tiny_env(data_seed=None)
    first = _rollout(env, 3, steps=3)
    _rollout(env, 4, steps=2)
    assert all(np.array_equal(x, y) for x, y in zip(first, _rollout(env, 3, steps=3)))


def test_a_seed_lr_sequence_draws_one_value_per_episode_from_the_episode_seed():
    fixed, mixed = tiny_env(seed_lr=0.3), tiny_env(seed_lr=[5e-3, 0.3])
    drawn = {seed: mixed.reset(seed=seed)[1]["seed_lr"] for seed in range(12)}
    assert set(drawn.values()) == {5e-3, 0.3}  # both occur over a dozen episodes
    assert all(mixed.reset(seed=s)[1]["seed_lr"] == v for s, v in drawn.items())  # a function of the seed
    seed = next(s for s, v in drawn.items() if v == 0.3)
    obs_f, info_f = fixed.reset(seed=seed)
    obs_m, info_m = mixed.reset(seed=seed)
    assert info_f["seed_lr"] == 0.3 and np.array_equal(obs_f["state"], obs_m["state"])  # same host and data
    for env in (fixed, mixed):  # the germinated seed learns at the episode's rate
        step_ok(env, germinate(0))
        assert env.host.slots[0].optimizer.lr == 0.3
    assert tiny_env(seed_lr=np.array([5e-3, 0.3])).seed_lr_choices == (5e-3, 0.3)  # an array works like a list
    # a one-value sequence is the plain float, bit for bit
    assert all(np.array_equal(x, y) for x, y in zip(_rollout(tiny_env(seed_lr=[0.3]), 5), _rollout(tiny_env(seed_lr=0.3), 5)))


def test_the_seed_gradient_telemetry_reveals_a_high_seed_lr_after_its_first_training_epoch():
    """Not seed by seed (a seed at lr 1.0 whose units die has small gradients), but by far in the median."""
    norms = {}
    for lr in (5e-3, 1.0):
        env = tiny_env(seed_lr=lr, train_size=256)  # 8 minibatches: the high rate has time to show
        norms[lr] = []
        for seed in range(6):
            env.reset(seed=seed)
            step_ok(env, germinate(0, bp=BlueprintAction.CONV_HEAVY))
            obs = step_ok(env, make_action(Op.ADVANCE, slot=0))  # GERMINATED -> TRAINING: the seed learns this epoch
            norms[lr].append(np.expm1(7 * feat(obs, "slot0.grad_norm")))  # the feature is symlog(norm) / 7
    assert np.median(norms[1.0]) > 5 * np.median(norms[5e-3]) > 0, norms


@pytest.mark.parametrize("vector_cls", [gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv])
def test_vector_envs_step(vector_cls):
    fn = functools.partial(make_morpho_env, **{**TINY, "max_epochs": 2})
    venv = vector_cls([fn, fn])
    try:
        obs, _ = venv.reset(seed=[11, 12])
        assert obs["state"].shape == (2, 121) and obs["blueprint_indices"].shape == (2, 3)
        assert obs["action_mask"]["slot_by_op"].shape == (2, NUM_OPS, 3)
        actions = np.stack([germinate(0), make_action(Op.WAIT)])
        obs, reward, term, trunc, info = venv.step(actions)
        assert reward.shape == (2,) and not term.any() and not trunc.any()
        assert info["seed_stages"][0].tolist() == [int(Stage.GERMINATED), 0, 0]
        rent = info["reward_terms"]["rent"]
        assert rent[0] < 0.0 and rent[1] == 0.0
        obs, reward, term, trunc, info = venv.step(actions)
        assert term.all() and not trunc.any()
        assert np.all(np.isfinite(obs["state"]))
    finally:
        venv.close()


def test_step_trains_the_host_inside_no_grad() -> None:
    """A rollout loop may run under torch.no_grad(); the host epoch must still learn."""
    import torch

    from esper_lib.envs.morpho import MorphoEnv

    env = MorphoEnv(max_epochs=3, batches_per_epoch=2, train_size=200, val_size=100)
    env.reset(seed=0)
    before = [p.detach().clone() for p in env.host.parameters()]
    with torch.no_grad():
        env.step(np.zeros(8, dtype=np.int64))
    assert any(not torch.equal(a, b) for a, b in zip(before, env.host.parameters()))


def test_by_default_prune_waits_until_the_seed_is_in_the_host_stream():
    env = MorphoEnv(**{**TINY, "prune_before_blending": False})
    env.reset(seed=3)
    obs = step_ok(env, germinate(1))
    seen = {}
    for action in (make_action(Op.ADVANCE, slot=1), WAIT, make_action(Op.ADVANCE, slot=1)):
        seen[stage_of(obs, 1)] = bool(obs["action_mask"]["slot_by_op"][Op.PRUNE, 1])
        obs = step_ok(env, action)
    seen[stage_of(obs, 1)] = bool(obs["action_mask"]["slot_by_op"][Op.PRUNE, 1])
    assert seen == {Stage.GERMINATED: False, Stage.TRAINING: False, Stage.BLENDING: True}
    obs, _, _, _, info = env.step(make_action(Op.PRUNE, slot=1, alpha_speed=0))
    assert info["action_valid"] and info["prunes"] == 1
    with pytest.raises(ValueError, match="prune_before_blending"):
        MorphoEnv(prune_before_blending=1)


def test_unseeded_resets_follow_the_last_seed_whatever_the_actions():
    """Two envs reset with one seed play the same hosts in their later (unseeded) episodes, whatever they did."""
    kwargs = dict(max_epochs=3, train_size=64, val_size=40, batch_size=32)
    a, b = MorphoEnv(**kwargs), MorphoEnv(**kwargs)
    a.reset(seed=11)
    b.reset(seed=11)
    grow = make_action(LifecycleOp.GERMINATE, slot=0, blueprint=int(CNN_BLUEPRINTS[0]))
    for t in range(3):  # a germinates (drawing a seed-module init from np_random), b waits
        a.step(grow if t == 0 else make_action(LifecycleOp.WAIT))
        b.step(make_action(LifecycleOp.WAIT))
    (obs_a, info_a), (obs_b, info_b) = a.reset(), b.reset()
    assert info_a["initial_val_accuracy"] == info_b["initial_val_accuracy"]
    np.testing.assert_array_equal(obs_a["state"], obs_b["state"])
    for pa, pb in zip(a.host.host_parameters(), b.host.host_parameters()):
        assert torch.equal(pa, pb)
    c = MorphoEnv(**kwargs)
    c.reset(seed=12)
    c.reset()  # another seed's second episode: another host
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.host.host_parameters(), c.host.host_parameters()))


@pytest.mark.parametrize("style", list(GerminationStyle))
@pytest.mark.parametrize("blueprint", CNN_BLUEPRINTS)
def test_a_fresh_seed_blended_at_full_alpha_leaves_the_host_unchanged(style, blueprint):
    """Zero-init convention: every style's delta is 0 for a seed that has learned nothing."""
    from esper_lib.envs.blueprints import ChannelGate
    from esper_lib.envs.lifecycle import SeedSlot

    torch.manual_seed(0)
    slot = SeedSlot(0, 8)
    slot.germinate(build_blueprint(blueprint, 8), ChannelGate(8), blueprint, style, TempoAction.FAST, 1.0)
    slot.advance(1)
    slot.advance(1)  # TRAINING -> BLENDING
    slot.alpha = 1.0
    h = torch.randn(2, 8, 4, 4)
    assert torch.equal(slot(h), h)


@pytest.mark.parametrize("native_kernels", [False, True])
def test_forward_ablations_equal_separate_ablated_passes_bit_for_bit(native_kernels):
    """The shared partial passes of ``forward_ablations`` give what each ablation's own pass gives."""
    from esper_lib.constants import AlphaCurveAction, TempoAction
    from esper_lib.envs import native
    from esper_lib.envs.blueprints import ChannelGate
    from esper_lib.envs.host import HostCNN
    from esper_lib.envs.small_ops import run_sequential

    if native_kernels and not native.available():
        pytest.skip("no C compiler here")
    before = native._enabled
    native.enable(native_kernels)
    try:
        torch.manual_seed(14)
        host = HostCNN((4, 8, 8))
        for slot, bp in zip(host.slots, (BlueprintAction.CONV_HEAVY, BlueprintAction.NORM, BlueprintAction.CONV_LIGHT)):
            seed = build_blueprint(bp, slot.channels)
            for p in seed.parameters():
                torch.nn.init.normal_(p, std=0.3)  # zero-initialised seeds would make every ablation equal
            slot.germinate(seed, ChannelGate(slot.channels), bp, GerminationStyle.LINEAR_MULTIPLY, TempoAction.STANDARD, 1.0)
            slot.advance(0)
            slot.advance(0)
            slot.set_alpha_target(0.6, 0, AlphaCurveAction.LINEAR, GerminationStyle.LINEAR_MULTIPLY)
            assert slot.in_stream
        sets = [{0}, {1}, {2}, {0, 1}, {0, 2}, {1, 2}, {0, 1, 2}]
        with torch.inference_mode():
            _, cache = host.forward_cached(torch.randn(40, 1, 8, 8))
            shared = host.forward_ablations(cache, sets)
            for ablate, out in zip(sets, shared):  # each ablation on its own, from the first ablated slot
                h = cache[min(ablate)]
                for k in range(min(ablate), 3):
                    h = h if k == min(ablate) else run_sequential(host.blocks[k], h)
                    h = h if k in ablate else host.slots[k](h)
                assert torch.equal(out, host.head(h.mean(dim=(2, 3))))
            assert len({tuple(o.flatten().tolist()) for o in shared}) == len(sets)  # the ablations differ
            with pytest.raises(ValueError, match="at least one slot"):
                host.forward_ablations(cache, [set()])
    finally:
        native.enable(before)


def test_slot_param_count_follows_the_style_and_a_replaced_seed():
    from esper_lib.envs.blueprints import ChannelGate, ConvLightSeed, NormSeed
    from esper_lib.envs.lifecycle import SeedSlot

    slot = SeedSlot(0, 8)
    assert slot.param_count() == 0
    slot.germinate(NormSeed(8), ChannelGate(8), BlueprintAction.NORM, GerminationStyle.LINEAR_ADD, TempoAction.FAST, 1.0)
    assert slot.param_count() == 16
    slot.style = GerminationStyle.GATED_GATE  # counted once per seed; the gate joins under GATED_GATE
    assert slot.param_count() == 32
    slot.seed = ConvLightSeed(8)
    assert slot.param_count() == 8 * 8 + 8 + 16

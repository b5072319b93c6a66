"""GAE against Q(s, op) with a terminated and a truncated step, both bootstrap modes, op-head correction.

Hand example (gamma = 0.9, lambda = 0.8, so gamma * lambda = 0.72), two envs, four steps:

env 0: r = [1, 0, 2, 1], terminated at t=1 (t=2 starts a new episode), rollout ends at t=3
env 1: r = [0.5, 1, 0, -1], truncated at t=1 (bootstrap: sampled 3.0, expected 2.0), terminated at t=3
Q(s_t, op_t):   env 0 [0.5, 0.2, 1.0, 0.3]     env 1 [0.4, 0.6, 0.1, 0.2]
V^pi(s_t):      env 0 [0.6, 0.1, 0.8, 0.35]    env 1 [0.5, 0.7, 0.3, 0.0]
value of the observation after t=3: sampled [0.7, 9.0], expected [0.9, 9.0] (env 1 terminated: unused)

sampled mode, V'_t = Q(s_{t+1}, op_{t+1}):
 env 0: d = [1 + .9*.2 - .5, 0 - .2 (terminated: no bootstrap), 2 + .9*.3 - 1, 1 + .9*.7 - .3]
          = [0.68, -0.2, 1.27, 1.33]
        A3 = 1.33; A2 = 1.27 + .72*1.33 = 2.2276; A1 = -0.2; A0 = 0.68 + .72*(-0.2) = 0.536
 env 1: d = [.5 + .9*.6 - .4, 1 + .9*3.0 - .6 (truncated: bootstrap), 0 + .9*.2 - .1, -1 - .2]
          = [0.64, 3.1, 0.08, -1.2]
        A3 = -1.2; A2 = .08 - .864 = -0.784; A1 = 3.1 (chain cut); A0 = .64 + .72*3.1 = 2.872
expected mode, V'_t = V^pi(s_{t+1}):
 env 0: d = [1 + .09 - .5, -0.2, 2 + .315 - 1, 1 + .81 - .3] = [0.59, -0.2, 1.315, 1.51]
        A = [0.446, -0.2, 2.4022, 1.51]
 env 1: d = [.5 + .63 - .4, 1 + 1.8 - .6, 0 + 0 - .1, -1.2] = [0.73, 2.2, -0.1, -1.2]
        A = [2.314, 2.2, -0.964, -1.2]
greedy mode, V'_t = max over valid ops of Q(s_{t+1}, o); the buffer's Q(s, o) are Q for op 1, 2V - Q for
op 0 and 0 for the other ops, so max = env 0 [0.7, 0.2, 1.0, 0.4], env 1 [0.6, 0.8, 0.5, 0.2];
truncation bootstrap 4.0, value after t=3 [1.1, 9.0]:
 env 0: d = [1 + .18 - .5, -0.2, 2 + .36 - 1, 1 + .99 - .3] = [0.68, -0.2, 1.36, 1.69]
        A = [0.536, -0.2, 2.5768, 1.69]
 env 1: d = [.5 + .72 - .4, 1 + 3.6 - .6, 0 + .18 - .1, -1.2] = [0.82, 4.0, 0.08, -1.2]
        A = [3.7, 4.0, -0.784, -1.2]
op head, op_advantage="expected": A_op = A + Q - V^pi, with Q - V^pi = env 0 [-0.1, 0.1, 0.2, -0.05],
env 1 [-0.1, -0.1, -0.2, 0.2].
"""
import pytest
import torch

from esper_lib.constants import HEAD_NAMES, NUM_OPS, head_sizes
from esper_lib.ppo import RolloutBuffer, compute_advantages, gae, normalize_masked, op_head_advantages

GAMMA, LAM = 0.9, 0.8
R = [[1.0, 0.0, 2.0, 1.0], [0.5, 1.0, 0.0, -1.0]]
Q = [[0.5, 0.2, 1.0, 0.3], [0.4, 0.6, 0.1, 0.2]]
V = [[0.6, 0.1, 0.8, 0.35], [0.5, 0.7, 0.3, 0.0]]
TERM = [[False, True, False, False], [False, False, False, True]]
TRUNC = [[False, False, False, False], [False, True, False, False]]
STARTS = [[True, False, True, False], [True, False, True, False]]

A_SAMPLED = [[0.536, -0.2, 2.2276, 1.33], [2.872, 3.1, -0.784, -1.2]]
A_EXPECTED = [[0.446, -0.2, 2.4022, 1.51], [2.314, 2.2, -0.964, -1.2]]
A_GREEDY = [[0.536, -0.2, 2.5768, 1.69], [3.7, 4.0, -0.784, -1.2]]
Q_MINUS_V = [[-0.1, 0.1, 0.2, -0.05], [-0.1, -0.1, -0.2, 0.2]]


def hand_buffer(valid=None, greedy: bool = True) -> RolloutBuffer:
    n, t_len = 2, 4
    buf = RolloutBuffer(n, t_len, 2, 121, 3, 4)
    sizes = head_sizes(3)
    for t in range(t_len):
        q = torch.tensor([Q[i][t] for i in range(n)])
        v = torch.tensor([V[i][t] for i in range(n)])
        # op 1 was taken with pi = 0.5; op 0 has pi = 0.5 and Q = 2V - Q so that V^pi = V
        q_all = torch.zeros(n, NUM_OPS)
        q_all[:, 1] = q
        q_all[:, 0] = 2 * v - q
        op_probs = torch.zeros(n, NUM_OPS)
        op_probs[:, :2] = 0.5
        buf.add(
            state=torch.zeros(n, 121),
            blueprint_indices=torch.full((n, 3), -1),
            actions={h: torch.full((n,), 1 if h == "op" else 0) for h in HEAD_NAMES},
            masks={h: torch.ones(n, sizes[h], dtype=torch.bool) for h in HEAD_NAMES},
            log_probs={h: torch.zeros(n) for h in HEAD_NAMES},
            values=q,
            q_all=q_all,
            op_probs=op_probs,
            rewards=torch.tensor([R[i][t] for i in range(n)]),
            terminated=torch.tensor([TERM[i][t] for i in range(n)]),
            truncated=torch.tensor([TRUNC[i][t] for i in range(n)]),
            episode_starts=torch.tensor([STARTS[i][t] for i in range(n)]),
            valid=None if valid is None else torch.tensor([valid[i][t] for i in range(n)]),
            hidden=(torch.zeros(1, n, 4), torch.zeros(1, n, 4)),
        )
        if t == 1:
            buf.set_bootstrap(1, torch.tensor([1]), sampled=torch.tensor([3.0]), expected=torch.tensor([2.0]),
                              greedy=torch.tensor([4.0]) if greedy else None)
    buf.finish(final_value_sampled=torch.tensor([0.7, 9.0]), final_value_expected=torch.tensor([0.9, 9.0]),
               final_value_greedy=torch.tensor([1.1, 9.0]) if greedy else None)
    return buf


@pytest.mark.parametrize("mode, want", [("sampled", A_SAMPLED), ("expected", A_EXPECTED), ("greedy", A_GREEDY)])
def test_gae_hand_example(mode, want):
    buf = hand_buffer()
    compute_advantages(buf, gamma=GAMMA, gae_lambda=LAM, bootstrap_mode=mode, op_advantage="q")
    torch.testing.assert_close(buf.advantages, torch.tensor(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(buf.returns, torch.tensor(want) + torch.tensor(Q), atol=1e-5, rtol=0)
    # op_advantage="q" (the plan's): the op head gets the same advantage as every other head
    torch.testing.assert_close(buf.op_advantages, buf.advantages)


@pytest.mark.parametrize("mode, base", [("sampled", A_SAMPLED), ("expected", A_EXPECTED)])
def test_op_head_expected_correction_hand_example(mode, base):
    buf = hand_buffer()
    compute_advantages(buf, gamma=GAMMA, gae_lambda=LAM, bootstrap_mode=mode, op_advantage="expected")
    want = torch.tensor(base) + torch.tensor(Q_MINUS_V)
    torch.testing.assert_close(buf.op_advantages, want, atol=1e-5, rtol=0)
    # spelled out for one entry: env 0, t = 0, expected bootstrap: 0.446 + 0.5 - 0.6 = 0.346
    if mode == "expected":
        assert float(buf.op_advantages[0, 0]) == pytest.approx(0.346, abs=1e-5)
    # the other heads keep the plain GAE advantage; the per-head view puts A_op in column 0
    torch.testing.assert_close(buf.advantages, torch.tensor(base), atol=1e-5, rtol=0)
    seqs = buf.sequences()
    assert torch.equal(seqs.advantages[..., 0], buf.op_advantages.reshape(4, 2))
    for h in range(1, len(HEAD_NAMES)):
        assert torch.equal(seqs.advantages[..., h], buf.advantages.reshape(4, 2))


def test_terminated_never_bootstraps_even_with_a_bootstrap_value():
    z = torch.zeros(1, 1)
    adv, _ = gae(
        rewards=torch.ones(1, 1), values=z, next_values=torch.full((1, 1), 5.0), bootstrap_values=torch.full((1, 1), 7.0),
        terminated=torch.ones(1, 1, dtype=torch.bool), truncated=torch.zeros(1, 1, dtype=torch.bool),
        valid=torch.ones(1, 1, dtype=torch.bool), gamma=0.9, gae_lambda=0.95,
    )
    assert float(adv) == 1.0


def test_invalid_steps_get_zero_advantage_and_cut_the_chain():
    # env 1 step 2 is the ignored step of a NEXT_STEP autoreset after the truncation at t=1
    valid = [[True] * 4, [True, True, False, True]]
    buf = hand_buffer(valid)
    compute_advantages(buf, gamma=GAMMA, gae_lambda=LAM, bootstrap_mode="sampled", op_advantage="expected")
    assert float(buf.advantages[1, 2]) == 0.0 and float(buf.op_advantages[1, 2]) == 0.0
    # t=1 was truncated, so nothing changes before the invalid step
    assert float(buf.advantages[1, 1]) == pytest.approx(3.1, abs=1e-5)


def test_normalisation_uses_valid_steps_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    valid = torch.tensor([[True, True, True, False]])
    out = normalize_masked(x, valid)
    assert float(out[0, 3]) == 0.0
    torch.testing.assert_close(out[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)


def test_mode_errors():
    with pytest.raises(ValueError, match="op_advantage"):
        op_head_advantages(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), "v")
    buf = hand_buffer()
    with pytest.raises(ValueError, match="bootstrap_mode"):
        compute_advantages(buf, gamma=0.9, gae_lambda=0.9, bootstrap_mode="mean")


def test_group_centring_subtracts_the_mean_of_the_other_envs_of_the_group():
    from esper_lib.ppo.advantages import center_advantages_in_groups

    adv = torch.tensor([[1.0, 2.0], [3.0, 6.0], [0.0, -1.0], [4.0, 5.0], [2.0, 0.0], [-1.0, 1.0]])
    valid = torch.ones(6, 2, dtype=torch.bool)
    done = torch.tensor([[False, True]] * 6)
    # groups of 3: envs 0-2 and 3-5; e.g. env 0 at t=0: 1 - (3 + 0) / 2 = -0.5; env 4 at t=1: 0 - (5 + 1) / 2 = -3
    expected = torch.tensor([[-0.5, -0.5], [2.5, 5.5], [-2.0, -5.0], [3.5, 4.5], [0.5, -3.0], [-4.0, -1.5]])
    assert torch.allclose(center_advantages_in_groups(adv, valid, done, 3), expected)
    # groups of 2: env 1 at t=1: 6 - 2 = 4
    assert center_advantages_in_groups(adv, valid, done, 2)[1, 1] == 4.0
    assert torch.equal(center_advantages_in_groups(adv, valid, done, 1), adv)
    with pytest.raises(ValueError, match="group_size"):
        center_advantages_in_groups(adv, valid, done, 4)
    with pytest.raises(ValueError, match="valid has shape"):
        center_advantages_in_groups(adv, valid[:, :1], done, 2)
    with pytest.raises(ValueError, match=r"must be \[N, T\]"):
        center_advantages_in_groups(adv.unsqueeze(0), valid, done, 2)
    out_of_step = done.clone()
    out_of_step[1, 1] = False
    with pytest.raises(ValueError, match="terminated"):
        center_advantages_in_groups(adv, valid, out_of_step, 2)


def test_compute_advantages_centres_both_advantages_in_groups_but_not_the_returns():
    buf = hand_buffer()
    same_steps = buf.terminated.any(dim=0, keepdim=True).expand_as(buf.terminated).clone()
    buf.terminated.copy_(same_steps)  # a group must end its episodes together
    buf.truncated.zero_()
    compute_advantages(buf, gamma=0.9, gae_lambda=0.8, bootstrap_mode="expected")
    plain_adv, plain_op, plain_ret = buf.advantages.clone(), buf.op_advantages.clone(), buf.returns.clone()
    compute_advantages(buf, gamma=0.9, gae_lambda=0.8, bootstrap_mode="expected", seed_group_size=2)
    assert torch.allclose(buf.advantages, plain_adv - plain_adv.flip(0))
    assert torch.allclose(buf.op_advantages, plain_op - plain_op.flip(0))
    assert torch.equal(buf.returns, plain_ret)


def test_greedy_bootstrap_takes_the_best_valid_op_only():
    from esper_lib.ppo.buffer import greedy_value

    q_all = torch.tensor([[0.1, 5.0, 0.3, -1.0, 0.2, 0.0], [0.4, -2.0, 0.3, 0.0, 0.1, 0.2]])
    mask = torch.tensor([[True, False, True, True, False, False], [True, True, False, False, False, False]])
    torch.testing.assert_close(greedy_value(q_all, mask), torch.tensor([0.3, 0.4]))
    buf = hand_buffer()
    buf.masks["op"][0, 1, 0] = False  # env 0, t=1: op 0 (Q 0.0) invalid, the max stays op 1's 0.2
    buf.masks["op"][1, 1, 0] = False  # env 1, t=1: op 0 (Q 0.8) invalid: the max falls to op 1's 0.6
    compute_advantages(buf, gamma=GAMMA, gae_lambda=LAM, bootstrap_mode="greedy", op_advantage="q")
    want = torch.tensor(A_GREEDY)
    want[1, 0] = 0.5 + 0.9 * 0.6 - 0.4 + 0.72 * 4.0
    torch.testing.assert_close(buf.advantages, want, atol=1e-5, rtol=0)


def test_greedy_bootstrap_needs_the_greedy_values():
    from esper_lib.ppo import BufferError

    buf = hand_buffer(greedy=False)
    compute_advantages(buf, gamma=GAMMA, gae_lambda=LAM, bootstrap_mode="expected")  # the other modes do not need them
    with pytest.raises(BufferError, match="greedy"):
        compute_advantages(buf, gamma=GAMMA, gae_lambda=LAM, bootstrap_mode="greedy")


def test_collected_greedy_bootstraps_are_the_best_valid_q():
    """On the truncation probe every op is valid and the rollout truncates: the collector stores, for the
    cut and for the rollout's end, max_o Q(s', o) >= sum_o pi(o | s') Q(s', o); a greedy run trains."""
    from esper_lib.envs.probes import TruncationProbe
    from esper_lib.ppo import PPOConfig, PPOTrainer

    cfg = PPOConfig(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=4, epochs=1, feature_dim=16, hidden_dim=16,
                    num_threads=1, bootstrap_mode="greedy", total_updates=2)
    tr = PPOTrainer(TruncationProbe, cfg)
    for _ in range(2):
        tr.step()
    buf = tr.buffer
    cut = buf.truncated
    assert bool(cut.any())
    assert torch.isfinite(buf.bootstrap_greedy[cut]).all() and torch.isfinite(buf.final_value_greedy).all()
    assert bool((buf.bootstrap_greedy[cut] >= buf.bootstrap_expected[cut] - 1e-6).all())
    assert bool((buf.final_value_greedy >= buf.final_value_expected - 1e-6).all())
    torch.testing.assert_close(buf.greedy_values(), buf.q_all.max(-1).values)  # every op valid on the probe

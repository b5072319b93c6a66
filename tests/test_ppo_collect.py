"""Collection: carried LSTM state, episode starts, truncation bootstrap from the final observation, autoreset modes."""
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from esper_lib.constants import HEAD_NAMES, RELEVANCE_TABLE
from esper_lib.envs.probes import CUE_INDEX, TIME_INDEX, ProbeEnv
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.finite import NonFiniteError
from esper_lib.ppo import RolloutBuffer, RolloutCollector, RunningObsNormalizer, SingleEnvAdapter

N, T, L = 3, 12, 4


class EpisodeProbe(ProbeEnv):
    """Episodes of 2 or 3 steps that end by termination or by truncation (drawn at reset).

    state[TIME_INDEX] = t / 10 and state[CUE_INDEX] = a per-episode tag, so every observation,
    the final one included, can be rebuilt from the stored ones; reward = t + 1.
    """

    def _begin(self):
        self.length = 2 + int(self.np_random.integers(2))
        self.truncates = bool(self.np_random.integers(2))
        self.cue = float(self.np_random.random())

    def _signals(self):
        return {CUE_INDEX: self.cue, TIME_INDEX: self.t / 10}

    def _reward(self, action):
        return float(self.t + 1)

    def _done(self):
        end = self.t >= self.length
        return end and not self.truncates, end and self.truncates


def policy_and_buffer(n=N, t=T):
    torch.manual_seed(0)
    policy = FactoredRecurrentActorCritic(feature_dim=16, hidden_dim=16)
    return policy, RolloutBuffer(n, t, L, 121, 3, 16)


def collect(mode, n=N, seed=0, normalizer=None):
    policy, buf = policy_and_buffer(n)
    env = SyncVectorEnv([EpisodeProbe] * n, autoreset_mode=mode)
    col = RolloutCollector(env, policy, normalizer, torch.Generator().manual_seed(seed))
    col.reset(seed=seed)
    col.collect(buf)
    return policy, buf, col


def episode_start_before(buf, i, t):
    return max(s for s in range(t + 1) if buf.episode_starts[i, s])


@torch.no_grad()
def value_after(policy, states, final_state):
    """(Q(s', .) [6], pi(. | s') [6]) after running the LSTM from zero over ``states`` then ``final_state``."""
    seq = torch.cat([states, final_state.unsqueeze(0)]).unsqueeze(0)
    q, probs, _ = policy.q_values(seq, torch.full((1, seq.shape[1], 3), -1))
    return q[0, -1], probs[0, -1]


def test_same_step_collection_layout_hidden_and_bootstrap():
    policy, buf, _ = collect(AutoresetMode.SAME_STEP)
    assert bool(buf.valid.all())
    tt = buf.state[..., TIME_INDEX] * 10  # step within the episode
    torch.testing.assert_close(buf.rewards, tt + 1)  # reward of step t is aligned with its observation
    assert torch.equal(buf.episode_starts, tt.round() == 0)
    done = buf.terminated | buf.truncated
    assert torch.equal(done[:, :-1], buf.episode_starts[:, 1:])  # an episode starts right after each end
    assert bool(buf.truncated.any()) and bool(buf.terminated.any()) and not bool((buf.terminated & buf.truncated).any())
    # stored Q(s, op) is the op's entry of Q(s, .)
    torch.testing.assert_close(buf.values, buf.q_all.gather(-1, buf.actions[..., :1]).squeeze(-1))
    # masks are the canonicalised ones: an irrelevant head has exactly one valid action
    rel = RELEVANCE_TABLE[buf.actions[..., 0]]
    for h, name in enumerate(HEAD_NAMES[1:], start=1):
        assert bool((buf.masks[name].sum(-1)[~rel[..., h]] == 1).all())

    for i in range(N):
        # LSTM state stored at each sequence start == the state after running the episode so far
        for c in range(T // L):
            t = c * L
            s0 = episode_start_before(buf, i, t)
            if s0 == t:
                want = torch.zeros(16)
            else:
                _, (h, _) = policy._trunk(buf.state[i : i + 1, s0:t], buf.blueprint_indices[i : i + 1, s0:t], None)
                want = h[0, 0]
            torch.testing.assert_close(buf.h0[i, c], want, atol=1e-5, rtol=1e-5)
        # truncation bootstrap == value of the *final* observation with the carried state
        for t in buf.truncated[i].nonzero().flatten().tolist():
            s0 = episode_start_before(buf, i, t)
            final = buf.state[i, t].clone()
            final[TIME_INDEX] = (t - s0 + 1) / 10
            q, probs = value_after(policy, buf.state[i, s0 : t + 1], final)
            assert float(buf.bootstrap_expected[i, t]) == pytest.approx(float((q * probs).sum()), abs=1e-5)
            assert torch.isclose(q, buf.bootstrap_sampled[i, t], atol=1e-5).any()  # Q(s', some sampled op)
        # no bootstrap is recorded where the step was not truncated
        assert bool((buf.bootstrap_expected[i][~buf.truncated[i]] == 0).all())


def test_next_step_autoreset_marks_the_ignored_step_invalid():
    policy, buf, _ = collect(AutoresetMode.NEXT_STEP)
    done = buf.terminated | buf.truncated
    assert bool((~buf.valid).any())
    for i in range(N):
        for t in range(T - 1):
            assert bool(buf.valid[i, t + 1]) == (not bool(done[i, t])), (i, t)
        for t in (~buf.valid[i]).nonzero().flatten().tolist():
            assert float(buf.rewards[i, t]) == 0.0 and not buf.terminated[i, t] and not buf.truncated[i, t]
            if t + 1 < T:
                assert buf.episode_starts[i, t + 1]  # the fresh episode starts after the ignored step
        # NEXT_STEP returns the final observation as the next one: the ignored step was computed on
        # exactly the final observation with the carried state, so its V^pi is the bootstrap
        for t in buf.truncated[i].nonzero().flatten().tolist():
            if t + 1 < T:
                v = float((buf.q_all[i, t + 1] * buf.op_probs[i, t + 1]).sum())
                assert float(buf.bootstrap_expected[i, t]) == pytest.approx(v, abs=1e-5)
    tt = buf.state[..., TIME_INDEX] * 10
    torch.testing.assert_close(buf.rewards[buf.valid], (tt + 1)[buf.valid])


def test_single_env_is_wrapped_with_same_step_autoreset():
    policy, buf = policy_and_buffer(n=1)
    col = RolloutCollector(EpisodeProbe(), policy, None, torch.Generator().manual_seed(0))
    assert isinstance(col.env, SingleEnvAdapter)
    stats = col.collect(buf)
    assert bool(buf.valid.all()) and stats.env_steps == T
    assert len(stats.episode_returns) == int((buf.terminated | buf.truncated).sum())
    for t in buf.truncated[0].nonzero().flatten().tolist():
        s0 = episode_start_before(buf, 0, t)
        final = buf.state[0, t].clone()
        final[TIME_INDEX] = (t - s0 + 1) / 10
        q, probs = value_after(policy, buf.state[0, s0 : t + 1], final)
        assert float(buf.bootstrap_expected[0, t]) == pytest.approx(float((q * probs).sum()), abs=1e-5)


def test_episode_returns_are_reported_per_finished_episode():
    _, buf, col = collect(AutoresetMode.SAME_STEP)
    # every finished episode of length k returns 1 + 2 + ... + k, also one that straddles two rollouts
    _, buf2 = policy_and_buffer()
    stats = col.collect(buf2)
    assert stats.episode_lengths and set(stats.episode_lengths) <= {2, 3}
    for r, k in zip(stats.episode_returns, stats.episode_lengths):
        assert r == k * (k + 1) / 2


def test_normaliser_sees_every_received_observation_and_states_are_normalised():
    norm = RunningObsNormalizer(121)
    _, buf, _ = collect(AutoresetMode.SAME_STEP, normalizer=norm)
    assert norm.count == N * (T + 1)  # reset observations + one batch per step
    assert float(buf.state.abs().max()) <= norm.clip


def test_disabled_autoreset_and_size_mismatch_raise():
    policy, _ = policy_and_buffer()
    env = SyncVectorEnv([EpisodeProbe] * 2, autoreset_mode=AutoresetMode.DISABLED)
    with pytest.raises(ValueError, match="DISABLED"):
        RolloutCollector(env, policy, None, torch.Generator())
    small = FactoredRecurrentActorCritic(state_dim=55, num_slots=1, feature_dim=8, hidden_dim=8)
    with pytest.raises(ValueError, match="state_dim=121"):
        RolloutCollector(EpisodeProbe(), small, None, torch.Generator())
    col = RolloutCollector(EpisodeProbe(), policy, None, torch.Generator())
    with pytest.raises(ValueError, match="buffer has 3 envs"):
        col.collect(RolloutBuffer(3, 4, 4, 121, 3, 16))


def test_running_normaliser_matches_numpy_and_round_trips():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(50, 5)).astype(np.float32)
    data[:, 4] = 7.0  # a constant feature maps to 0
    norm = RunningObsNormalizer(5, clip=5.0)
    for chunk in np.array_split(data, 7):
        norm.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-5, atol=1e-6)
    out = norm.normalize(torch.from_numpy(data))
    assert out.dtype == torch.float32 and float(out[:, 4].abs().max()) == 0.0
    assert float(out.abs().max()) <= 5.0
    again = RunningObsNormalizer.from_state_dict(norm.state_dict())
    assert torch.equal(again.normalize(torch.from_numpy(data)), out)
    with pytest.raises(ValueError, match="dim 5"):
        RunningObsNormalizer(6).load_state_dict(norm.state_dict())
    with pytest.raises(ValueError, match="version"):
        RunningObsNormalizer(5).load_state_dict({**norm.state_dict(), "version": 99})


def test_normalizer_refuses_non_finite_batches_before_touching_its_statistics():
    norm = RunningObsNormalizer(4)
    norm.update(torch.randn(5, 4))
    before = (norm.mean.clone(), norm.var.clone(), norm.count)
    bad = torch.randn(3, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"normalizer update batch contains a non-finite value \(nan\) at row 2, feature 1"):
        norm.update(bad)
    assert torch.equal(norm.mean, before[0]) and torch.equal(norm.var, before[1]) and norm.count == before[2]


# --- make_vector_env: where the envs run ---------------------------------------------------------


def test_make_vector_env_kinds_build_same_step_vector_envs():
    from gymnasium.vector import AsyncVectorEnv

    from esper_lib.envs.probes import OpRewardProbe
    from esper_lib.ppo import make_vector_env

    assert isinstance(make_vector_env(OpRewardProbe, 1), SingleEnvAdapter)  # the old call still works
    assert isinstance(make_vector_env(OpRewardProbe, 1, kind="sync"), SyncVectorEnv)  # an explicit kind: a VectorEnv
    sync = make_vector_env(OpRewardProbe, 2)
    asyn = make_vector_env(OpRewardProbe, 2, kind="async", context="fork")
    try:
        assert isinstance(sync, SyncVectorEnv) and isinstance(asyn, AsyncVectorEnv)
        for venv in (sync, asyn):
            assert venv.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP and venv.num_envs == 2
        a, _ = sync.reset(seed=4)
        b, _ = asyn.reset(seed=4)
        np.testing.assert_array_equal(a["state"], b["state"])
    finally:
        sync.close()
        asyn.close()
    with pytest.raises(ValueError, match="kind must be one of"):
        make_vector_env(OpRewardProbe, 2, kind="threads")
    with pytest.raises(ValueError, match="num_envs must be an int >= 1"):
        make_vector_env(OpRewardProbe, 0, kind="async")


def test_ray_kind_without_ray_says_how_to_install(monkeypatch):
    import sys

    from esper_lib.envs.probes import OpRewardProbe
    from esper_lib.ppo import make_vector_env

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    with pytest.raises(ImportError, match=r"pip install -e \.\[ray\]"):
        make_vector_env(OpRewardProbe, 2, kind="ray")

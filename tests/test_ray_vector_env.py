"""RayVectorEnv: same transitions and same PPO run as SyncVectorEnv, exact resume, faults that name the env, close.

One local Ray instance per test process serves the module (2 CPUs, no dashboard, small object
store, ``address="local"`` so it never joins another instance). Under ``pytest -n 2 --dist
loadgroup`` the ``xdist_group`` mark sends the module to one worker; where xdist ignores the group
(xdist 3.8 with pytest 9) each worker that runs some of these tests starts its own instance, which
works too (checked), at the cost of a second start-up.
"""
from __future__ import annotations

import functools
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e .[ray] runs these tests")

from esper_lib.envs.env_state import capture_env_state  # noqa: E402
from esper_lib.envs.morpho import MorphoEnv  # noqa: E402
from esper_lib.envs.probes import OpRewardProbe, TruncationProbe  # noqa: E402
from esper_lib.envs.ray_vector_env import RayEnvError, RayVectorEnv  # noqa: E402
from esper_lib.ppo import TIMING_COLUMNS, PPOConfig, PPOTrainer, make_vector_env  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")

TINY = dict(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=2, epochs=2, feature_dim=32, hidden_dim=32, num_threads=1, total_updates=2, gamma=0.9, lr=3e-3)
tiny_morpho = functools.partial(MorphoEnv, max_epochs=3, train_size=100, val_size=60, batches_per_epoch=2)


class FailingProbe(OpRewardProbe):
    """Raises in its ``fail_at``-th step (counted over episodes)."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at, self.steps = fail_at, 0

    def step(self, action):  # type: ignore[no-untyped-def]
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("probe failure injected by the test")
        return super().step(action)


class SlowProbe(OpRewardProbe):
    """Sleeps ``seconds`` in its ``slow_at``-th step: a hung env."""

    def __init__(self, slow_at: int, seconds: float):
        super().__init__()
        self.slow_at, self.seconds, self.steps = slow_at, seconds, 0

    def step(self, action):  # type: ignore[no-untyped-def]
        self.steps += 1
        if self.steps == self.slow_at:
            time.sleep(self.seconds)
        return super().step(action)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # The test classes above live in this module, which the workers cannot import: send them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2)
    try:
        yield
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def deterministic(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=list(TIMING_COLUMNS))


def assert_released(venv: RayVectorEnv) -> None:
    for actor in venv.actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.get_states.remote(), timeout=30)


def assert_same_tree(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray) and a.dtype == object:
        assert isinstance(b, np.ndarray) and b.dtype == object and a.shape == b.shape, path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, f"{path}: {getattr(b, 'dtype', type(b))} != {a.dtype}"
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_steps_match_sync_vector_env_with_same_step_autoreset_and_final_obs():
    """3 truncating probes over 2 actors (2 + 1 envs): observations, rewards, flags and infos as SyncVectorEnv's."""
    fns = [TruncationProbe] * 3
    ray_env = RayVectorEnv(fns, envs_per_actor=2)
    sync_env = SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    try:
        assert len(ray_env.actors) == 2 and ray_env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
        assert ray_env.single_observation_space == sync_env.single_observation_space
        assert ray_env.observation_space == sync_env.observation_space and ray_env.action_space == sync_env.action_space
        assert_same_tree(ray_env.reset(seed=3), sync_env.reset(seed=3))
        rng = np.random.default_rng(0)
        saw_final = False
        for _ in range(25):
            actions = np.stack([sync_env.single_action_space.sample() for _ in range(3)])
            actions[:, 0] = rng.integers(0, 6, size=3)
            got, want = ray_env.step(actions), sync_env.step(actions)
            assert_same_tree(list(got), list(want))
            saw_final |= "final_obs" in want[4]
        assert saw_final  # episodes were cut on the way, so final_obs / final_info were compared too
        assert ray_env.get_attr("limit") == sync_env.get_attr("limit")
        assert ray_env.call("optimal_value") == sync_env.call("optimal_value")
        # the states a PPO checkpoint stores, captured inside the actors
        assert_same_tree(ray_env.get_env_states(), [capture_env_state(e) for e in sync_env.envs])
    finally:
        ray_env.close()
        sync_env.close()
    assert_released(ray_env)


@pytest.mark.parametrize(
    "env_fn, envs_per_actor",
    [(OpRewardProbe, 1), (tiny_morpho, 2)],
    ids=["op_probe-2_actors", "morpho-1_actor_2_envs"],
)
def test_ppo_with_ray_envs_equals_sync_bit_for_bit(env_fn, envs_per_actor):
    cfg = PPOConfig(**TINY, seed=5)
    sync = PPOTrainer(env_fn, cfg)
    venv = make_vector_env(env_fn, cfg.num_envs, kind="ray", envs_per_actor=envs_per_actor)
    on_ray = PPOTrainer(venv, cfg)
    try:
        sync.run(progress=False)
        on_ray.run(progress=False)
    finally:
        sync.close()
        on_ray.close()
    pd.testing.assert_frame_equal(deterministic(sync.metrics), deterministic(on_ray.metrics))
    assert sync.metrics["episodes"].sum() > 0
    for (name, a), b in zip(sync.policy.state_dict().items(), on_ray.policy.state_dict().values()):
        assert torch.equal(a, b), name
    assert_released(venv)


def test_sync_checkpoint_resumes_exactly_on_ray_envs(tmp_path):
    """A checkpoint's env states restore into actors (PPOConfig(vector_env="ray")) and the run continues bit for bit."""
    cfg = PPOConfig(**{**TINY, "total_updates": 3}, seed=2)
    a = PPOTrainer(TruncationProbe, cfg)
    a.run(2, progress=False)
    path = a.save(tmp_path / "run.pt")
    a.run(progress=False)
    b = PPOTrainer.resume(path, TruncationProbe, vector_env="ray")
    try:
        assert isinstance(b.env, RayVectorEnv) and b.update_index == 2
        b.run(progress=False)
    finally:
        b.close()
    pd.testing.assert_frame_equal(deterministic(a.metrics), deterministic(b.metrics))
    assert_released(b.env)


def test_env_error_names_the_env_and_keeps_checkpoint_and_metrics(tmp_path):
    venv = RayVectorEnv([OpRewardProbe, OpRewardProbe, functools.partial(FailingProbe, fail_at=12)], envs_per_actor=2)
    trainer = PPOTrainer(venv, PPOConfig(**{**TINY, "num_envs": 3}))
    try:
        trainer.step()  # 8 steps per env: fine
        path = trainer.save(tmp_path / "before.pt")
        with pytest.raises(RayEnvError, match=r"env 2 raised in step:(.|\n)*probe failure injected"):
            trainer.step()
        assert len(trainer.history) == 1
        with pytest.raises(RayEnvError, match="broken by an earlier failure"):
            venv.step(np.zeros((3, 8), dtype=np.int64))
    finally:
        trainer.close()
    assert_released(venv)
    fresh = PPOTrainer(OpRewardProbe, PPOConfig(**{**TINY, "num_envs": 3}))
    fresh.load(path)
    assert fresh.update_index == 1 and len(fresh.history) == 1


def test_actors_follow_the_drivers_switch_of_the_c_kernels():
    """native.enable(True) on the driver: the actors run the C kernels too, and step as a SyncVectorEnv does with them."""
    from esper_lib.envs import native

    if not native.available():
        pytest.skip("no C compiler here: the native kernels cannot be built")
    before = native.switched_on()
    fns = [functools.partial(MorphoEnv, max_epochs=3, train_size=64, val_size=40, batch_size=32)] * 2
    native.enable(True)
    try:
        ray_env = RayVectorEnv(fns, envs_per_actor=1)
        sync_env = SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
        try:
            assert ray_env.native_kernels == [True, True]
            obs_r, _ = ray_env.reset(seed=[5, 6])
            obs_s, _ = sync_env.reset(seed=[5, 6])
            actions = np.zeros((2, 8), dtype=np.int64)
            for _ in range(2):
                obs_r, rew_r, *_ = ray_env.step(actions)
                obs_s, rew_s, *_ = sync_env.step(actions)
                np.testing.assert_array_equal(rew_r, rew_s)  # bit for bit: the same kernels on both sides
                np.testing.assert_array_equal(obs_r["state"], obs_s["state"])
        finally:
            ray_env.close()
            sync_env.close()
        native.enable(False)
        plain = RayVectorEnv(fns[:1])
        try:
            assert plain.native_kernels == [False]
        finally:
            plain.close()
    finally:
        native.enable(before)


def test_dead_actor_names_its_envs():
    venv = RayVectorEnv([OpRewardProbe] * 4, envs_per_actor=2)
    trainer = PPOTrainer(venv, PPOConfig(**{**TINY, "num_envs": 4}))
    try:
        trainer.step()
        ray.kill(venv.actors[1])
        with pytest.raises(RayEnvError, match=r"env\(s\) \[2, 3\] \(actor 1\) died"):
            trainer.step()
        assert len(trainer.history) == 1
    finally:
        trainer.close()
    assert_released(venv)


def test_hung_env_times_out_instead_of_hanging():
    venv = RayVectorEnv([OpRewardProbe, functools.partial(SlowProbe, slow_at=3, seconds=60.0)], step_timeout_s=2.0)
    trainer = PPOTrainer(venv, PPOConfig(**TINY))
    start = time.monotonic()
    try:
        with pytest.raises(RayEnvError, match=r"env\(s\) \[1\] \(actor\(s\) \[1\]\) gave no result for step within step_timeout_s=2 s"):
            trainer.step()
        assert time.monotonic() - start < 20
    finally:
        trainer.close()
    assert_released(venv)

"""Critic calibration: the critic's value at an episode's first state against the return measured after it.

A critic can explain the variance of its GAE targets (which contain its own bootstrap) and still be
far from the returns an episode really pays: that is what a bootstrap past the end of the task
produces (Q drifting to many times the return). The honest check compares, for every episode that
starts and ends inside one rollout, the value the critic gave its first state with the discounted
return that followed (a Monte Carlo measurement, no bootstrap involved).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esper_lib.ppo.buffer import RolloutBuffer

CALIBRATION_COLUMNS = ("env", "start", "length", "value_expected", "value_sampled", "discounted_return", "undiscounted_return")


def episode_start_calibration(buffer: RolloutBuffer, gamma: float) -> pd.DataFrame:
    """One row per episode that starts and terminates inside ``buffer`` (truncated or unfinished ones are skipped).

    Columns: ``env``, ``start`` (step index in the rollout), ``length``, ``value_expected``
    (sum_o pi(o|s0) Q(s0, o), the critic's V(s0) under the policy that collected the rollout),
    ``value_sampled`` (Q(s0, op taken)), ``discounted_return`` (sum_k gamma^k r_k over the episode),
    ``undiscounted_return``. Values are those stored at collection time.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    rewards = buffer.rewards.cpu().numpy().astype(np.float64)
    starts = buffer.episode_starts.cpu().numpy()
    terminated = buffer.terminated.cpu().numpy()
    truncated = buffer.truncated.cpu().numpy()
    valid = buffer.valid.cpu().numpy()
    v_expected = (buffer.q_all * buffer.op_probs).sum(-1).cpu().numpy()
    v_sampled = buffer.values.cpu().numpy()
    rows = []
    for env in range(buffer.num_envs):
        for t0 in np.flatnonzero(starts[env] & valid[env]):
            ends = np.flatnonzero((terminated[env, t0:] | truncated[env, t0:]))
            if ends.size == 0:
                continue  # the episode goes on past the rollout
            t1 = t0 + int(ends[0])
            if truncated[env, t1] or not valid[env, t0 : t1 + 1].all():
                continue  # cut before the end of its task: its return is not the full one
            r = rewards[env, t0 : t1 + 1]
            rows.append(
                {
                    "env": env,
                    "start": int(t0),
                    "length": int(t1 - t0 + 1),
                    "value_expected": float(v_expected[env, t0]),
                    "value_sampled": float(v_sampled[env, t0]),
                    "discounted_return": float(np.sum(r * gamma ** np.arange(r.size))),
                    "undiscounted_return": float(r.sum()),
                }
            )
    return pd.DataFrame(rows, columns=list(CALIBRATION_COLUMNS))


class CalibrationRecorder:
    """Trainer callback: after each update, the calibration rows of its rollout with an ``update`` column.

    ``PPOTrainer.run(callback=CalibrationRecorder(gamma))``; ``frame()`` returns every row so far.
    """

    def __init__(self, gamma: float):
        self.gamma = float(gamma)
        self._frames: list[pd.DataFrame] = []

    def __call__(self, trainer, row: dict[str, float]) -> None:
        df = episode_start_calibration(trainer.buffer, self.gamma)
        df.insert(0, "update", int(row["update"]))
        self._frames.append(df)

    def frame(self) -> pd.DataFrame:
        if not self._frames:
            return pd.DataFrame(columns=["update", *CALIBRATION_COLUMNS])
        return pd.concat(self._frames, ignore_index=True)

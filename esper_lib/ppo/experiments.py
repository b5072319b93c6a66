"""Small reproducible experiments on the probes (shared by tests, scripts and notebooks).

``op_advantage_run`` trains on ``OpRewardProbe`` with one ``op_advantage`` mode and records, after
every update, pi(best op | s), the learned Q(s, o) of every op and the mean op-head advantage of the
update. With ``prefit_critic=True`` the critic's value head is first fitted (supervised, actor
untouched) to the true Q*(s, o): the regime where the op-conditioned critic is already accurate,
in which the plan's estimator (``"q"``) leaves the op head without signal.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from esper_lib.constants import NUM_OPS
from esper_lib.envs.probes import OpRewardProbe
from esper_lib.ppo.config import PPOConfig
from esper_lib.ppo.controller import PolicyController
from esper_lib.ppo.trainer import PPOTrainer

OP_ADVANTAGE_DEFAULTS: dict[str, Any] = dict(
    num_envs=4,
    num_steps=16,
    seq_len=4,
    minibatch_sequences=4,
    epochs=4,
    lr=1e-3,
    ent_coef=0.01,
    feature_dim=32,
    hidden_dim=32,
    gamma=0.9,
    target_kl=0.02,
    num_threads=1,
)


def prefit_critic(trainer: PPOTrainer, q_target: torch.Tensor, obs: dict[str, Any], steps: int = 300, lr: float = 1e-2) -> float:
    """Fit Q(s, .) at the observation ``obs`` (zero LSTM state) to ``q_target`` ``[NUM_OPS]``; only the value head moves.

    Returns the final mean squared error.
    """
    policy = trainer.policy
    ctl = PolicyController(policy, trainer.normalizer)
    state, bp, _ = ctl.observation_tensors(obs)
    with torch.no_grad():
        lstm_out, _ = policy._trunk(state.unsqueeze(1), bp.unsqueeze(1), None)
    opt = torch.optim.Adam(policy.value_head.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = (policy._q_all(lstm_out)[0, 0] - q_target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def signal_gap(op_advantage: str, q: np.ndarray) -> float:
    """Expected op-head advantage of the best op minus the mean over the other ops, from the learned critic.

    On the one-step ``OpRewardProbe`` the expected advantage of op o is exactly r(o) - b(o) with the
    baseline b(o) = Q(s, o) (``"q"``) or V^pi(s) (``"expected"``, the same for every op). This is the
    signal the op head can follow: with an accurate critic it is ~0 for ``"q"`` and r(best) - mean of
    the other r(o) for ``"expected"``.
    """
    r = np.asarray(OpRewardProbe.OP_REWARDS, dtype=np.float64)
    adv = r - (np.asarray(q, dtype=np.float64) if op_advantage == "q" else 0.0)  # a common baseline cancels in the gap
    best = OpRewardProbe.BEST_OP
    return float(adv[best] - np.delete(adv, best).mean())


def op_advantage_run(op_advantage: str, seed: int = 0, num_updates: int = 40, prefit: bool = False, **overrides: Any) -> pd.DataFrame:
    """One training run on ``OpRewardProbe``; one row per update.

    Columns: ``update``, ``env_steps``, ``p_best`` (pi(FOSSILIZE | s)), ``q_<op>`` (learned Q(s, op)
    for the six ops), ``v_pi`` (sum_o pi(o | s) Q(s, o)), ``signal_gap`` (see ``signal_gap``), ``op_adv_best`` / ``op_adv_other`` (mean raw op-head advantage of the update's
    steps that took the best op / another op), ``episode_return_mean``, ``explained_variance``.
    """
    cfg = PPOConfig(**{**OP_ADVANTAGE_DEFAULTS, **overrides, "op_advantage": op_advantage, "seed": seed, "total_updates": num_updates})
    env = OpRewardProbe(gamma=cfg.gamma)
    trainer = PPOTrainer(lambda: OpRewardProbe(gamma=cfg.gamma), cfg)
    obs, _ = env.reset(seed=seed)
    if prefit:
        if trainer.normalizer is not None:
            trainer.normalizer.update(torch.as_tensor(obs["state"]).unsqueeze(0))
        prefit_critic(trainer, torch.tensor(OpRewardProbe.OP_REWARDS, dtype=torch.float32), obs)
    rows: list[dict[str, float]] = []

    def record(tr: PPOTrainer, row: dict[str, float]) -> None:
        ctl = PolicyController(tr.policy, tr.normalizer)
        ctl.act(obs)
        q = ctl.last.q_all[0].numpy()
        buf = tr.buffer
        took_best = (buf.actions[..., 0] == OpRewardProbe.BEST_OP) & buf.valid
        other = ~took_best & buf.valid
        rec = {
            "update": row["update"],
            "env_steps": row["env_steps"],
            "p_best": float(ctl.last.op_probs[0, OpRewardProbe.BEST_OP]),
            **{f"q_{i}": float(q[i]) for i in range(NUM_OPS)},
            "v_pi": float((ctl.last.q_all[0] * ctl.last.op_probs[0]).sum()),
            "signal_gap": signal_gap(op_advantage, q),
            "op_adv_best": float(buf.op_advantages[took_best].mean()) if bool(took_best.any()) else np.nan,
            "op_adv_other": float(buf.op_advantages[other].mean()) if bool(other.any()) else np.nan,
            "episode_return_mean": row["episode_return_mean"],
            "explained_variance": row["explained_variance"],
        }
        rows.append(rec)

    try:
        trainer.run(progress=False, callback=record)
    finally:
        trainer.close()
    return pd.DataFrame(rows)

"""Recurrent PPO for the factored V2 policy (issue 3).

One concept per module: ``config`` (PPOConfig), ``buffer`` (RolloutBuffer, SequenceBatch),
``normalization`` (RunningObsNormalizer), ``collect`` (RolloutCollector, autoreset handling, ``make_vector_env``: sync, async or Ray),
``advantages`` (GAE against Q(s, op), op-head correction), ``update`` (losses and epochs),
``trainer`` (PPOTrainer, train, checkpoints), ``controller`` (PolicyController, load_trained),
``evaluation`` (probe reports).
"""
from esper_lib.finite import NonFiniteError
from esper_lib.ppo.advantages import center_advantages_in_groups, compute_advantages, explained_variance, gae, next_state_values, normalize_masked, op_head_advantages
from esper_lib.ppo.buffer import BufferError, RolloutBuffer, SequenceBatch
from esper_lib.ppo.collect import RolloutCollector, RolloutStats, SingleEnvAdapter, make_vector_env
from esper_lib.ppo.config import BOOTSTRAP_MODES, OP_ADVANTAGE_MODES, VECTOR_ENV_KINDS, PPOConfig
from esper_lib.ppo.controller import PolicyController, load_trained
from esper_lib.ppo.evaluation import action_probability, probe_report
from esper_lib.ppo.normalization import RunningObsNormalizer
from esper_lib.ppo.trainer import METRIC_COLUMNS, PPO_STATE_VERSION, TAMIYO_OBS_KEYS, TIMING_COLUMNS, PPOTrainer, train
from esper_lib.ppo.update import LossOutput, ppo_losses, ppo_update, relevance_mask

__all__ = [
    "BOOTSTRAP_MODES",
    "OP_ADVANTAGE_MODES",
    "VECTOR_ENV_KINDS",
    "METRIC_COLUMNS",
    "PPO_STATE_VERSION",
    "TAMIYO_OBS_KEYS",
    "TIMING_COLUMNS",
    "BufferError",
    "LossOutput",
    "NonFiniteError",
    "PPOConfig",
    "PPOTrainer",
    "PolicyController",
    "RolloutBuffer",
    "RolloutCollector",
    "RolloutStats",
    "RunningObsNormalizer",
    "SequenceBatch",
    "SingleEnvAdapter",
    "action_probability",
    "center_advantages_in_groups",
    "compute_advantages",
    "explained_variance",
    "gae",
    "load_trained",
    "make_vector_env",
    "next_state_values",
    "normalize_masked",
    "op_head_advantages",
    "ppo_losses",
    "ppo_update",
    "probe_report",
    "relevance_mask",
    "train",
]

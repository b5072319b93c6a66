"""Pre-allocated rollout storage for recurrent PPO, and its view as training sequences.

Layout is env-major: every per-step tensor is ``[N, T, ...]`` (N envs, T = ``num_steps``), so the
rollout cut into chunks of ``seq_len`` steps is a free ``view`` ``[N * C, seq_len, ...]``
(C = T / seq_len chunks per env, chunk j of env i at row ``i * C + j``). The LSTM state at the start
of every chunk is stored in ``h0`` / ``c0`` ``[N, C, H]``.

Per step the buffer holds: normalised state, blueprint indices, the eight actions, the masks
actually used (canonicalised; the slot mask is already the op's row of ``slot_by_op``), per-head
log-probs, Q(s, op), Q(s, o) for all ops and pi(o | s) (for the expected baseline and bootstrap),
reward, ``terminated``, ``truncated``, ``valid`` (False for the ignored step of a NEXT_STEP
autoreset), ``episode_starts``, and where truncated the bootstrap value from the post-step
observation in each mode (``bootstrap_sampled`` = Q(s', sampled op), ``bootstrap_expected`` =
sum_o pi(o | s') Q(s', o), ``bootstrap_greedy`` = max over valid o of Q(s', o); NaN where a caller did
not compute it).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from esper_lib.constants import HEAD_NAMES, NUM_HEADS, NUM_OPS, head_sizes

Hidden = tuple[torch.Tensor, torch.Tensor]


def greedy_value(q_all: torch.Tensor, op_mask: torch.Tensor) -> torch.Tensor:
    """``[...]`` max over valid ops of ``q_all`` ``[..., NUM_OPS]`` (``op_mask`` bool, same shape; WAIT is always valid)."""
    return q_all.masked_fill(~op_mask, float("-inf")).amax(-1)


class BufferError(ValueError):
    """A mistake in what is written to a ``RolloutBuffer`` (schema, shape, dtype, overflow)."""


class SequenceBatch(NamedTuple):
    """Training sequences ``[M, L, ...]`` with the LSTM state at their starts."""

    state: torch.Tensor  # [M, L, D] float32 (normalised)
    blueprint_indices: torch.Tensor  # [M, L, S] int64
    actions: torch.Tensor  # [M, L, 8] int64, HEAD_NAMES order
    masks: dict[str, torch.Tensor]  # head -> [M, L, k] bool, canonicalised masks used in the rollout
    log_probs: torch.Tensor  # [M, L, 8] behaviour log-probs
    values: torch.Tensor  # [M, L] Q(s, op) at collection
    returns: torch.Tensor  # [M, L] value targets
    advantages: torch.Tensor  # [M, L, 8] per-head advantages (column 0 = op head)
    valid: torch.Tensor  # [M, L] bool
    episode_starts: torch.Tensor  # [M, L] bool
    hidden: Hidden  # ([1, M, H], [1, M, H]) at the sequence starts

    def select(self, index: torch.Tensor) -> "SequenceBatch":
        """The sequences at ``index`` ``[m]`` (a copy)."""
        return SequenceBatch(
            state=self.state[index],
            blueprint_indices=self.blueprint_indices[index],
            actions=self.actions[index],
            masks={k: v[index] for k, v in self.masks.items()},
            log_probs=self.log_probs[index],
            values=self.values[index],
            returns=self.returns[index],
            advantages=self.advantages[index],
            valid=self.valid[index],
            episode_starts=self.episode_starts[index],
            hidden=(self.hidden[0][:, index], self.hidden[1][:, index]),
        )

    def actions_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.actions[..., i] for i, name in enumerate(HEAD_NAMES)}

    @property
    def num_sequences(self) -> int:
        return self.state.shape[0]


class RolloutBuffer:
    """Fixed-size storage for ``num_steps`` steps of ``num_envs`` envs.

    Write one step for all envs with ``add(...)`` (then ``set_bootstrap`` for envs truncated at
    that step), close the rollout with ``finish(...)``, fill ``advantages`` / ``op_advantages`` /
    ``returns`` (see ``esper_lib.ppo.advantages``), read training chunks with ``sequences()``, and
    ``reset()`` for the next rollout (no reallocation).

    Args:
        num_envs, num_steps: N and T.
        seq_len: length of training sequences; must divide ``num_steps``. The LSTM state must be
            given to ``add`` at every step ``t`` with ``t % seq_len == 0``.
        state_dim, num_slots, hidden_dim: sizes of the stored tensors.
        validate: check the schema of every ``add`` (shapes and dtypes; a few dozen comparisons).
    """

    def __init__(
        self,
        num_envs: int,
        num_steps: int,
        seq_len: int,
        state_dim: int,
        num_slots: int,
        hidden_dim: int,
        device: torch.device | str = "cpu",
        validate: bool = True,
    ):
        for name, value in (("num_envs", num_envs), ("num_steps", num_steps), ("seq_len", seq_len), ("state_dim", state_dim), ("num_slots", num_slots), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BufferError(f"RolloutBuffer: {name} must be a positive int, got {value!r}")
        if num_steps % seq_len:
            raise BufferError(f"RolloutBuffer: seq_len ({seq_len}) must divide num_steps ({num_steps})")
        self.num_envs, self.num_steps, self.seq_len = num_envs, num_steps, seq_len
        self.num_chunks = num_steps // seq_len
        self.state_dim, self.num_slots, self.hidden_dim = state_dim, num_slots, hidden_dim
        self.device = torch.device(device)
        self.validate = validate
        self.head_sizes = head_sizes(num_slots)
        N, T, dev = num_envs, num_steps, self.device

        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        self.state = zeros(N, T, state_dim)
        self.blueprint_indices = zeros(N, T, num_slots, dtype=torch.int64)
        self.actions = zeros(N, T, NUM_HEADS, dtype=torch.int64)
        self.masks = {name: zeros(N, T, k, dtype=torch.bool) for name, k in self.head_sizes.items()}
        self.log_probs = zeros(N, T, NUM_HEADS)
        self.values = zeros(N, T)
        self.q_all = zeros(N, T, NUM_OPS)
        self.op_probs = zeros(N, T, NUM_OPS)
        self.rewards = zeros(N, T)
        self.terminated = zeros(N, T, dtype=torch.bool)
        self.truncated = zeros(N, T, dtype=torch.bool)
        self.valid = zeros(N, T, dtype=torch.bool)
        self.episode_starts = zeros(N, T, dtype=torch.bool)
        self.bootstrap_sampled = zeros(N, T)
        self.bootstrap_expected = zeros(N, T)
        self.bootstrap_greedy = zeros(N, T)
        self.final_value_sampled = zeros(N)
        self.final_value_expected = zeros(N)
        self.final_value_greedy = zeros(N)
        self.h0 = zeros(N, self.num_chunks, hidden_dim)
        self.c0 = zeros(N, self.num_chunks, hidden_dim)
        # filled by esper_lib.ppo.advantages
        self.advantages = zeros(N, T)
        self.op_advantages = zeros(N, T)
        self.returns = zeros(N, T)
        self.pos = 0
        self.finished = False
        self.advantages_ready = False

    # --- writing ------------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self.pos == self.num_steps

    def reset(self) -> None:
        """Start a new rollout (storage is reused)."""
        self.pos = 0
        self.finished = False
        self.advantages_ready = False
        self.bootstrap_sampled.zero_()
        self.bootstrap_expected.zero_()
        self.bootstrap_greedy.zero_()

    def add(
        self,
        *,
        state: torch.Tensor,
        blueprint_indices: torch.Tensor,
        actions: dict[str, torch.Tensor] | torch.Tensor,
        masks: dict[str, torch.Tensor],
        log_probs: dict[str, torch.Tensor] | torch.Tensor,
        values: torch.Tensor,
        q_all: torch.Tensor,
        op_probs: torch.Tensor,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        truncated: torch.Tensor,
        episode_starts: torch.Tensor,
        valid: torch.Tensor | None = None,
        hidden: Hidden | None = None,
    ) -> int:
        """Store one step for all envs; returns its time index ``t``.

        Shapes (N envs): ``state [N, D]`` float, ``blueprint_indices [N, S]`` int64, ``actions``
        head -> ``[N]`` int64 (or ``[N, 8]``), ``masks`` head -> ``[N, k]`` bool (all eight heads),
        ``log_probs`` head -> ``[N]`` (or ``[N, 8]``), ``values`` / ``rewards`` ``[N]`` float,
        ``q_all`` / ``op_probs`` ``[N, NUM_OPS]``, ``terminated`` / ``truncated`` /
        ``episode_starts`` / ``valid`` ``[N]`` bool (``valid`` defaults to all True), ``hidden``
        the LSTM state ``([1, N, H], [1, N, H])`` used as input at this step (required when
        ``t % seq_len == 0``, ignored otherwise).
        """
        if self.finished:
            raise BufferError("RolloutBuffer.add: the rollout is finished; call reset() before adding steps")
        if self.pos >= self.num_steps:
            raise BufferError(f"RolloutBuffer.add: buffer overflow, all {self.num_steps} steps are already stored (call reset())")
        t = self.pos
        chunk_start = t % self.seq_len == 0
        if self.validate:
            self._check_step(state, blueprint_indices, actions, masks, log_probs, values, q_all, op_probs, rewards, terminated, truncated, episode_starts, valid, hidden, chunk_start)
        self.state[:, t] = state
        self.blueprint_indices[:, t] = blueprint_indices
        if isinstance(actions, dict):
            for i, name in enumerate(HEAD_NAMES):
                self.actions[:, t, i] = actions[name]
        else:
            self.actions[:, t] = actions
        if isinstance(log_probs, dict):
            for i, name in enumerate(HEAD_NAMES):
                self.log_probs[:, t, i] = log_probs[name]
        else:
            self.log_probs[:, t] = log_probs
        for name in HEAD_NAMES:
            self.masks[name][:, t] = masks[name]
        self.values[:, t] = values
        self.q_all[:, t] = q_all
        self.op_probs[:, t] = op_probs
        self.rewards[:, t] = rewards
        self.terminated[:, t] = terminated
        self.truncated[:, t] = truncated
        self.episode_starts[:, t] = episode_starts
        if valid is None:
            self.valid[:, t] = True
        else:
            self.valid[:, t] = valid
        if chunk_start:
            self.h0[:, t // self.seq_len] = hidden[0][0]
            self.c0[:, t // self.seq_len] = hidden[1][0]
        self.pos += 1
        return t

    def set_bootstrap(self, t: int, env_index: torch.Tensor, sampled: torch.Tensor, expected: torch.Tensor,
                      greedy: torch.Tensor | None = None) -> None:
        """Bootstrap values of envs ``env_index`` ``[m]`` truncated at step ``t`` (``sampled`` / ``expected`` /
        ``greedy`` ``[m]``; ``greedy`` None stores NaN, which ``bootstrap_mode="greedy"`` refuses)."""
        if not 0 <= t < self.pos:
            raise BufferError(f"RolloutBuffer.set_bootstrap: step {t} has not been stored (stored steps: 0..{self.pos - 1})")
        if greedy is None:
            greedy = torch.full_like(expected, float("nan"))
        if self.validate:
            m = env_index.shape[0]
            for name, x in (("sampled", sampled), ("expected", expected), ("greedy", greedy)):
                if tuple(x.shape) != (m,):
                    raise BufferError(f"RolloutBuffer.set_bootstrap: {name} must have shape ({m},), got {tuple(x.shape)}")
            if not bool(self.truncated[env_index, t].all()):
                raise BufferError(f"RolloutBuffer.set_bootstrap: step {t} is not truncated for every env in env_index")
        self.bootstrap_sampled[env_index, t] = sampled
        self.bootstrap_expected[env_index, t] = expected
        self.bootstrap_greedy[env_index, t] = greedy

    def finish(self, final_value_sampled: torch.Tensor, final_value_expected: torch.Tensor, final_value_greedy: torch.Tensor | None = None) -> None:
        """Close a full rollout with the values of the observation after its last step (``[N]`` each;
        ``final_value_greedy`` None stores NaN, which ``bootstrap_mode="greedy"`` refuses)."""
        if self.pos != self.num_steps:
            raise BufferError(f"RolloutBuffer.finish: only {self.pos} of {self.num_steps} steps are stored")
        if final_value_greedy is None:
            final_value_greedy = torch.full_like(final_value_expected, float("nan"))
        for name, x in (("final_value_sampled", final_value_sampled), ("final_value_expected", final_value_expected),
                        ("final_value_greedy", final_value_greedy)):
            if tuple(x.shape) != (self.num_envs,):
                raise BufferError(f"RolloutBuffer.finish: {name} must have shape ({self.num_envs},), got {tuple(x.shape)}")
        self.final_value_sampled.copy_(final_value_sampled)
        self.final_value_expected.copy_(final_value_expected)
        self.final_value_greedy.copy_(final_value_greedy)
        self.finished = True

    # --- reading ------------------------------------------------------------------------------

    def sequences(self) -> SequenceBatch:
        """All chunks ``[N * C, seq_len, ...]`` (views where possible) with their initial LSTM states."""
        if not self.finished:
            raise BufferError("RolloutBuffer.sequences: the rollout is not finished (call finish())")
        if not self.advantages_ready:
            raise BufferError("RolloutBuffer.sequences: advantages were not computed (esper_lib.ppo.advantages.compute_advantages)")
        N, C, L = self.num_envs, self.num_chunks, self.seq_len

        def chunks(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(N * C, L, *x.shape[2:])

        adv = torch.cat([self.op_advantages.unsqueeze(-1), self.advantages.unsqueeze(-1).expand(N, self.num_steps, NUM_HEADS - 1)], dim=-1)
        return SequenceBatch(
            state=chunks(self.state),
            blueprint_indices=chunks(self.blueprint_indices),
            actions=chunks(self.actions),
            masks={k: chunks(v) for k, v in self.masks.items()},
            log_probs=chunks(self.log_probs),
            values=chunks(self.values),
            returns=chunks(self.returns),
            advantages=chunks(adv),
            valid=chunks(self.valid),
            episode_starts=chunks(self.episode_starts),
            hidden=(self.h0.reshape(1, N * C, self.hidden_dim), self.c0.reshape(1, N * C, self.hidden_dim)),
        )

    def expected_values(self) -> torch.Tensor:
        """``[N, T]`` sum_o pi(o | s_t) Q(s_t, o) under the behaviour policy."""
        return (self.q_all * self.op_probs).sum(-1)

    def greedy_values(self) -> torch.Tensor:
        """``[N, T]`` max over the ops valid at s_t (``masks["op"]``) of Q(s_t, o)."""
        return greedy_value(self.q_all, self.masks["op"])

    # --- validation ---------------------------------------------------------------------------

    def _check_step(self, state, blueprint_indices, actions, masks, log_probs, values, q_all, op_probs, rewards, terminated, truncated, episode_starts, valid, hidden, chunk_start) -> None:
        N = self.num_envs

        def check(name: str, x: object, shape: tuple[int, ...], kind: str) -> None:
            if not torch.is_tensor(x):
                raise BufferError(f"RolloutBuffer.add: {name} must be a tensor of shape {shape}, got {type(x).__name__}")
            if tuple(x.shape) != shape:
                raise BufferError(f"RolloutBuffer.add: {name} must have shape {shape}, got {tuple(x.shape)}")
            ok = {"float": x.is_floating_point(), "int": x.dtype == torch.int64, "bool": x.dtype == torch.bool}[kind]
            if not ok:
                want = {"float": "a floating-point", "int": "int64", "bool": "bool"}[kind]
                raise BufferError(f"RolloutBuffer.add: {name} must be {want} tensor, got dtype {x.dtype}")

        def check_heads(name: str, d: object, kind: str, sizes: dict[str, int] | None) -> None:
            if isinstance(d, dict):
                missing = [h for h in HEAD_NAMES if h not in d]
                extra = sorted(set(d) - set(HEAD_NAMES))
                if missing or extra:
                    raise BufferError(f"RolloutBuffer.add: {name} must have exactly the heads {HEAD_NAMES}; missing {missing}, unknown {extra}")
                for h in HEAD_NAMES:
                    check(f"{name}[{h!r}]", d[h], (N,) if sizes is None else (N, sizes[h]), kind)
            elif sizes is None:
                check(name, d, (N, NUM_HEADS), kind)
            else:
                raise BufferError(f"RolloutBuffer.add: {name} must be a dict head -> tensor, got {type(d).__name__}")

        check("state", state, (N, self.state_dim), "float")
        check("blueprint_indices", blueprint_indices, (N, self.num_slots), "int")
        check_heads("actions", actions, "int", None)
        check_heads("log_probs", log_probs, "float", None)
        check_heads("masks", masks, "bool", self.head_sizes)
        for name, x in (("values", values), ("rewards", rewards)):
            check(name, x, (N,), "float")
        for name, x in (("q_all", q_all), ("op_probs", op_probs)):
            check(name, x, (N, NUM_OPS), "float")
        for name, x in (("terminated", terminated), ("truncated", truncated), ("episode_starts", episode_starts)):
            check(name, x, (N,), "bool")
        if valid is not None:
            check("valid", valid, (N,), "bool")
        if chunk_start:
            if hidden is None:
                raise BufferError(f"RolloutBuffer.add: step {self.pos} starts a sequence (seq_len {self.seq_len}); pass the LSTM state as hidden=(h, c)")
            for name, x in zip(("hidden[0]", "hidden[1]"), hidden):
                check(name, x, (1, N, self.hidden_dim), "float")

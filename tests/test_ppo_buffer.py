"""RolloutBuffer: pre-allocated storage, schema / overflow errors, sequence view."""
import pytest
import torch

from esper_lib.constants import HEAD_NAMES, NUM_OPS, head_sizes
from esper_lib.ppo import BufferError, RolloutBuffer, compute_advantages

N, T, L, D, S, H = 2, 4, 2, 121, 3, 8


def step_kwargs(t: int = 0, n: int = N, **changes):
    sizes = head_sizes(S)
    kw = dict(
        state=torch.full((n, D), float(t)),
        blueprint_indices=torch.full((n, S), -1, dtype=torch.int64),
        actions={h: torch.zeros(n, dtype=torch.int64) for h in HEAD_NAMES},
        masks={h: torch.ones(n, sizes[h], dtype=torch.bool) for h in HEAD_NAMES},
        log_probs={h: torch.zeros(n) for h in HEAD_NAMES},
        values=torch.zeros(n),
        q_all=torch.zeros(n, NUM_OPS),
        op_probs=torch.full((n, NUM_OPS), 1.0 / NUM_OPS),
        rewards=torch.ones(n),
        terminated=torch.zeros(n, dtype=torch.bool),
        truncated=torch.zeros(n, dtype=torch.bool),
        episode_starts=torch.zeros(n, dtype=torch.bool),
        hidden=(torch.full((1, n, H), float(t)), torch.full((1, n, H), -float(t))),
    )
    kw.update(changes)
    return kw


def make_buffer(**kw):
    return RolloutBuffer(N, T, L, D, S, H, **kw)


def test_overflow_raises_clear_error():
    buf = make_buffer()
    for t in range(T):
        buf.add(**step_kwargs(t))
    assert buf.full
    with pytest.raises(BufferError, match="overflow"):
        buf.add(**step_kwargs(T))
    buf.finish(torch.zeros(N), torch.zeros(N))
    with pytest.raises(BufferError, match="finished"):
        buf.add(**step_kwargs(0))
    buf.reset()
    buf.add(**step_kwargs(0))  # storage is reused
    assert buf.pos == 1


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(state=torch.zeros(N, D - 1)), r"state must have shape \(2, 121\)"),
        (dict(state=torch.zeros(N, D, dtype=torch.int64)), r"state must be a floating-point"),
        (dict(blueprint_indices=torch.zeros(N, S)), r"blueprint_indices must be int64"),
        (dict(actions={h: torch.zeros(N, dtype=torch.int64) for h in HEAD_NAMES[:-1]}), r"actions must have exactly the heads.*missing \['alpha_curve'\]"),
        (dict(masks={h: torch.ones(N, 2, dtype=torch.bool) for h in HEAD_NAMES}), r"masks\['op'\] must have shape \(2, 6\)"),
        (dict(log_probs=torch.zeros(N, 7)), r"log_probs must have shape \(2, 8\)"),
        (dict(values=torch.zeros(N, 1)), r"values must have shape \(2,\)"),
        (dict(terminated=torch.zeros(N)), r"terminated must be bool"),
        (dict(q_all=torch.zeros(N, 5)), r"q_all must have shape \(2, 6\)"),
        (dict(hidden=None), r"starts a sequence.*hidden"),
        (dict(hidden=(torch.zeros(1, N, H + 1), torch.zeros(1, N, H))), r"hidden\[0\] must have shape \(1, 2, 8\)"),
    ],
)
def test_schema_errors_name_the_field(change, pattern):
    buf = make_buffer()
    with pytest.raises(BufferError, match=pattern):
        buf.add(**step_kwargs(0, **change))
    assert buf.pos == 0  # nothing was written


def test_hidden_only_required_at_sequence_starts_and_reading_requires_finish():
    buf = make_buffer()
    buf.add(**step_kwargs(0))
    buf.add(**step_kwargs(1, hidden=None))  # t=1 is inside a sequence
    with pytest.raises(BufferError, match="not finished"):
        buf.sequences()
    with pytest.raises(BufferError, match="only 2 of 4"):
        buf.finish(torch.zeros(N), torch.zeros(N))
    with pytest.raises(BufferError, match="not truncated"):
        buf.set_bootstrap(1, torch.tensor([0]), torch.ones(1), torch.ones(1))


def test_bad_constructor_arguments():
    with pytest.raises(BufferError, match="seq_len"):
        RolloutBuffer(2, 5, 2, D, S, H)
    with pytest.raises(BufferError, match="num_envs"):
        RolloutBuffer(0, 4, 2, D, S, H)


def test_sequence_view_layout_and_initial_states():
    buf = make_buffer()
    for t in range(T):
        kw = step_kwargs(t)
        kw["state"] = torch.stack([torch.full((D,), 10.0 * i + t) for i in range(N)])
        kw["hidden"] = (torch.stack([torch.full((H,), 10.0 * i + t) for i in range(N)]).unsqueeze(0), kw["hidden"][1])
        buf.add(**kw)
    buf.finish(torch.zeros(N), torch.zeros(N))
    compute_advantages(buf, gamma=0.9, gae_lambda=0.95)
    seqs = buf.sequences()
    C = T // L
    assert seqs.state.shape == (N * C, L, D)
    # chunk j of env i is row i * C + j, holding steps j*L .. j*L + L - 1
    for i in range(N):
        for j in range(C):
            row = i * C + j
            assert seqs.state[row, :, 0].tolist() == [10.0 * i + j * L + k for k in range(L)]
            assert float(seqs.hidden[0][0, row, 0]) == 10.0 * i + j * L  # LSTM state at the chunk start
    assert seqs.advantages.shape == (N * C, L, len(HEAD_NAMES))
    sub = seqs.select(torch.tensor([3, 0]))
    assert sub.state[0, 0, 0] == seqs.state[3, 0, 0] and sub.hidden[0].shape == (1, 2, H)

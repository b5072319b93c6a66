"""The GPU path: policy and PPO update on CUDA, envs on the CPU. Skipped without a CUDA GPU.

What is asserted: the network's rollout and update verbs agree with the CPU within 1e-4; a tiny PPO
run on a probe reaches the same known optimum as on the CPU (not the same trajectory: CUDA kernels
and the CUDA generator differ from the CPU's); a checkpoint written from CUDA loads on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from esper_lib.constants import HEAD_NAMES
from esper_lib.envs.probes import OpRewardProbe
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.notebooks.shape_checks import make_masks
from esper_lib.ppo import PPOConfig, PPOTrainer, load_trained, probe_report

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, T = 4, 5
PROBE = dict(
    num_envs=4, num_steps=16, seq_len=4, minibatch_sequences=4, epochs=4, lr=3e-3, feature_dim=32, hidden_dim=32,
    ent_coef=0.001, max_grad_norm=1.0, target_kl=None, num_threads=1, gamma=0.9, seed=0, total_updates=40,
)


def nets() -> tuple[FactoredRecurrentActorCritic, FactoredRecurrentActorCritic]:
    torch.manual_seed(3)
    cpu = FactoredRecurrentActorCritic(state_dim=121, num_slots=3, feature_dim=32, hidden_dim=32)
    gpu = FactoredRecurrentActorCritic(state_dim=121, num_slots=3, feature_dim=32, hidden_dim=32)
    gpu.load_state_dict(cpu.state_dict())
    return cpu.eval(), gpu.cuda().eval()


def to(tree, device):
    if isinstance(tree, dict):
        return {k: to(v, device) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to(v, device) for v in tree)
    return tree.to(device)


def assert_close(cpu, gpu, what: str) -> None:
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def test_get_action_and_evaluate_actions_on_cuda_match_cpu():
    cpu, gpu = nets()
    g = torch.Generator().manual_seed(0)
    states = torch.randn(B, T, 121, generator=g)
    bps = torch.randint(-1, 13, (B, T, 3), generator=g)
    masks = [make_masks("slot_by_op", (B,), 3, g) for _ in range(T)]
    hidden_cpu, hidden_gpu = cpu.initial_hidden(B, "cpu"), gpu.initial_hidden(B, "cuda")
    actions = []
    for t in range(T):  # deterministic rollout: argmax of every head, so both devices take the same actions
        a = cpu.get_action(states[:, t], bps[:, t], hidden_cpu, masks[t], deterministic=True, return_q_all=True)
        b = gpu.get_action(states[:, t].cuda(), bps[:, t].cuda(), hidden_gpu, to(masks[t], "cuda"), deterministic=True, return_q_all=True)
        for h in HEAD_NAMES:
            assert torch.equal(a.actions[h], b.actions[h].cpu()), h
            assert_close(a.log_probs[h], b.log_probs[h], f"log_prob {h}")
        assert_close(a.value, b.value, "value")
        assert_close(a.q_all, b.q_all, "q_all")
        assert_close(a.op_probs, b.op_probs, "op_probs")
        assert_close(a.hidden[0], b.hidden[0], "h")
        hidden_cpu, hidden_gpu = a.hidden, b.hidden
        actions.append(a.actions)
    seq_actions = {h: torch.stack([a[h] for a in actions], dim=1) for h in HEAD_NAMES}  # [B, T]
    seq_masks = {k: torch.stack([m[k] for m in masks], dim=1) for k in masks[0]}
    ev_cpu = cpu.evaluate_actions(states, bps, seq_actions, action_mask=seq_masks)
    ev_gpu = gpu.evaluate_actions(states.cuda(), bps.cuda(), to(seq_actions, "cuda"), action_mask=to(seq_masks, "cuda"))
    for h in HEAD_NAMES:
        assert_close(ev_cpu.log_probs[h], ev_gpu.log_probs[h], f"evaluate log_prob {h}")
        assert_close(ev_cpu.entropy[h], ev_gpu.entropy[h], f"evaluate entropy {h}")
    assert_close(ev_cpu.value, ev_gpu.value, "evaluate value")


def solved(trainer: PPOTrainer) -> tuple[float, float]:
    """(worst |Q(s, optimal op) - V*(s)|, lowest p(optimal action)) on held-out episodes."""
    report = probe_report(trainer.policy, OpRewardProbe(gamma=0.9), trainer.normalizer, episodes=8, seed=100)
    return float((report.q_optimal_op - report.true_value).abs().max()), float(report.p_optimal.min())


def test_ppo_on_cuda_reaches_the_cpu_optimum_and_its_checkpoint_loads_on_cpu(tmp_path):
    results = {}
    for device in ("cpu", "cuda"):
        trainer = PPOTrainer(lambda: OpRewardProbe(gamma=0.9), PPOConfig(**PROBE, device=device))
        trainer.run(progress=False)
        results[device] = solved(trainer)
        if device == "cuda":
            assert next(trainer.policy.parameters()).is_cuda and trainer.buffer.state.is_cuda
            path = trainer.save(tmp_path / "cuda.pt")
    for device, (value_error, p_min) in results.items():
        assert value_error < 0.1 and p_min >= 0.9, f"{device}: value error {value_error:.3f}, p {p_min:.3f}"
    assert abs(results["cuda"][0] - results["cpu"][0]) < 0.1

    policy, normalizer, config = load_trained(path)  # written from CUDA, read into CPU tensors
    assert config.device == "cuda" and next(policy.parameters()).device.type == "cpu"
    assert normalizer is not None and normalizer.mean.device.type == "cpu"
    report = probe_report(policy, OpRewardProbe(gamma=0.9), normalizer, episodes=8, seed=100)  # acts on the CPU
    assert float(report.p_optimal.min()) >= 0.9

"""PPO losses: causal masking (exact zero gradient for irrelevant heads), loss values, KL early stop."""
import math

import pytest
import torch

from esper_lib.constants import ENTROPY_COEF_PER_HEAD, HEAD_NAMES, RELEVANCE_TABLE, LifecycleOp, head_sizes
from esper_lib.masking import canonicalise_actions, canonicalise_mask
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.ppo import PPOConfig, SequenceBatch, ppo_losses
from esper_lib.ppo.update import evaluate_batch

OPS = [LifecycleOp.WAIT, LifecycleOp.GERMINATE, LifecycleOp.PRUNE, LifecycleOp.WAIT, LifecycleOp.SET_ALPHA_TARGET, LifecycleOp.FOSSILIZE]


def make_batch(policy: FactoredRecurrentActorCritic, ops=OPS, seed: int = 0) -> SequenceBatch:
    """One sequence of len(ops) steps with the given ops, behaviour log-probs = the current policy's."""
    g = torch.Generator().manual_seed(seed)
    L = len(ops)
    sizes = head_sizes(policy.num_slots)
    op = torch.tensor([[int(o) for o in ops]])
    actions = {h: torch.randint(0, k, (1, L), generator=g) for h, k in sizes.items()}
    actions["op"] = op
    actions = canonicalise_actions(actions)
    masks = {h: canonicalise_mask(h, torch.ones(1, L, k, dtype=torch.bool), op) for h, k in sizes.items()}
    batch = SequenceBatch(
        state=torch.randn(1, L, policy.state_dim, generator=g),
        blueprint_indices=torch.full((1, L, policy.num_slots), -1),
        actions=torch.stack([actions[h] for h in HEAD_NAMES], -1),
        masks=masks,
        log_probs=torch.zeros(1, L, 8),
        values=torch.zeros(1, L),
        returns=torch.randn(1, L, generator=g),
        advantages=torch.randn(1, L, 8, generator=g),
        valid=torch.ones(1, L, dtype=torch.bool),
        episode_starts=torch.zeros(1, L, dtype=torch.bool),
        hidden=policy.initial_hidden(1),
    )
    with torch.no_grad():
        lp, _, v = evaluate_batch(policy, batch)
    return batch._replace(log_probs=lp, values=v)


def test_irrelevant_heads_get_exactly_zero_gradient_from_policy_loss_and_entropy():
    """Leaf tensors for the per-head log-probs and entropies: their gradient is 0 wherever the head is irrelevant."""
    L = len(OPS)
    op = torch.tensor([[int(o) for o in OPS]])
    batch = SequenceBatch(
        state=torch.zeros(1, L, 1), blueprint_indices=torch.zeros(1, L, 1, dtype=torch.int64),
        actions=torch.cat([op.unsqueeze(-1), torch.zeros(1, L, 7, dtype=torch.int64)], -1), masks={},
        log_probs=torch.full((1, L, 8), -0.7), values=torch.zeros(1, L), returns=torch.zeros(1, L),
        advantages=torch.linspace(-1, 1, L * 8).reshape(1, L, 8) + 0.05, valid=torch.ones(1, L, dtype=torch.bool),
        episode_starts=torch.zeros(1, L, dtype=torch.bool), hidden=(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)),
    )
    new_lp = torch.full((1, L, 8), -0.7, requires_grad=True)  # ratio 1: nothing clipped
    entropy = torch.full((1, L, 8), 0.5, requires_grad=True)
    out = ppo_losses(new_lp, entropy, torch.zeros(1, L, requires_grad=True), batch, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5)
    out.loss.backward()
    rel = RELEVANCE_TABLE[op]  # [1, L, 8]
    assert torch.all(new_lp.grad[~rel] == 0.0) and torch.all(entropy.grad[~rel] == 0.0)
    assert torch.all(new_lp.grad[rel] != 0.0) and torch.all(entropy.grad[rel] != 0.0)
    # entropy gradient of a relevant head = -ent_coef * per-head coefficient / number of valid steps
    for h, name in enumerate(HEAD_NAMES):
        for t in range(L):
            if rel[0, t, h]:
                assert float(entropy.grad[0, t, h]) == pytest.approx(-0.01 * ENTROPY_COEF_PER_HEAD[name] / L)


def test_irrelevant_head_logits_get_zero_gradient_through_the_network():
    torch.manual_seed(0)
    policy = FactoredRecurrentActorCritic(feature_dim=16, hidden_dim=16)
    batch = make_batch(policy)
    grads: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inp, out):
            out.retain_grad()
            grads[name] = out
        return hook

    for name in HEAD_NAMES:
        policy.heads[name].register_forward_hook(keep(name))
    log_probs, entropy, values = evaluate_batch(policy, batch)
    out = ppo_losses(log_probs, entropy, values, batch, clip_coef=0.2, ent_coef=0.05, vf_coef=0.0)
    (out.policy_loss - 0.05 * out.entropy_bonus).backward()
    op = batch.actions[0, :, 0]
    for h, name in enumerate(HEAD_NAMES):
        g = grads[name].grad[0]  # [L, k] gradient w.r.t. that head's logits
        for t in range(len(OPS)):
            if RELEVANCE_TABLE[op[t], h]:
                assert g[t].abs().sum() > 0, (name, t)
            else:
                assert torch.all(g[t] == 0.0), (name, t)


def test_all_wait_minibatch_leaves_non_op_heads_without_gradient():
    torch.manual_seed(1)
    policy = FactoredRecurrentActorCritic(feature_dim=16, hidden_dim=16)
    batch = make_batch(policy, ops=[LifecycleOp.WAIT] * 5)
    log_probs, entropy, values = evaluate_batch(policy, batch)
    out = ppo_losses(log_probs, entropy, values, batch, clip_coef=0.2, ent_coef=0.05, vf_coef=0.5)
    out.loss.backward()
    for name in HEAD_NAMES[1:]:
        for p in policy.heads[name].parameters():
            assert p.grad is None or torch.all(p.grad == 0.0), name
    assert any(p.grad.abs().sum() > 0 for p in policy.heads["op"].parameters())
    # heads never relevant in the minibatch report NaN entropy and clip fraction (not a misleading 0)
    for h in range(1, len(HEAD_NAMES)):
        assert math.isnan(float(out.entropy_per_head[h])) and math.isnan(float(out.clip_frac_per_head[h]))


def test_loss_values_against_a_direct_computation():
    torch.manual_seed(2)
    policy = FactoredRecurrentActorCritic(feature_dim=16, hidden_dim=16)
    batch = make_batch(policy)
    # move the behaviour log-probs so some ratios are clipped
    batch = batch._replace(log_probs=batch.log_probs + 0.3 * torch.randn(batch.log_probs.shape), values=batch.values + 0.5)
    lp, ent, val = evaluate_batch(policy, batch)
    out = ppo_losses(lp, ent, val, batch, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, value_clip=0.1)
    lp, ent, val = lp.detach(), ent.detach(), val.detach()
    op = batch.actions[0, :, 0]
    n = len(OPS)
    pl = torch.zeros(8)
    eb = 0.0
    for t in range(n):
        for h, name in enumerate(HEAD_NAMES):
            if not RELEVANCE_TABLE[op[t], h]:
                continue
            r = math.exp(float(lp[0, t, h] - batch.log_probs[0, t, h]))
            a = float(batch.advantages[0, t, h])
            pl[h] += max(-a * r, -a * min(max(r, 0.8), 1.2)) / n
            eb += ENTROPY_COEF_PER_HEAD[name] * float(ent[0, t, h]) / n
    vl = 0.0
    for t in range(n):
        q, old, ret = float(val[0, t]), float(batch.values[0, t]), float(batch.returns[0, t])
        clipped = old + min(max(q - old, -0.1), 0.1)
        vl += 0.5 * max((q - ret) ** 2, (clipped - ret) ** 2) / n
    torch.testing.assert_close(out.policy_loss_per_head.detach(), pl, atol=1e-5, rtol=1e-5)
    assert float(out.entropy_bonus.detach()) == pytest.approx(eb, rel=1e-5)
    assert float(out.value_loss.detach()) == pytest.approx(vl, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(pl.sum()) - 0.01 * eb + 0.5 * vl, rel=1e-5)


def test_target_kl_stops_the_update_early():
    from esper_lib.envs.probes import OpRewardProbe
    from esper_lib.ppo import PPOTrainer

    base = dict(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=1, epochs=8, feature_dim=16, hidden_dim=16, lr=0.05, num_threads=1)
    tr = PPOTrainer(OpRewardProbe, PPOConfig(**base, target_kl=1e-4))
    row = tr.step()
    assert row["early_stop"] == 1.0 and row["epochs_completed"] < 8
    tr2 = PPOTrainer(OpRewardProbe, PPOConfig(**base, target_kl=None))
    row2 = tr2.step()
    assert row2["early_stop"] == 0.0 and row2["epochs_completed"] == 8


def test_entropy_floor_adds_the_shortfall_of_relevant_heads_only():
    torch.manual_seed(3)
    policy = FactoredRecurrentActorCritic(feature_dim=16, hidden_dim=16)
    batch = make_batch(policy)
    lp, ent, val = evaluate_batch(policy, batch)
    kwargs = dict(clip_coef=0.2, ent_coef=0.01, vf_coef=0.5)
    base = ppo_losses(lp, ent, val, batch, **kwargs)
    floors = torch.zeros(8)
    floors[0] = 5.0  # the op head: far above any entropy over 6 ops (ln 6 = 1.79), so every step falls short
    floors[2] = 0.0
    out = ppo_losses(lp, ent, val, batch, entropy_floors=floors, entropy_floor_coef=0.5, **kwargs)
    shortfall = sum(5.0 - float(ent[0, t, 0]) for t in range(len(OPS))) / len(OPS)  # op is relevant at every step
    assert float(out.loss - base.loss) == pytest.approx(0.5 * shortfall, rel=1e-5)
    low = torch.zeros(8)
    low[0] = 1e-6  # below every entropy: no term
    assert float(ppo_losses(lp, ent, val, batch, entropy_floors=low, entropy_floor_coef=0.5, **kwargs).loss) == pytest.approx(float(base.loss))


def test_entropy_floor_config_is_validated():
    assert PPOConfig(entropy_floor_per_head={"op": 0.5}).head_entropy_floors["op"] == 0.5
    with pytest.raises(ValueError, match="entropy_floor_per_head has unknown"):
        PPOConfig(entropy_floor_per_head={"opp": 0.5})
    with pytest.raises(ValueError, match=r"entropy_floor_per_head\['op'\]"):
        PPOConfig(entropy_floor_per_head={"op": -1.0})
    with pytest.raises(ValueError, match="entropy_floor_coef"):
        PPOConfig(entropy_floor_coef=-0.1)


def test_per_relevant_step_averages_each_head_over_its_own_relevant_steps():
    torch.manual_seed(4)
    policy = FactoredRecurrentActorCritic(feature_dim=16, hidden_dim=16)
    batch = make_batch(policy)
    batch = batch._replace(log_probs=batch.log_probs + 0.3 * torch.randn(batch.log_probs.shape))
    lp, ent, val = evaluate_batch(policy, batch)
    floors = torch.full((8,), 5.0)  # above every entropy: every relevant step falls short
    kwargs = dict(clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, entropy_floors=floors, entropy_floor_coef=0.5)
    out = ppo_losses(lp, ent, val, batch, per_relevant_step=True, **kwargs)
    plain = ppo_losses(lp, ent, val, batch, **kwargs)
    lp, ent = lp.detach(), ent.detach()
    op = batch.actions[0, :, 0]
    pl, eb, fl = torch.zeros(8), 0.0, 0.0
    for h, name in enumerate(HEAD_NAMES):
        steps = [t for t in range(len(OPS)) if RELEVANCE_TABLE[op[t], h]]
        for t in steps:  # a head relevant nowhere (e.g. alpha_curve here) adds nothing
            r = math.exp(float(lp[0, t, h] - batch.log_probs[0, t, h]))
            a = float(batch.advantages[0, t, h])
            pl[h] += max(-a * r, -a * min(max(r, 0.8), 1.2)) / len(steps)
            eb += ENTROPY_COEF_PER_HEAD[name] * float(ent[0, t, h]) / len(steps)
            fl += (5.0 - float(ent[0, t, h])) / len(steps)
    torch.testing.assert_close(out.policy_loss_per_head.detach(), pl, atol=1e-5, rtol=1e-5)
    assert float(out.entropy_bonus.detach()) == pytest.approx(eb, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(pl.sum()) - 0.01 * eb + 0.5 * float(out.value_loss) + 0.5 * fl, rel=1e-5)
    # the op head is relevant at every step: both averagings agree on it; a rare head is scaled up
    assert float(out.policy_loss_per_head[0]) == pytest.approx(float(plain.policy_loss_per_head[0]), rel=1e-6)
    assert out.approx_kl == plain.approx_kl and out.value_loss == plain.value_loss
    assert torch.isfinite(out.loss)


def test_head_loss_denominator_is_validated_and_reaches_the_update():
    from esper_lib.envs.probes import OpRewardProbe
    from esper_lib.ppo import PPOTrainer

    with pytest.raises(ValueError, match="head_loss_denominator"):
        PPOConfig(head_loss_denominator="relevant")
    base = dict(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=4, epochs=1, feature_dim=16, hidden_dim=16, num_threads=1, target_kl=None)
    rows = [PPOTrainer(OpRewardProbe, PPOConfig(**base, head_loss_denominator=d)).step() for d in ("valid_steps", "relevant_steps")]
    assert rows[0]["policy_loss_op"] == pytest.approx(rows[1]["policy_loss_op"])  # one minibatch; op relevant everywhere
    assert rows[1]["entropy_bonus"] > rows[0]["entropy_bonus"]  # rarer heads no longer scaled down by their frequency


def test_entropy_floor_updates_keeps_the_floor_for_the_first_updates_only(monkeypatch):
    import esper_lib.ppo.update as update_module
    from esper_lib.envs.probes import OpRewardProbe
    from esper_lib.ppo import PPOTrainer

    with pytest.raises(ValueError, match="entropy_floor_updates"):
        PPOConfig(entropy_floor_updates=0)
    seen: list[bool] = []
    real = update_module.ppo_losses

    def spy(*args, **kwargs):
        seen.append(kwargs.get("entropy_floors") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(update_module, "ppo_losses", spy)
    config = PPOConfig(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=4, epochs=1, feature_dim=16, hidden_dim=16,
                       num_threads=1, target_kl=None, entropy_floor_per_head={"op": 0.5}, entropy_floor_updates=2)
    trainer = PPOTrainer(OpRewardProbe, config)
    for _ in range(3):
        trainer.step()
    assert seen == [True, True, False]  # one minibatch per update; floors in updates 0 and 1 only


def test_entropy_floor_as_a_fraction_of_the_masked_maximum_is_met_at_every_step():
    """``floor_as_max_fraction``: the floor at a step is ``f * ln(valid ops)``, by hand; a fraction of 1 equals ln k."""
    torch.manual_seed(5)
    policy = FactoredRecurrentActorCritic(feature_dim=16, hidden_dim=16)
    batch = make_batch(policy)
    valid_ops = torch.tensor([2, 6, 1, 3, 6, 2][: len(OPS)] + [6] * max(0, len(OPS) - 6))
    op_mask = torch.zeros(1, len(OPS), 6, dtype=torch.bool)
    for t, k in enumerate(valid_ops.tolist()):
        chosen = int(batch.actions[0, t, 0])
        others = [o for o in range(6) if o != chosen][: k - 1]
        op_mask[0, t, [chosen, *others]] = True
    batch = batch._replace(masks={**batch.masks, "op": op_mask})
    lp, ent, val = evaluate_batch(policy, batch)
    kwargs = dict(clip_coef=0.2, ent_coef=0.01, vf_coef=0.5)
    base = ppo_losses(lp, ent, val, batch, **kwargs)
    floors = torch.zeros(8)
    floors[0] = 0.9
    out = ppo_losses(lp, ent, val, batch, entropy_floors=floors, entropy_floor_coef=0.5, floor_as_max_fraction=True, **kwargs)
    shortfall = sum(max(0.0, 0.9 * math.log(int(k)) - float(ent[0, t, 0])) for t, k in enumerate(valid_ops.tolist())) / len(OPS)
    assert float(out.loss - base.loss) == pytest.approx(0.5 * shortfall, rel=1e-5)
    # with a fraction of 1 the floor is ln k: never below the entropy, and a one-choice step adds nothing
    full = floors.clone()
    full[0] = 1.0
    out_full = ppo_losses(lp, ent, val, batch, entropy_floors=full, entropy_floor_coef=0.5, floor_as_max_fraction=True, **kwargs)
    by_hand = sum(math.log(int(k)) - float(ent[0, t, 0]) for t, k in enumerate(valid_ops.tolist())) / len(OPS)
    assert by_hand > 0
    assert float(out_full.loss - base.loss) == pytest.approx(0.5 * by_hand, rel=1e-5, abs=1e-6)


def test_entropy_floor_unit_is_validated_and_reaches_the_update(monkeypatch):
    from esper_lib.envs.probes import OpRewardProbe
    from esper_lib.ppo import PPOTrainer
    import esper_lib.ppo.update as update

    with pytest.raises(ValueError, match="entropy_floor_unit"):
        PPOConfig(entropy_floor_unit="fraction")
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\]"):
        PPOConfig(entropy_floor_unit="max_fraction", entropy_floor_per_head={"op": 1.5})
    seen = []
    real = update.ppo_losses

    def spy(*args, **kwargs):
        seen.append(kwargs.get("floor_as_max_fraction"))
        return real(*args, **kwargs)

    monkeypatch.setattr(update, "ppo_losses", spy)
    base = dict(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=4, epochs=1, feature_dim=16, hidden_dim=16,
                num_threads=1, target_kl=None, entropy_floor_per_head={"op": 0.5})
    PPOTrainer(OpRewardProbe, PPOConfig(**base, entropy_floor_unit="max_fraction")).step()
    PPOTrainer(OpRewardProbe, PPOConfig(**base)).step()
    assert seen and seen[0] is True and seen[-1] is False


def test_a_head_left_out_of_learning_adds_nothing_to_the_loss_and_gets_no_gradient():
    torch.manual_seed(6)
    policy = FactoredRecurrentActorCritic(feature_dim=16, hidden_dim=16)
    batch = make_batch(policy)
    batch = batch._replace(log_probs=batch.log_probs + 0.3 * torch.randn(batch.log_probs.shape))
    floors = torch.full((8,), 5.0)
    kwargs = dict(clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, entropy_floors=floors, entropy_floor_coef=0.5, per_relevant_step=True)
    lp, ent, val = evaluate_batch(policy, batch)
    full = ppo_losses(lp, ent, val, batch, **kwargs)
    no_op = ppo_losses(lp, ent, val, batch, heads_learning=torch.tensor([h != "op" for h in HEAD_NAMES]), **kwargs)
    op_steps = len(OPS)  # the op head is relevant at every step
    op_terms = (float(full.policy_loss_per_head[0]) - 0.01 * ENTROPY_COEF_PER_HEAD["op"] * float(ent[0, :, 0].mean())
                + 0.5 * sum(5.0 - float(ent[0, t, 0]) for t in range(op_steps)) / op_steps)
    assert float(full.loss - no_op.loss) == pytest.approx(op_terms, rel=1e-5)
    torch.testing.assert_close(no_op.policy_loss_per_head, full.policy_loss_per_head)  # still reported
    policy.zero_grad()
    no_op.loss.backward()
    op_head = dict(policy.named_parameters())
    op_grads = [p.grad for n, p in op_head.items() if n.startswith("heads.op.")]
    assert op_grads and all(g is None or float(g.abs().max()) == 0.0 for g in op_grads)


def test_op_warmup_updates_leaves_the_op_head_out_for_the_first_updates(monkeypatch):
    from esper_lib.envs.probes import OpRewardProbe
    from esper_lib.ppo import PPOTrainer
    import esper_lib.ppo.update as update

    with pytest.raises(ValueError, match="op_warmup_updates"):
        PPOConfig(op_warmup_updates=-1)
    seen = []
    real = update.ppo_losses

    def spy(*args, **kwargs):
        h = kwargs.get("heads_learning")
        seen.append(None if h is None else bool(h[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(update, "ppo_losses", spy)
    base = dict(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=4, epochs=1, feature_dim=16, hidden_dim=16, num_threads=1, target_kl=None)
    tr = PPOTrainer(OpRewardProbe, PPOConfig(**base, op_warmup_updates=2))
    for _ in range(3):
        tr.step()
    assert seen == [False, False, None]


def test_heads_learning_at_leaves_out_the_heads_in_their_warm_up():
    from esper_lib.ppo.update import heads_learning_at

    with pytest.raises(ValueError, match="argument_warmup_updates"):
        PPOConfig(argument_warmup_updates=1.5)
    cfg = PPOConfig(op_warmup_updates=2, argument_warmup_updates=4)
    op_only = torch.tensor([h == "op" for h in HEAD_NAMES])
    assert torch.equal(heads_learning_at(cfg, 0), torch.zeros(len(HEAD_NAMES), dtype=torch.bool))
    assert torch.equal(heads_learning_at(cfg, 2), op_only)
    assert torch.equal(heads_learning_at(cfg, 3), op_only)
    assert heads_learning_at(cfg, 4) is None
    assert heads_learning_at(PPOConfig(), 0) is None
    assert torch.equal(heads_learning_at(PPOConfig(op_warmup_updates=1), 0), ~op_only)


def test_argument_warmup_keeps_the_argument_heads_still_while_the_op_head_learns():
    from esper_lib.envs.probes import OpRewardProbe
    from esper_lib.ppo import PPOTrainer

    base = dict(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=4, epochs=1, feature_dim=16, hidden_dim=16, num_threads=1,
                target_kl=None, argument_warmup_updates=2)
    tr = PPOTrainer(OpRewardProbe, PPOConfig(**base))
    named = dict(tr.policy.named_parameters())
    argument_heads = {n: p.detach().clone() for n, p in named.items() if n.startswith("heads.") and not n.startswith("heads.op.")}
    op_head = {n: p.detach().clone() for n, p in named.items() if n.startswith("heads.op.")}
    assert argument_heads and op_head
    for _ in range(2):
        tr.step()
    assert all(torch.equal(named[n], p) for n, p in argument_heads.items())
    assert any(not torch.equal(named[n], p) for n, p in op_head.items())
    tr.step()
    assert any(not torch.equal(named[n], p) for n, p in argument_heads.items())

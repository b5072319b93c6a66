"""Adam for the env's tiny models: torch's fused CPU kernel without ``torch.optim``'s per-step overhead.

The host of ``MorphoEnv`` has about a thousand parameters: one Adam step is a few microseconds of
arithmetic, but ``torch.optim.Adam(fused=True).step()`` spends ~130 us around it (per-parameter
step counters moved one by one, hooks, grouping by device). The env steps one optimizer for the
host and one per learning seed after every minibatch, so that overhead was ~8% of a step with
three seeds. ``FusedAdam`` keeps the same state (per parameter: first and second moments and a
float32 step count) and calls the same kernel (``torch._fused_adam_``) once per step: the updates
equal ``torch.optim.Adam(params, lr, fused=True)``'s bit for bit (``tests/test_fused_adam.py``).

As in ``torch.optim.Adam``, a parameter whose ``.grad`` is None is skipped (its state and step
count stay as they are), and a parameter that has never had a gradient starts from zero moments
and step 0. ``adopt`` moves parameters and their state from another ``FusedAdam`` (a fossilized
seed joins the host's optimizer with its moments and step counts). ``native_clip_and_step`` clips the
gradients and steps in one call of the C kernels (``esper_lib.envs.native``), when they are on;
``native_host_epoch`` runs a whole epoch of a plain host's training with them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from esper_lib.envs import native


class FusedAdam:
    """Adam (``betas``, ``eps``, no weight decay) over ``params``; ``step()`` applies one update.

    Args:
        params: float32 CPU parameters (each at most once).
        lr: learning rate, > 0.
        betas: ``(beta1, beta2)`` in ``[0, 1)``.
        eps: term added to the denominator, > 0.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.params: list[nn.Parameter] = []
        self._exp_avgs: list[torch.Tensor] = []
        self._exp_avg_sqs: list[torch.Tensor] = []
        self._steps: list[torch.Tensor] = []  # 0-dim float32 step counts, as torch.optim.Adam keeps them
        self._add(params, None)

    def _add(self, params: Iterable[nn.Parameter], source: FusedAdam | None) -> None:
        known = {id(p) for p in self.params}
        for p in params:
            if id(p) in known:
                raise ValueError("a parameter appears twice in FusedAdam")
            if p.dtype != torch.float32 or p.device.type != "cpu":
                raise ValueError(f"FusedAdam takes float32 CPU parameters, got {p.dtype} on {p.device}")
            known.add(id(p))
            state = source.state_of(p) if source is not None else None
            if state is None:
                state = (torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), dtype=torch.float32))
            self.params.append(p)
            self._exp_avgs.append(state[0])
            self._exp_avg_sqs.append(state[1])
            self._steps.append(state[2])

    def adopt(self, params: Iterable[nn.Parameter], source: FusedAdam) -> None:
        """Add ``params`` with the moments and step counts they have in ``source`` (shared, not copied)."""
        self._add(params, source)

    def state_of(self, p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(exp_avg, exp_avg_sq, step)`` of ``p``, or None if ``p`` is not optimized here."""
        for i, q in enumerate(self.params):
            if q is p:
                return self._exp_avgs[i], self._exp_avg_sqs[i], self._steps[i]
        return None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        if len(idx) == len(self.params):
            params, exp_avgs, exp_avg_sqs, steps = self.params, self._exp_avgs, self._exp_avg_sqs, self._steps
        else:
            params = [self.params[i] for i in idx]
            exp_avgs = [self._exp_avgs[i] for i in idx]
            exp_avg_sqs = [self._exp_avg_sqs[i] for i in idx]
            steps = [self._steps[i] for i in idx]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params,
            [p.grad for p in params],
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=0.0,
            eps=self.eps,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )

    def native_clip_and_step(self, max_norm: float) -> torch.Tensor | None:
        """Clip the gradients to global norm ``max_norm``, then ``step()``, in one call of the C kernels; returns
        the norm before clipping (0-dim), or None (nothing done) when the kernels are off or a gradient is not
        contiguous float32. The same updates as ``clip_grad_norm_`` then ``step()`` up to float rounding."""
        if not native.enabled():
            return None
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return torch.zeros(())
        params = [self.params[i] for i in idx]
        if not all(p.grad.dtype == torch.float32 and p.grad.is_contiguous() for p in params):
            return None
        return native.clip_adam_(
            params, [self._exp_avgs[i] for i in idx], [self._exp_avg_sqs[i] for i in idx], [self._steps[i] for i in idx],
            self.lr, self.betas, self.eps, max_norm, check=False,
        )

    def native_host_epoch(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        blocks: list[tuple[int, bool]],
        max_norm: float,
        slots: list[native.SlotSeed | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``native.host_epoch`` over this optimizer's parameters (a host's ``host_parameters()`` in order, then any
        fossil's; ``blocks`` from ``HostCNN.native_blocks()``) and its state: ``(losses [nb], norms [nb], seed_norms
        [L, nb], logits [N, Kc])``, or None (nothing done) when the kernels are off."""
        if not native.enabled():
            return None
        return native.host_epoch(
            x, y, batch_size, self.params, blocks, self._exp_avgs, self._exp_avg_sqs, self._steps, self.lr, self.betas,
            self.eps, max_norm, slots, check=False,  # its state stays valid; the env checks its parameters
        )

    def adam_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(exp_avgs, exp_avg_sqs, steps)``, for ``native.SlotSeed`` (a learning seed's own optimizer)."""
        return self._exp_avgs, self._exp_avg_sqs, self._steps

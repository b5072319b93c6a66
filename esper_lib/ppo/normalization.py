"""Running observation normalisation (mean / variance over every observation seen in training).

Only the float ``state`` vector is normalised; blueprint indices and masks are discrete. Statistics
are float64 and merged batch by batch with Chan's parallel formula, so the order of updates within a
batch does not matter. The normalised state is ``clip((x - mean) / sqrt(var + eps), -clip, clip)``;
a feature that never varies maps to 0. ``update`` refuses a batch with a NaN or inf
(``NonFiniteError``) before touching the statistics: one such value would poison them for good.
"""
from __future__ import annotations

from typing import Any

import torch

from esper_lib.finite import check_finite

NORMALIZER_VERSION = 1


class RunningObsNormalizer:
    """Running mean / variance of ``[dim]`` observations.

    Args:
        dim: length of the state vector.
        clip: normalised values are clipped to ``[-clip, clip]``.
        eps: added to the variance before the square root.
    """

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip!r}")
        self.dim = dim
        self.clip = float(clip)
        self.eps = float(eps)
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.var = torch.ones(dim, dtype=torch.float64)
        self.count = 0.0
        self._refresh()

    def _refresh(self) -> None:
        # float32 copies used on the hot path (recomputed after each update only).
        self._mean32 = self.mean.float()
        self._inv_std32 = (self.var + self.eps).rsqrt().float()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``x [B, dim]`` into the statistics; a non-finite entry raises ``NonFiniteError`` first."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"normalizer update expects [B, {self.dim}], got {tuple(x.shape)}")
        check_finite("normalizer update batch", x, axes=("row", "feature"))
        n = x.shape[0]
        if n == 0:
            return
        x = x.to(torch.float64)
        b_mean = x.mean(dim=0)
        b_var = x.var(dim=0, unbiased=False)
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * (n / total)
        m2 = self.var * self.count + b_var * n + delta.square() * (self.count * n / total)
        self.var = m2 / total
        self.count = total
        self._refresh()

    @torch.no_grad()
    def normalize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., dim]`` -> float32 normalised and clipped (written into ``out`` when given)."""
        if out is None:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        torch.sub(x, self._mean32.to(x.device), out=out)
        out.mul_(self._inv_std32.to(x.device)).clamp_(-self.clip, self.clip)
        return out

    __call__ = normalize

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": NORMALIZER_VERSION,
            "dim": self.dim,
            "clip": self.clip,
            "eps": self.eps,
            "mean": self.mean.clone(),
            "var": self.var.clone(),
            "count": float(self.count),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; a wrong version or size raises ``ValueError``."""
        if not isinstance(state, dict) or state.get("version") != NORMALIZER_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"observation normaliser state has version {got!r}; expected {NORMALIZER_VERSION}")
        if state["dim"] != self.dim:
            raise ValueError(f"observation normaliser state is for dim {state['dim']}, this normaliser has dim {self.dim}")
        self.clip = float(state["clip"])
        self.eps = float(state["eps"])
        self.mean = state["mean"].to(torch.float64).clone()
        self.var = state["var"].to(torch.float64).clone()
        self.count = float(state["count"])
        self._refresh()

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "RunningObsNormalizer":
        if not isinstance(state, dict) or "dim" not in state:
            raise ValueError("observation normaliser state must be a dict from RunningObsNormalizer.state_dict()")
        norm = cls(int(state["dim"]))
        norm.load_state_dict(state)
        return norm

    def __repr__(self) -> str:
        return f"RunningObsNormalizer(dim={self.dim}, count={self.count:.0f}, clip={self.clip})"

"""Non-finite values (NaN, +-inf): one exception class and one check, used from the network to PPO.

A NaN that reaches an optimizer step poisons every weight at once, and a running normaliser that
ingests one never recovers. So inputs are checked where they enter (network inputs when
``validate_inputs`` is on; rewards and observations as the collector receives them, before the
normaliser sees them) and training signals before the step (advantages and returns, the loss, the
gradient norm). Each check is one ``sum()`` reduction when the tensor is clean; only a
failing check pays for locating the first bad entry.

``NonFiniteError`` subclasses both ``ValueError`` (a bad input, as every other validation error) and
``FloatingPointError`` (a numerical failure), so either ``except`` catches it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class NonFiniteError(ValueError, FloatingPointError):
    """A NaN or inf where a finite value is required; the message names what, and where.

    Attributes:
        what: the name of the checked quantity (``"reward"``, ``"state"``, ``"loss"``...).
        index: the index of the first non-finite entry (``[]`` for a scalar).
    """

    def __init__(self, message: str, what: str = "", index: Sequence[int] = ()):
        super().__init__(message)
        self.what = what
        self.index = list(index)


def check_finite(what: str, x: torch.Tensor, *, axes: Sequence[str] = (), where: str = "") -> None:
    """Raise ``NonFiniteError`` unless every entry of ``x`` is finite.

    :param what: name of the quantity, first word of the message.
    :param x: tensor of any shape (integer and bool tensors are always finite).
    :param axes: names of the leading dimensions (e.g. ``("env", "feature")``), so the message reads
        ``at env 1, feature 7`` instead of ``at index [1, 7]``.
    :param where: appended to the message (e.g. ``" at rollout step 5 of update 2"``).
    """
    # One reduction: the sum is finite iff every entry is (a NaN or an inf anywhere makes it NaN or inf);
    # only when it is not (a real non-finite entry, or finite entries whose sum overflows) pay for the exact check.
    if not x.is_floating_point() or math.isfinite(float(x.detach().sum())) or bool(torch.isfinite(x).all()):
        return
    bad = ~torch.isfinite(x)
    index = bad.nonzero()[0].tolist()
    value = x[tuple(index)].item()
    named = [f"{a} {i}" for a, i in zip(axes, index)]
    if len(index) > len(axes):
        named.append(f"index {index[len(axes):]}")
    loc = f" at {', '.join(named)}" if named else ""
    count = int(bad.sum())
    more = f" ({count} non-finite entries in all)" if count > 1 else ""
    raise NonFiniteError(f"{what} contains a non-finite value ({value}){loc}{where}{more}", what=what, index=index)


__all__ = ["NonFiniteError", "check_finite"]

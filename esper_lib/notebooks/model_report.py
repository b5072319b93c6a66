"""Tables and plots that describe a built V2 network (notebook 01)."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn

from esper_lib.network import FactoredRecurrentActorCritic, expected_parameter_count


def parameter_frame(net: FactoredRecurrentActorCritic) -> pd.DataFrame:
    """Parameters per module, with share of the total and a final ``TOTAL`` row."""
    rows = net.parameter_table()
    total = sum(n for _, n in rows)
    df = pd.DataFrame(rows, columns=["module", "parameters"])
    df["share_%"] = (100 * df["parameters"] / total).round(2)
    df.loc[len(df)] = ["TOTAL", total, 100.0]
    return df


def parameter_count_check(net: FactoredRecurrentActorCritic) -> pd.DataFrame:
    """Counted parameters vs the count computed from the plan's layer list, and the plan's claim."""
    counted = sum(p.numel() for p in net.parameters())
    from_layers = expected_parameter_count(net.state_dim, net.num_slots, net.feature_dim, net.hidden_dim)
    return pd.DataFrame(
        [
            ("counted from the module", counted),
            ("computed from the layer list", from_layers),
            ("plan's stated figure (approx.)", 2_100_000),
        ],
        columns=["source", "parameters"],
    )


def init_gain_frame(net: FactoredRecurrentActorCritic) -> pd.DataFrame:
    """For every Linear: expected orthogonal gain, measured singular-value range, and whether they agree.

    An orthogonal matrix scaled by ``g`` has every singular value equal to ``g``.
    """
    last_layers = {id(head[-1]) for head in net.heads.values()}
    rows = []
    for name, module in net.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if id(module) in last_layers:
            expected = 0.01
        elif module is net.value_head[-1]:
            expected = 1.0
        else:
            expected = math.sqrt(2)
        sv = torch.linalg.svdvals(module.weight.detach())
        rows.append((name, tuple(module.weight.shape), expected, sv.min().item(), sv.max().item()))
    df = pd.DataFrame(rows, columns=["layer", "weight_shape", "expected_gain", "sv_min", "sv_max"])
    df["ok"] = ((df["sv_min"] - df["expected_gain"]).abs() < 1e-3 * df["expected_gain"] + 1e-5) & (
        (df["sv_max"] - df["expected_gain"]).abs() < 1e-3 * df["expected_gain"] + 1e-5
    )
    h = net.hidden_dim
    forget = (net.lstm.bias_ih_l0[h : 2 * h] + net.lstm.bias_hh_l0[h : 2 * h]).detach()
    df.loc[len(df)] = ["lstm forget-gate bias (sum)", (h,), 1.0, forget.min().item(), forget.max().item(), bool((forget == 1).all())]
    return df


def plot_parameters(df: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Horizontal bar chart of ``parameter_frame`` (without the total), on a log axis.

    Module sizes span four orders of magnitude (the LSTM's 2.1M against a 6-way head's ~1.5k); on a
    linear axis the small modules would be invisible. Each bar is labelled with its exact count.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    body = df[df["module"] != "TOTAL"]
    counts = body["parameters"].astype(float)
    ax.barh(body["module"], counts, color="tab:blue")
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(max(counts.min() / 3, 1.0), counts.max() * 8)  # room for the labels right of the bars
    ax.set_xlabel("parameters (log scale)")
    total = int(df.loc[df["module"] == "TOTAL", "parameters"].iloc[0])
    ax.set_title(f"V2 parameters per module (total {total:,})")
    for y, n in enumerate(body["parameters"]):
        ax.text(n, y, f" {int(n):,}", va="center", fontsize=8)
    ax.figure.tight_layout()
    return ax.figure

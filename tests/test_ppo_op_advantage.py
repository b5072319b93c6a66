"""The op-head estimator on the op-dependent probe: ``expected`` (default) vs ``q`` (the plan's).

The full comparison (5 seeds, figure, numbers) is ``scripts/op_advantage_study.py`` -> docs/op_advantage.md.
"""
import pandas as pd
import pytest

from esper_lib.ppo.experiments import op_advantage_run


@pytest.fixture(scope="module")
def curves() -> dict[tuple[str, bool], pd.DataFrame]:
    return {
        (mode, prefit): op_advantage_run(mode, seed=0, num_updates=20, prefit=prefit)
        for mode in ("expected", "q")
        for prefit in (False, True)
    }


def test_learning_curves_are_recorded(curves):
    for df in curves.values():
        assert len(df) == 20 and {"p_best", "q_4", "op_adv_best", "op_adv_other"} <= set(df.columns)


def test_expected_learns_the_better_op(curves):
    for prefit in (False, True):
        df = curves[("expected", prefit)]
        assert df.p_best.iloc[-1] >= 0.9, f"prefit={prefit}: p(best op) {df.p_best.iloc[-1]:.3f}"
        # the learned Q of the best op is right too
        assert abs(df.q_4.iloc[-1] - 1.0) < 0.1


def test_with_an_accurate_critic_the_plans_estimator_leaves_the_op_head_without_signal(curves):
    q, ex = curves[("q", True)], curves[("expected", True)]
    # first update after the critic was fitted: op-head advantages of best vs other ops
    gap_q = q.op_adv_best.iloc[0] - q.op_adv_other.iloc[0]
    gap_ex = ex.op_adv_best.iloc[0] - ex.op_adv_other.iloc[0]
    assert abs(gap_q) < 0.05 < 0.3 < gap_ex
    assert q.p_best.iloc[-1] < 0.5 < 0.9 <= ex.p_best.iloc[-1]

"""Judging a controller (design section 5 and 5b): baselines, the best fixed schedule, statistics.

- ``baselines``: always-WAIT, random masked and heuristic controllers, ``evaluate_controller``
  (one row per episode over a list of seeds) and ``summarize_results``;
- ``schedules``: fixed (open-loop) schedules, their grid, best-member selection on training seeds
  and ``headroom_table``;
- ``stats``: paired differences, IQM, P(improvement), (stratified) bootstrap CIs,
  ``compare_controllers``;
- ``plots``: ``plot_paired_differences``, every held-out episode with the paired statistic.

Nothing is imported here: import the module you need (``from esper_lib.evaluation.stats import
compare_controllers``). Probe-env checks of a PPO policy are ``esper_lib.ppo.evaluation``.
"""

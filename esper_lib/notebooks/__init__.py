"""The code behind the notebooks in ``notebooks/`` and their headless runs.

- ``helpers``: what every notebook shares (``repo_root``, ``resolve_path``, ``display_path``,
  ``show_and_save``, ``progress_bar``);
- ``runner``: the papermill runner, ``python -m esper_lib.notebooks.runner`` (``make run``);
- ``model_report`` (notebook 01) and ``shape_checks`` (notebook 02): tables and checks of a built
  network;
- ``training_report`` (notebook 04): episode and step recorders of a PPO run and its plots.

Nothing is imported here: import the module you need (``from esper_lib.notebooks.helpers import
show_and_save``), so that ``python -m esper_lib.notebooks.runner`` does not load the runner twice.
"""

"""Evaluation backends: ``lm_eval_model.py`` registers batchpilot as an lm-eval-harness model type.

Importing this package imports nothing heavy; ``batchpilot.eval.lm_eval_model`` needs the ``eval`` extra
(``pip install batchpilot[eval]``, which brings lm-eval).
"""

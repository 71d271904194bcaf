"""moecpt.analysis: pure metrics (routing metrics, forgetting, evaluation of checkpoints) and `moecpt eval` / `compare`.

The study that uses them is :mod:`moecpt.study`, one layer above (docs/design.md, rule A2).
"""

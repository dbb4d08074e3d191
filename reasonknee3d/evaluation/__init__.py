"""ReasonKnee-Bench evaluation: output parsing, metrics, the report, and the scorer (docs/benchmark.md).

Kept import-light on purpose: ``reasonknee3d score`` must start fast and never import torch or
transformers, so this package imports nothing; use the submodules (``evaluation.score``,
``reasonknee3d.parsing``, ``evaluation.metrics``, ``evaluation.report``).
"""

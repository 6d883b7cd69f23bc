"""ual: uncertainty-aware learning for language models.

Each training sample gets its own label-smoothing value, derived from how much
its task admits diverse answers (its uncertainty). See README.md and the stages:
data -> scoring -> smoothing -> training -> evaluation -> report.
"""

__version__ = "0.1.0"

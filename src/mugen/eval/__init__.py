"""Evaluation: prompt adherence on procedural clips (`procedural`), and the metrics of other modules."""

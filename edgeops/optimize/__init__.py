"""Model optimization: quantization (quantize.py) behind two gates (gates.py): an accuracy
budget and a measured speedup. ISA-aware int8 settings live in isa.py, graph chores
(pre-processing, weight accounting, sensitivity ranking) in graph.py."""

from .quantize import MODES, BudgetError, Progress, QuantizeReport, Variant, quantize

__all__ = ["MODES", "BudgetError", "Progress", "QuantizeReport", "Variant", "quantize"]

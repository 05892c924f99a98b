"""Model optimization: quantization (quantize.py) behind two gates (gates.py): an accuracy
budget and a measured speedup. ISA-aware int8 settings live in isa.py, graph chores
(pre-processing, weight accounting, sensitivity ranking) in graph.py.

Entry point: `from edgeops.optimize.quantize import quantize` (not re-exported here, so the
name `edgeops.optimize.quantize` stays the module)."""

"""Benchmarks of the JAX port against the PyTorch reference (cross-framework code: imports both).

``python -m benchmarks.step_time`` times one SGD step, penalised and plain, in both
frameworks side by side; see ``benchmarks/step_time.py``.
"""

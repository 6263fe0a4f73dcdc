"""Benchmarks (``attrctl bench``, ``benchmarks/``); importing this package loads nothing.

* :mod:`attrctl.bench.harness` — the measurement harness both use: environment record, a fresh
  process per row, peak memory (CUDA allocator or the kernel's RSS high-water mark), timing
  statistics and Markdown table pieces.
* :mod:`attrctl.bench.loss` — the fused-loss rows (``attrctl bench loss``).
* :mod:`attrctl.bench.train` — the training-step, sampler and head-fit rows
  (``attrctl bench train``).
"""

"""Benchmarks of the fused Adafactor step: ``python -m bench`` (see
``bench/__main__.py``). One module per question:

- ``floor``: the least time a step's memory traffic can take here,
- ``optimizer_step``: one optimizer step per parameter set, dtype and arm,
  against its floor, with its peak and resident memory,
- ``training``: steps per second of training loops, and the optimizer's
  share of a step.

What one GPU step would launch is computed from the launch plan by
``tests/metal/plan_summary.py`` (it needs the Metal emulator, not a timer).
"""

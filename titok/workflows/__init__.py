"""Workflows: what a titok command does, from a typed config to a result folder.

``pipeline`` (a transplant as named stages), ``zoo`` (``titok migrate``), ``compare`` and ``report``,
``sft``, ``evaluate`` and ``harness`` (``titok eval``), ``plan``, ``demo``. Floor 3: a workflow may
import anything below it (cores, infrastructure, Ray shells) and other workflows; nothing below
imports a workflow, and only ``titok.cli`` sits above (``tests/test_imports.py``).
"""

"""titok: transplant LoRA adapters between LLM backbones (TiTok, arXiv 2510.04682) on Ray.

The package is built in floors; a module imports its own floor and those below, never one above
(``tests/test_imports.py`` walks the imports and fails on an upward one or a cycle):

0. names: ``choices`` (filter methods, engines, references, stages), ``columns``;
1. pure cores and task data: ``core/`` (excess, filters, span transfer, losses, metrics, statistics,
   query checks, tokenization) and ``tasks/``;
2. infrastructure and Ray shells: configs, run folders, models, hardware, progress and signals at
   the root; ``engines/``, ``stages/`` (Ray Data) and ``train/`` (Ray Train + DeepSpeed);
3. ``workflows/``: what each command does (pipeline, zoo, compare, sft, evaluate, plan, ...);
4. ``cli``.
"""

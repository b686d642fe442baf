"""Pure cores: arrays, tensors and text in, arrays, tensors and text out; no Ray, no run folder.

Each stage's maths lives here and is unit-tested without Ray (contrastive excess, the filters, the
character-span transfer, the losses, metrics and statistics, the query checks); the Ray shells in
``titok.stages``, ``titok.engines`` and ``titok.train`` call them. Floor 1: a core imports only
``titok.choices``, ``titok.columns``, ``titok.tasks`` and other cores (``tests/test_imports.py``).
"""

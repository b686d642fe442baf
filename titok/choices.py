"""The names a config may choose among, without the code behind them.

``config.py`` (and with it every ``--help``) reads these; the modules that implement them import
them from here. Keeping them apart from ``loss.py`` (torch) and ``reference.py`` (transformers) is
what lets ``titok --help`` and config validation start in well under a second.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["REFERENCES", "STAGES", "TOKEN_SCOPES", "Normalization", "Reference", "TokenScope"]

# the selective loss's normalization (titok.loss)
Normalization = Literal["selected_mean", "rho1"]

# whose log-probabilities the excess is measured against (titok.reference)
Reference = Literal["source_amateur", "target_base", "both"]
REFERENCES: tuple[str, ...] = Reference.__args__

# where the top-k% token cut is taken (titok.select)
TokenScope = Literal["per_sample", "per_batch", "global"]
TOKEN_SCOPES: tuple[str, ...] = TokenScope.__args__

# a transplant's stages, in order (titok.pipeline; ``titok transplant --until``)
STAGES: tuple[str, ...] = ("queries", "labels", "scores", "filter", "align", "train", "export")

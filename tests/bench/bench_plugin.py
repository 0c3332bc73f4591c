"""A test-only plugin for bench suites run in SUBPROCESSES (never imported by the pytest process, so
the method registry that docs/methods.md mirrors stays untouched there).

``flaky``: equal weighting that raises at its 3rd combine call while the file named by
``$MTLENS_TEST_FLAKY`` exists (validation's dry run makes one call per instance, so the suite loads
and the run fails early in training). Remove the file and the retried run succeeds.
"""

from __future__ import annotations

import os

import torch

from mtlens.engine.protocols import LossWeighting
from mtlens.methods._registry import register


class _CountingEW(LossWeighting):
    """Equal weighting that counts its calls (the base of the test-only methods below)."""

    reference = "test-only"

    def __init__(self):
        self.calls = 0

    def weights(self, losses, grad_norms=None):
        return torch.ones_like(losses)


@register
class Flaky(_CountingEW):
    name = "flaky"

    def combine(self, losses, grad_norms=None):
        self.calls += 1
        marker = os.environ.get("MTLENS_TEST_FLAKY")
        if self.calls >= 3 and marker and os.path.exists(marker):
            raise RuntimeError("flaky: injected failure for the test")
        return losses.sum(), torch.ones_like(losses.detach())


@register
class Diverging(_CountingEW):
    """Equal weighting whose combined loss is NaN from its 3rd call on: a run that diverges (under
    ``train.nonfinite=skip`` every step is then skipped) while the other runs of the suite train normally."""

    name = "diverging"

    def combine(self, losses, grad_norms=None):
        self.calls += 1
        scale = float("nan") if self.calls >= 3 else 1.0
        return losses.sum() * scale, torch.ones_like(losses.detach())

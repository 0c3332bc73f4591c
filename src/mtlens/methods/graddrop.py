"""GradDrop: keep, at each representation entry, only the gradients of one randomly chosen sign."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.protocols import SCALE_FREE, JacobianAggregator
from ..errors import ConfigurationError, ShapeError
from ._registry import register
from ._utils import Seeded, check


@register
class GradDrop(Seeded, JacobianAggregator):
    """GradDrop (Gradient Sign Dropout) on the shared representation.

    Reference: Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign:
    Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020,
    arXiv:2010.06808 (Eq. 1–2, Algorithm 1). With ``S_i = ∂L_i/∂Z`` (the block the engine passes
    at feature level, shape (T, *Z.shape))::

        P   = ½ (1 + Σ_i G_i / Σ_i |G_i|)                     (positive sign purity, in [0, 1])
        M_i = 1[P > U] · 1[G_i > 0] + 1[P < U] · 1[G_i < 0],   U ~ Uniform(0, 1) element-wise
        dZ  = Σ_i (ℓ_i + (1 − ℓ_i) M_i) ∘ S_i

    with ``f`` = identity (the paper's default). ``G_i = S_i`` element-wise (``batch_reduce=False``,
    the default, as TorchJD), or the paper's batch-separated form ``G_i = Σ_batch sign(Z) ∘ S_i``
    (``batch_reduce=True``, as LibMTL): one mask per feature position shared by the batch. That
    form needs the activations ``Z``, which the engine passes (declared: ``needs_features``).
    Entries where every ``G_i`` is 0 get ``P = ½`` (LibMTL adds 1e-7 to the denominator instead,
    which biases ``P`` towards ½ for gradients of magnitude ≲ 1e-7).

    Defined on the representation only: ``levels = ("feature",)``; the engine raises at
    parameter level. Head parameters get every task's gradient with weight 1.

    Hyper-parameters (defaults): ``leak=0.0`` (no leak, the paper's multitask setting; a float
    for every task or one value per task, each in [0, 1]); ``seed=None`` (fresh seed; an int
    makes the masks reproducible; the generator state is in ``state_dict()``);
    ``batch_reduce=False``.
    """

    name = "graddrop"
    levels = ("feature",)
    needs_features = True
    reference = "Chen et al., Just Pick a Sign: Gradient Sign Dropout, arXiv:2010.06808"
    defaults_source = "identity f and leak 0 as in the paper's multitask experiments"
    stateful = True
    head_rule = "own gradient, unit weights (the masks act on the representation; LibMTL, TorchJD)"

    claims = {
        "homogeneous": SCALE_FREE,
    }

    def __init__(self, leak: float | Sequence[float] = 0.0, seed: int | None = None,
                 batch_reduce: bool = False) -> None:
        values = [leak] if isinstance(leak, (int, float)) else list(leak)
        check(len(values) > 0 and all(isinstance(x, (int, float)) and 0.0 <= x <= 1.0 for x in values),
              f"{self.name}: leak must be a number in [0, 1] or a sequence of them, got {leak!r}")
        self.leak = float(leak) if isinstance(leak, (int, float)) else tuple(float(x) for x in values)
        check(isinstance(batch_reduce, bool),
              f"{self.name}: batch_reduce must be a bool, got {batch_reduce!r}")
        self.batch_reduce = batch_reduce
        self._seed(seed)
        self._kept = float("nan")

    def _leak_vector(self, T: int) -> Tensor:
        if isinstance(self.leak, float):
            return torch.full((T,), self.leak, dtype=torch.float64)
        if len(self.leak) != T:
            raise ShapeError(f"{self.name}: {len(self.leak)} leak values for {T} tasks")
        return torch.tensor(self.leak, dtype=torch.float64)

    def aggregate(self, jacobian: Sequence[Tensor], losses: Tensor,
                  features: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        blocks = list(jacobian)
        if len(blocks) != 1:
            raise ConfigurationError(
                f"{self.name} is defined on the shared representation: it needs one block (T, *Z.shape) "
                f"(level='feature'), got {len(blocks)} blocks (parameter level?)"
            )
        S = blocks[0]
        if S.ndim < 2:
            raise ShapeError(f"{self.name}: expected a block (T, *Z.shape), got {tuple(S.shape)}")
        T = S.shape[0]
        if self.batch_reduce:
            if features is None:
                raise ConfigurationError(
                    f"{self.name}(batch_reduce=True) needs the activations Z (features=) for sign(Z); "
                    "pass features= or use batch_reduce=False (element-wise sign purity)."
                )
            if tuple(features.shape) != tuple(S.shape[1:]) or S.ndim < 3:
                raise ShapeError(
                    f"{self.name}: features of shape {tuple(features.shape)} do not match saliencies "
                    f"{tuple(S.shape)} (batch_reduce needs a batch dimension)"
                )
            Gi = (S * torch.sign(features.detach()).to(S.dtype).unsqueeze(0)).sum(1, keepdim=True)
        else:
            Gi = S
        num = Gi.sum(0)
        den = Gi.abs().sum(0)
        purity = torch.where(den > 0, 0.5 * (1.0 + num / torch.where(den > 0, den, torch.ones_like(den))),
                             torch.full_like(den, 0.5))
        U = torch.rand(purity.shape, generator=self.generator, dtype=torch.float64).to(purity.device, purity.dtype)
        keep_pos = (purity > U).unsqueeze(0)
        keep_neg = (purity < U).unsqueeze(0)
        M = (keep_pos & (Gi > 0)) | (keep_neg & (Gi < 0))
        leak = self._leak_vector(T).to(S.device, S.dtype).reshape(T, *([1] * (S.ndim - 1)))
        factor = leak + (1.0 - leak) * M.to(S.dtype)
        out = (factor * S).sum(0)
        self._kept = float(M.to(torch.float64).mean())
        return [out], torch.ones(T, dtype=torch.float64)

    def log_values(self) -> dict[str, float]:
        return {"graddrop/kept_fraction": self._kept}

"""Rep-MTL: regularising the representation-level task saliencies ``S_t = ∂L_t/∂Z``.

Wang, Li, Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency for
Multi-Task Learning", ICCV 2025, arXiv:2507.21049. Equations, and every ambiguity of the paper
with how mtlens resolves it (marked [choice]): ``docs/rep_mtl.md``.

Two penalties on the stacked saliencies ``S`` of shape ``(T, B, C, *spatial)`` (vector
features ``(T, B, C)`` are treated as ``H = W = 1``):

* **TSR** (Eqs. 4–6, :func:`~mtlens.engine.saliency.tsr_loss`, re-exported here): signed channel
  mean, absolute value, L1 normalisation across tasks at every location, mean entropy — minimised.
* **CSA** (Eqs. 7–9, :func:`csa_loss`): per-task channel Gram matrices ``M_t[b] = S_t[b] S_t[b]ᵀ``
  aligned with per-sample anchors ``Â_b = A_b A_bᵀ`` by a contrastive loss, computed through
  Frobenius identities so that no per-task ``C×C`` matrix is ever built when ``HW < C``.

Both are exact at any saliency scale (saliencies of 1e-10 give the value of saliencies of 1):
every quantity is homogeneous of degree 0 in the scale it is normalised by, so each is rescaled
by a detached maximum before normalising, which changes neither the value nor the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..engine.protocols import Regularizer
from ..engine.saliency import channels_by_locations as _channels_by_locations
from ..engine.saliency import safe_divisor as _safe
from ..engine.saliency import saliency_stack, tsr_from_channel_means, tsr_loss
from ..errors import ConfigurationError, ShapeError
from ._registry import register
from ._utils import check, positive

__all__ = [
    "CSA_FORMS", "CSA_TASK_REDUCTIONS", "RepMTL", "SaliencyMoments", "csa_from_moments", "csa_loss", "saliency_moments",
    "saliency_stack", "tsr_loss",
]

CSA_FORMS = ("printed", "infonce")
CSA_TASK_REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------------------------
# CSA (TSR and the saliency helpers live in mtlens.engine.saliency, shared with mtlens.diagnose)


def anchor_gram(An: Tensor) -> Tensor:
    """``K[b, k] = ⟨Â_b, Â_k⟩_F`` for anchors ``Â_b = A_b A_bᵀ`` given ``An = (A_b)`` of shape (B, C, T).

    Two exact forms of the same numbers; the cheaper one is used:

    * **pairs**: ``K[b, k] = ‖A_bᵀ A_k‖_F²`` — ``B²·T²·C`` multiply-adds, a ``B × B × T × T``
      intermediate; no C×C matrix (the form for ``T² ≤ C`` or wide maps).
    * **outer**: ``K = Φ Φᵀ`` with ``Φ_b`` the upper triangle of ``Â_b`` (``⟨X, Y⟩_F =
      Σ_c X_cc Y_cc + 2 Σ_{c<d} X_cd Y_cd`` for symmetric X, Y) — ``B·C²·T + B²·C(C+1)/2``
      multiply-adds, a ``B × C × C`` intermediate; chosen only when it costs less than half the
      operations AND its intermediate is no larger than the pairs form's (``C² ≤ B·T²``), so it never
      holds ``B·T·C²`` and never more memory than the pairs form would.

    Many tasks on narrow features (the MLP benchmark: B = 256, C = 256, T = 40) take the outer
    form: ~11× fewer operations than the pairs form there."""
    B, C, T = An.shape
    pairs = B * B * T * T * C
    outer = B * C * C * T + B * B * C * (C + 1) // 2
    if 2 * outer < pairs and C * C <= B * T * T:  # clearly cheaper (the gather has its own cost)
        Ahat = torch.bmm(An, An.transpose(1, 2))  # (B, C, C)
        d = torch.diagonal(Ahat, dim1=1, dim2=2)  # (B, C)
        iu = torch.triu_indices(C, C, offset=1, device=An.device)
        u = torch.index_select(Ahat.reshape(B, C * C), 1, iu[0] * C + iu[1])  # (B, C(C−1)/2); backward: index_add
        return d @ d.T + 2 * (u @ u.T)
    return torch.einsum("bcs,kcr->bksr", An, An).pow(2).sum(dim=(2, 3))


class SaliencyMoments(NamedTuple):
    """What TSR and CSA read of the saliencies ``X`` of shape ``(T, B, C, L)`` (:func:`saliency_moments`).

    * ``channel_means``: ``Ŝ = mean_c X``, ``(T, B, L)`` (TSR's Eq. 4; ``None`` when not asked for);
    * ``anchors``: ``A_b`` rescaled by one detached per-sample maximum, ``(B, C, T)`` (Eq. 8);
    * ``pos_dot``: ``⟨Â_b, M_t[b]⟩`` of the rescaled matrices, ``(T, B)`` (Eq. 9's positives);
    * ``m_norm``: ``‖M_t[b]‖_F`` of the rescaled task matrices (1 where ``M_t[b] = 0``), ``(T, B)``."""

    channel_means: Tensor | None
    anchors: Tensor
    pos_dot: Tensor
    m_norm: Tensor


def _moments_forward(X: Tensor, want_means: bool) -> tuple[Any, ...]:
    """The moments' forward (plain torch ops; the scales detached), with the intermediates the backward uses."""
    T, B, C, L = X.shape
    s_hat = X.mean(dim=2) if want_means else None  # (T, B, L): TSR's signed channel means (Eq. 4)
    A = X.mean(dim=3)  # (T, B, C): a_{b,t} (Eq. 8)
    Xd = X.detach()  # max |X_{t,b}| without an X-sized |X| (vector_norm(ord=inf) is 15× slower here)
    sd = _safe(torch.maximum(Xd.amax(dim=(2, 3), keepdim=True), Xd.amin(dim=(2, 3), keepdim=True).neg_()))
    sc = _safe(A.detach().abs().amax(dim=(0, 2), keepdim=True))  # (1, B, 1): one scale per sample
    Xn = X / sd
    An = (A / sc).permute(1, 2, 0)  # (B, C, T)
    wide = T <= L  # batch over (t, b), expanding the anchors (T·B·T·C ≤ |X|), else over b (einsum)
    P = torch.matmul(An.transpose(1, 2).unsqueeze(0), Xn) if wide else torch.einsum("bcs,tbcl->tbsl", An, Xn)
    pos_dot = P.square().sum(dim=(2, 3))  # (T, B)
    Xf = Xn.reshape(T * B, C, L)
    G = torch.bmm(Xf.transpose(1, 2), Xf) if L <= C else torch.bmm(Xf, Xf.transpose(1, 2))  # min(C, L)²
    m_norm = _safe(torch.linalg.vector_norm(G, dim=(1, 2))).reshape(T, B)
    return s_hat, An, pos_dot, m_norm, Xn, sd, sc, P, G, wide


class _Moments(torch.autograd.Function):
    """:func:`saliency_moments` with one hand-written backward.

    Forward (:func:`_moments_forward`): ``d = max|X_{t,b}|``, ``c_b = max_{t,c} |A_{t,b,c}|`` (both detached),
    ``Xn = X / d``, ``A = mean_l X``, ``An = A / c``, ``P_{t,b} = An_bᵀ Xn_{t,b}`` (T×L), ``pos_dot = ‖P‖²``,
    ``G`` the smaller Gram of ``Xn_{t,b}`` and ``m_norm = ‖G‖_F``, ``Ŝ = mean_c X``.

    Backward, with upstream ``(gŜ, gAn, g_pos, g_m)`` and ``dP = 2 g_pos P``, ``k = 2 g_m / m_norm``:
    ``dXn = An_b dP + k·G Xn`` (``k·Xn G`` for the L×L Gram; ``∂‖XᵀX‖/∂X = 2 X XᵀX / ‖XᵀX‖``),
    ``dAn_b = gAn_b + Σ_t Xn_{t,b} dPᵀ``, ``dA = dAn / c``, and
    ``dX = dXn / d + dA ⊗ 1_L / L + 1_C ⊗ gŜ / C`` — one fresh ``X``-sized tensor (the Gram product) updated in
    place, where autograd's own backward of the same forward builds about fifteen (each a cold allocation on
    the CPU: docs/performance.md, "The small-op cost"). The detached scales get no gradient, as before (each
    quantity downstream is homogeneous of degree 0 in them). Under ``create_graph=True`` the backward instead
    differentiates :func:`_moments_forward` by autograd (exact to any order, the plain cost)."""

    @staticmethod
    def forward(ctx: Any, X: Tensor, want_means: bool) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
        s_hat, An, pos_dot, m_norm, Xn, sd, sc, P, G, wide = _moments_forward(X, want_means)
        ctx.save_for_backward(X, Xn, sd, sc, An, P, G, m_norm)
        ctx.wide, ctx.want_means = wide, want_means
        return s_hat, An, pos_dot, m_norm

    @staticmethod
    def backward(ctx: Any, g_s: Tensor | None, g_an: Tensor | None, g_pos: Tensor | None,
                 g_m: Tensor | None) -> tuple[Tensor | None, None]:
        X, Xn, sd, sc, An, P, G, m_norm = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a graph of the gradient is wanted — autograd's own
            outs = _moments_forward(X, ctx.want_means)[:4]
            pairs = [(o, g) for o, g in zip(outs, (g_s, g_an, g_pos, g_m)) if o is not None and g is not None]
            if not pairs:
                return None, None
            (dX,) = torch.autograd.grad([o for o, _ in pairs], X, [g for _, g in pairs], create_graph=True)
            return dX, None
        T, B, C, L = Xn.shape
        Xf = Xn.reshape(T * B, C, L)
        inv_d = sd.reciprocal()  # (T, B, 1, 1)
        if g_m is not None:
            k = (2 * g_m / m_norm).reshape(T * B, 1, 1) * inv_d.reshape(T * B, 1, 1)
            Y = torch.bmm(Xf, G) if L <= C else torch.bmm(G, Xf)  # (TB, C, L): the one fresh X-sized tensor
            Y.mul_(k)
        else:
            Y = torch.zeros_like(Xf)
        dAn = g_an
        if g_pos is not None:
            dP = P * (2 * g_pos).reshape(T, B, 1, 1)  # (T, B, T, L)
            if ctx.wide:
                Y.baddbmm_(An.unsqueeze(0).expand(T, B, C, T).reshape(T * B, C, T),
                           (dP * inv_d).reshape(T * B, T, L))
                back = torch.bmm(Xf, dP.reshape(T * B, T, L).transpose(1, 2)).reshape(T, B, C, T).sum(dim=0)
            else:
                Y.view(T, B, C, L).add_(torch.einsum("bcs,tbsl->tbcl", An, dP * inv_d))
                back = torch.einsum("tbcl,tbsl->bcs", Xn, dP)
            dAn = back if dAn is None else dAn + back
        Y4 = Y.view(T, B, C, L)
        if dAn is not None:
            Y4.add_((dAn.permute(2, 0, 1) / (sc * L)).unsqueeze(3))  # dA / L over every location
        if g_s is not None:
            Y4.add_((g_s / C).unsqueeze(2))  # gŜ / C over every channel
        return Y4, None


def saliency_moments(X: Tensor, channel_means: bool = True) -> SaliencyMoments:
    """TSR's channel means and CSA's anchors, positives and task-matrix norms of ``X`` ``(T, B, C, L)``, in one
    pass (see :class:`SaliencyMoments`; Rep-MTL Eqs. 4, 7–9, arXiv:2507.21049).

    Memory ``O(|X|)``: the Gram is the smaller of ``C×C`` and ``L×L`` (``min(C, L)² ≤ C·L``), the positives
    ``T×L`` per task and sample; nothing larger than ``X`` is built, forward or backward. Exact at any scale
    (each ``X_{t,b}`` and each sample's anchors are rescaled by a detached maximum). Differentiable once.

    Raises:
        ShapeError: ``X`` is not 4-D."""
    if X.ndim != 4:
        raise ShapeError(f"saliency_moments expects (T, B, C, L), got shape {tuple(X.shape)}")
    return SaliencyMoments(*_Moments.apply(X, channel_means))


def csa_from_moments(m: SaliencyMoments, tau: float = 0.1, form: str = "printed",
                     task_reduction: str = "mean") -> Tensor:
    """``L_csa`` (Eq. 9) from :func:`saliency_moments`: cosines of the positives, the anchors' pairwise
    cosines as negatives (:func:`anchor_gram`), the contrastive loss. Arguments as :func:`csa_loss`."""
    An = m.anchors
    B = An.shape[0]
    T = m.pos_dot.shape[0]
    a_gram = anchor_gram(An)  # ⟨Â_b, Â_k⟩ → (B, B); its diagonal is ‖Â_b‖²
    a_norm = _safe(torch.diagonal(a_gram)).sqrt()  # (B,)
    pos = m.pos_dot / (a_norm * m.m_norm) / tau  # (T, B)
    if B > 1:
        cos_neg = a_gram / (a_norm.unsqueeze(1) * a_norm.unsqueeze(0))
        off = ~torch.eye(B, dtype=torch.bool, device=An.device)
        neg = (cos_neg / tau)[off].reshape(B, B - 1)  # k ≠ b
    else:
        neg = An.new_zeros(B, 0)
    if form == "printed":
        per = (torch.logsumexp(neg, dim=1) if B > 1 else An.new_zeros(B)) - pos  # empty sum → term 0
    else:
        both = torch.cat([pos.unsqueeze(2), neg.unsqueeze(0).expand(T, B, B - 1)], dim=2)
        per = torch.logsumexp(both, dim=2) - pos
    return per.mean() if task_reduction == "mean" else per.sum(dim=0).mean()


def csa_loss(
    saliencies: Tensor | Sequence[Tensor],
    tau: float = 0.1,
    form: str = "printed",
    task_reduction: str = "mean",
) -> Tensor:
    """Cross-task Saliency Alignment ``L_csa`` (Rep-MTL Eqs. 7–9, arXiv:2507.21049).

    ``M_t[b] = S_t[b] S_t[b]ᵀ`` (C×C, ``S_t[b]`` reshaped to C×HW); anchors
    ``a_{b,t} = mean_hw S_t[b]``, ``Â_b = Σ_t a_{b,t} a_{b,t}ᵀ``; with cosine similarity of the
    flattened matrices,
    ``L_csa = mean_{b,t} [ −cos(Â_b, M_t[b])/τ + log Σ_{k≠b} exp(cos(Â_b, Â_k)/τ) ]``.
    The inner products come from ``⟨X Xᵀ, Y Yᵀ⟩_F = ‖Xᵀ Y‖_F²``, so memory is
    ``O(B·T·C·HW + B²·T²)`` and no C×C matrix is built when ``HW < C``; the negatives switch to
    the anchors' upper triangles when that is cheaper and no larger (:func:`anchor_gram`: many
    tasks on narrow features). ``B·T·C²`` is never held. With ``B = 1`` there are no
    negatives and the log-sum-exp term is 0. A zero matrix has cosine 0 with everything.
    Differentiable once (:func:`saliency_moments`); a second derivative raises.

    Args:
        saliencies: ``(T, B, C, *spatial)`` or ``(T, B, C)``, or a list of ``T`` tensors.
        tau: temperature τ; default 0.1 — our choice, the paper never gives τ.
        form: ``"printed"`` (default; Eq. 9 as printed: the positive is not in the
            denominator) or ``"infonce"`` (the positive joins the log-sum-exp, i.e.
            ``−log softmax`` of the positive among it and the negatives).
        task_reduction: ``"mean"`` (default: mean over samples and tasks — our choice) or
            ``"sum"`` (sum over tasks, mean over samples).

    Returns:
        a scalar tensor.
    """
    tau = positive("tau", tau, "csa_loss")
    if form not in CSA_FORMS:
        raise ConfigurationError(f"csa_loss: form={form!r}; choose one of {CSA_FORMS}")
    if task_reduction not in CSA_TASK_REDUCTIONS:
        raise ConfigurationError(
            f"csa_loss: task_reduction={task_reduction!r}; choose one of {CSA_TASK_REDUCTIONS}"
        )
    X = _channels_by_locations(saliency_stack(saliencies, min_ndim=3, what="csa_loss saliencies"))
    return csa_from_moments(saliency_moments(X, channel_means=False), tau, form, task_reduction)


# --------------------------------------------------------------------------------------------
@register
class RepMTL(Regularizer):
    """Rep-MTL: ``λ_tsr · L_tsr + λ_csa · L_csa`` on the task saliencies (arXiv:2507.21049).

    Add it to any method: ``mtl_backward(..., method=create("ew"), regularizers=[create("rep_mtl")])``.
    The engine computes ``S_t = ∂L_t/∂Z`` of the raw task losses with ``create_graph=True``, so
    the penalty trains the heads and, through ``Z``, the encoder (one encoder backward); with a
    gradient aggregator its gradient is added after aggregation.

    Defaults and their source: ``lambda_tsr = lambda_csa = 0.9`` (the only value the paper
    names); ``tau = 0.1``, ``csa_form = "printed"`` and ``csa_task_reduction = "mean"`` are our
    choices (docs/rep_mtl.md, marked [choice]). The published runs also use the log loss transform
    (``loss_transform="log"`` of the training setup), which is not part of this object.

    Args:
        lambda_tsr: weight of TSR (≥ 0). 0 keeps TSR computed and logged without training effect.
        lambda_csa: weight of CSA (≥ 0), likewise.
        tau: CSA temperature (> 0).
        tsr: compute TSR at all (ablation switch; ``False`` skips it and its cost).
        csa: compute CSA at all (ablation switch).
        csa_form: ``"printed"`` (Eq. 9 as printed) or ``"infonce"`` (positive in the denominator).
        csa_task_reduction: ``"mean"`` over tasks (default) or ``"sum"``.

    ``loss()`` returns the λ-weighted sum and logs the unweighted ``tsr`` and ``csa`` values.
    """

    name = "rep_mtl"
    uses = "saliency"
    reference = "Wang, Li, Xu, Rep-MTL, ICCV 2025, arXiv:2507.21049"
    defaults_source = (
        "λ_tsr = λ_csa = 0.9 from the paper; τ = 0.1, printed Eq. 9 form and the mean over tasks "
        "are our choices (the paper gives none)"
    )

    def __init__(
        self,
        lambda_tsr: float = 0.9,
        lambda_csa: float = 0.9,
        tau: float = 0.1,
        tsr: bool = True,
        csa: bool = True,
        csa_form: str = "printed",
        csa_task_reduction: str = "mean",
    ):
        for nm, v in (("lambda_tsr", lambda_tsr), ("lambda_csa", lambda_csa)):
            check(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                f"rep_mtl: {nm} must be a finite number ≥ 0, got {v!r}",
            )
        tau = positive("tau", tau, "rep_mtl")
        check(
            isinstance(tsr, bool) and isinstance(csa, bool),
            f"rep_mtl: tsr and csa are booleans, got {tsr!r}, {csa!r}",
        )
        check(
            tsr or csa,
            "rep_mtl: tsr=False and csa=False leaves nothing to compute; for the 'neither' "
            "ablation leave rep_mtl out of the regularizers (plain base method)",
        )
        check(csa_form in CSA_FORMS, f"rep_mtl: csa_form={csa_form!r}; choose one of {CSA_FORMS}")
        check(
            csa_task_reduction in CSA_TASK_REDUCTIONS,
            f"rep_mtl: csa_task_reduction={csa_task_reduction!r}; choose one of {CSA_TASK_REDUCTIONS}",
        )
        self.lambda_tsr = float(lambda_tsr)
        self.lambda_csa = float(lambda_csa)
        self.tau = tau
        self.tsr = tsr
        self.csa = csa
        self.csa_form = csa_form
        self.csa_task_reduction = csa_task_reduction
        self._last: dict[str, float] = {}

    def loss(self, grads: Sequence[Tensor], losses: Tensor) -> tuple[Tensor, dict[str, float]]:
        if len(grads) != 1:
            raise ShapeError(
                f"rep_mtl expects one stacked saliency block (T, B, C, ...), got {len(grads)} blocks; "
                "it is a saliency regulariser (uses='saliency')"
            )
        S = saliency_stack(grads[0], min_ndim=3, what="rep_mtl saliencies")
        if losses is not None and losses.numel() != S.shape[0]:
            raise ShapeError(f"rep_mtl: {S.shape[0]} saliency blocks for {losses.numel()} task losses")
        values: dict[str, float] = {}
        terms: list[Tensor] = []
        # one pass over S for both terms (saliency_moments): TSR's channel means come with CSA's moments
        m = saliency_moments(_channels_by_locations(S), channel_means=self.tsr) if self.csa else None
        if self.tsr:
            v = tsr_from_channel_means(m.channel_means) if m is not None and m.channel_means is not None \
                else tsr_loss(S)
            values["tsr"] = float(v.detach())
            terms.append(self.lambda_tsr * v)
        if m is not None:
            v = csa_from_moments(m, tau=self.tau, form=self.csa_form, task_reduction=self.csa_task_reduction)
            values["csa"] = float(v.detach())
            terms.append(self.lambda_csa * v)
        total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        self._last = dict(values)
        return total, values

    def log_values(self) -> dict[str, float]:
        return dict(self._last)

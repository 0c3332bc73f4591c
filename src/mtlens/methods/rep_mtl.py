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
from typing import Any

import torch
from torch import Tensor

from ..engine.protocols import Regularizer
from ..engine.saliency import channels_by_locations as _channels_by_locations
from ..engine.saliency import saliency_stack, tsr_from_channel_means, tsr_loss
from ..errors import ConfigurationError, ShapeError
from ._registry import register
from ._utils import check, positive

__all__ = [
    "CSA_FORMS", "CSA_TASK_REDUCTIONS", "RepMTL", "anchor_gram", "csa_loss", "penalty_terms", "saliency_stack",
    "tsr_loss",
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
    return _anchor_gram_parts(An)[0]


def _anchor_gram_parts(An: Tensor) -> tuple[Tensor, str, Tensor]:
    """:func:`anchor_gram`'s ``K``, the form taken, and its intermediate (pairs: the blocks ``Q_bk = A_bᵀ A_k``
    as one ``(TB, TB)`` matrix; outer: ``Â = A Aᵀ`` ``(B, C, C)``), which :func:`_anchor_gram_backward` reads."""
    B, C, T = An.shape
    pairs = B * B * T * T * C
    outer = B * C * C * T + B * B * C * (C + 1) // 2
    if 2 * outer < pairs and C * C <= B * T * T:  # clearly cheaper (the gather has its own cost)
        Ahat = torch.bmm(An, An.transpose(1, 2))  # (B, C, C)
        d = torch.diagonal(Ahat, dim1=1, dim2=2)  # (B, C)
        iu = torch.triu_indices(C, C, offset=1, device=An.device)
        u = torch.index_select(Ahat.reshape(B, C * C), 1, iu[0] * C + iu[1])  # (B, C(C−1)/2); backward: index_add
        return d @ d.T + 2 * (u @ u.T), "outer", Ahat
    M = An.permute(2, 0, 1).reshape(T * B, C)  # rows a_{b,s}, task-major (the sum below adds whole B×B blocks)
    Q = M @ M.T  # (TB, TB): Q[(s, b), (r, k)] = ⟨a_{b,s}, a_{k,r}⟩, i.e. the blocks A_bᵀ A_k
    return Q.square().view(T, B, T, B).sum(dim=(0, 2)), "pairs", Q


def _anchor_gram_backward(An: Tensor, form: str, inter: Tensor, dK: Tensor) -> Tensor:
    """``dAn`` of :func:`anchor_gram` for the upstream ``dK`` ``(B, B)``, with ``D = dK + dKᵀ``:
    pairs ``dA_j = 2 Σ_k D_jk A_k Q_jkᵀ`` (``∂‖A_jᵀA_k‖²/∂A_j = 2 A_k Q_jkᵀ``); outer
    ``dÂ_j = Σ_k D_jk Â_k``, ``dA_j = 2 dÂ_j A_j``."""
    D = dK + dK.T
    B, C, T = An.shape
    if form == "pairs":  # 2 (Q ∘ D per block) M with M the rows a_{b,s}: (TB, C)
        W = (inter.view(T, B, T, B) * D[None, :, None, :]).view(T * B, T * B)
        return (W @ An.permute(2, 0, 1).reshape(T * B, C)).mul_(2).view(T, B, C).permute(1, 2, 0)
    return 2 * torch.bmm((D @ inter.reshape(B, C * C)).reshape(B, C, C), An)


def _nonzero(x: Tensor) -> Tensor:
    """:func:`~mtlens.engine.saliency.safe_divisor` for a non-negative ``x`` (maxima, norms, sums of
    magnitudes): 1 where ``x = 0``, in two operators instead of three."""
    return x.masked_fill(x == 0, 1.0)


def _moments_forward(X: Tensor, want_means: bool) -> tuple[Any, ...]:
    """What TSR and CSA read of ``X`` ``(T, B, C, L)`` (plain torch ops, the scales detached), with the
    intermediates the backward uses: ``Ŝ = mean_c X`` (TSR's Eq. 4; ``None`` unless ``want_means``), the anchors
    ``An = A / c`` ``(B, C, T)`` with ``A = mean_l X`` and one detached per-sample maximum ``c`` (Eq. 8), the
    positives ``pos_dot = ‖An_bᵀ Xn_{t,b}‖² = ⟨Â_b, M_t[b]⟩`` and the task matrices' norms
    ``m_norm = ‖Xn Xnᵀ‖_F`` (1 where zero) ``(T, B)``, of ``Xn = X / d`` (``d`` the detached max of each
    ``X_{t,b}``). The Gram is the smaller of ``C×C`` and ``L×L``; nothing larger than ``X`` is built."""
    T, B, C, L = X.shape
    s_hat = X.mean(dim=2) if want_means else None  # (T, B, L): TSR's signed channel means (Eq. 4)
    A = X.mean(dim=3)  # (T, B, C): a_{b,t} (Eq. 8)
    Xd = X.detach()  # max |X_{t,b}| without an X-sized |X| (vector_norm(ord=inf) is 15× slower here)
    sd = _nonzero(torch.maximum(Xd.amax(dim=(2, 3), keepdim=True), Xd.amin(dim=(2, 3), keepdim=True).neg_()))
    sc = _nonzero(A.detach().abs().amax(dim=(0, 2), keepdim=True))  # (1, B, 1): one scale per sample
    Xn = X / sd
    An = (A / sc).permute(1, 2, 0)  # (B, C, T)
    wide = T <= L  # batch over (t, b), expanding the anchors (T·B·T·C ≤ |X|), else over b (einsum)
    P = torch.matmul(An.transpose(1, 2).unsqueeze(0), Xn) if wide else torch.einsum("bcs,tbcl->tbsl", An, Xn)
    pos_dot = P.square().sum(dim=(2, 3))  # (T, B)
    Xf = Xn.reshape(T * B, C, L)
    G = torch.bmm(Xf.transpose(1, 2), Xf) if L <= C else torch.bmm(Xf, Xf.transpose(1, 2))  # min(C, L)²
    m_norm = _nonzero(torch.linalg.vector_norm(G, dim=(1, 2))).reshape(T, B)
    return s_hat, An, pos_dot, m_norm, Xn, sd, sc, P, G, wide


def _csa_tail(An: Tensor, pos_dot: Tensor, m_norm: Tensor, tau: float, form: str, task_reduction: str
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_csa`` (Eq. 9) from the moments: cosines of the positives, the anchors' pairwise cosines as negatives
    (:func:`anchor_gram`; the diagonal held out as ``−inf``, i.e. ``k ≠ b``), the contrastive loss; and what
    :class:`_Penalty`'s backward reads. Differentiable by autograd (the ``create_graph`` path)."""
    T, B = pos_dot.shape
    K, ag_form, ag_inter = _anchor_gram_parts(An)  # ⟨Â_b, Â_k⟩ → (B, B); its diagonal is ‖Â_b‖²
    delta = torch.diagonal(K)
    a = _nonzero(delta).sqrt()  # (B,)
    pos = pos_dot / (a * m_norm) / tau  # (T, B)
    saved: dict[str, Any] = {"K": K, "a": a, "pos": pos, "inter": ag_inter, "form": ag_form}
    if B > 1:
        cn = K / (a.unsqueeze(1) * a.unsqueeze(0))  # cos(Â_b, Â_k)
        neg = (cn / tau).masked_fill(torch.eye(B, dtype=torch.bool, device=K.device), -math.inf)  # k ≠ b
        saved.update(cn=cn, neg=neg)
    if form == "printed":
        per = (torch.logsumexp(neg, dim=1) if B > 1 else K.new_zeros(B)) - pos  # empty sum → term 0
    else:
        both = torch.cat([pos.unsqueeze(2), neg.unsqueeze(0).expand(T, B, B)], dim=2) if B > 1 else pos.unsqueeze(2)
        saved["both"] = both
        per = torch.logsumexp(both, dim=2) - pos
    return (per.mean() if task_reduction == "mean" else per.sum(dim=0).mean()), saved


class _Penalty(torch.autograd.Function):
    """Rep-MTL's TSR and CSA of ``X`` ``(T, B, C, L)`` in one forward (no autograd graph) and one hand-written
    backward; the same equations and values as differentiating :func:`_moments_forward`,
    :func:`~mtlens.engine.saliency.tsr_from_channel_means` and :func:`_csa_tail` with autograd (the tests check
    values and gradients against the previous plain-autograd implementation in float64).

    Backward (upstream ``g_tsr``, ``g_csa``; ``w`` = 1/(TB) for the mean over tasks, 1/B for the sum):

    * TSR (``a = |Ŝ|``, ``r = a / max_t a``, ``p = r / Σ_t r``, ``H = −Σ_t p log p``, mean over the ``N = B·L``
      locations): ``dp = −g/N·(log p + [p > 0])``, ``dr = (dp − Σ_t p dp) / Σ_t r``,
      ``dŜ = dr / max_t a · sign Ŝ`` (0 at a zero, as autograd's);
    * CSA: ``pos = pos_dot / (a_b m τ)``, ``cn = K / (a aᵀ)``, ``a = ‖Â_b‖ = √diag K``; printed form
      ``dpos = −g w``, ``dneg_b = T g w · softmax_{k≠b}(neg_b)``; InfoNCE ``dpos = g w (q_pos − 1)``,
      ``dneg = g w Σ_t q_neg`` (``q`` the softmax over positive and negatives); then
      ``dpos_dot = dpos / (a m τ)``, ``dm = −dpos·pos / m``, ``dK = D / (a aᵀ) + diag(da / 2a)`` with
      ``da = −Σ_t dpos·pos / a − Σ_k (D_{bk} cn_{bk} + D_{kb} cn_{kb}) / a``, ``D = dneg / τ``; ``dAn`` from ``dK``
      (:func:`_anchor_gram_backward`, either form of :func:`anchor_gram`);
    * the moments, with ``dP = 2 dpos_dot P``, ``k = 2 dm / m``: ``dXn = An_b dP + k·G Xn`` (``k·Xn G`` for
      the L×L Gram; ``∂‖XᵀX‖/∂X = 2 X XᵀX / ‖XᵀX‖``), ``dAn_b += Σ_t Xn_{t,b} dPᵀ``, ``dA = dAn / c``,
      ``dX = dXn / d + dA ⊗ 1_L / L + 1_C ⊗ dŜ / C`` — one fresh ``X``-sized tensor (the Gram product) updated
      in place, where autograd's backward of the same forward builds about fifteen (each a cold allocation
      on the CPU) and runs ~80 small operators (docs/performance.md, "The small-op cost").

    The detached scales get no gradient, as before (every quantity is homogeneous of degree 0 in them).
    Under ``create_graph=True`` the backward differentiates the plain-autograd forms instead (exact to any
    order, at their cost)."""

    @staticmethod
    def forward(ctx: Any, X: Tensor, tau: float, form: str, task_reduction: str, want_tsr: bool,
                want_csa: bool) -> tuple[Tensor, Tensor]:
        s_hat, An, pos_dot, m_norm, Xn, sd, sc, P, G, wide = _moments_forward(X, want_tsr)
        ctx.cfg = (tau, form, task_reduction, want_tsr, want_csa, wide)
        tensors: list[Tensor] = [X, Xn, sd, sc, An, P, G, m_norm, pos_dot]
        tsr = csa = X.new_zeros(())
        if want_tsr:  # Eqs. 5–6, as tsr_from_channel_means, keeping what the backward reads
            a = s_hat.abs()
            mx = _nonzero(a.amax(dim=0, keepdim=True))
            r = a / mx
            tot = _nonzero(r.sum(dim=0, keepdim=True))
            p = r / tot
            logp = torch.log(_nonzero(p))
            tsr = -(p * logp).sum(dim=0).mean()
            tensors += [s_hat, mx, tot, p, logp]
        ctx.n_moments = 9
        ctx.csa_keys = []
        if want_csa:
            csa, saved = _csa_tail(An, pos_dot, m_norm, tau, form, task_reduction)
            ctx.ag_form = saved.pop("form")
            ctx.csa_keys = list(saved)
            tensors += list(saved.values())
        ctx.save_for_backward(*tensors)
        return tsr, csa

    @staticmethod
    def backward(ctx: Any, g_tsr: Tensor | None, g_csa: Tensor | None) -> tuple[Tensor | None, None, None, None,
                                                                                 None, None]:
        tau, form, task_reduction, want_tsr, want_csa, wide = ctx.cfg
        saved = ctx.saved_tensors
        X, Xn, sd, sc, An, P, G, m_norm, pos_dot = saved[: ctx.n_moments]
        rest = list(saved[ctx.n_moments:])
        nones = (None, None, None, None, None)
        if torch.is_grad_enabled():  # create_graph=True: a graph of the gradient is wanted — autograd's forms
            s_hat2, An2, pos2, m2 = _moments_forward(X, want_tsr)[:4]
            outs, grads = [], []
            if want_tsr and g_tsr is not None:
                outs.append(tsr_from_channel_means(s_hat2))
                grads.append(g_tsr)
            if want_csa and g_csa is not None:
                outs.append(_csa_tail(An2, pos2, m2, tau, form, task_reduction)[0])
                grads.append(g_csa)
            if not outs:
                return (None, *nones)
            (dX,) = torch.autograd.grad(outs, X, grads, create_graph=True)
            return (dX, *nones)
        T, B, C, L = Xn.shape
        ds = dAn = dpos_dot = dm = None
        if want_tsr:
            s_hat, mx, tot, p, logp = rest[:5]
            rest = rest[5:]
            if g_tsr is not None:
                dp = (p > 0).to(p.dtype).add_(logp).mul_(-g_tsr / (B * L))
                dr = (dp - (dp * p).sum(dim=0, keepdim=True)) / tot
                ds = dr.div_(mx).mul_(s_hat.sgn())
        if want_csa and g_csa is not None:
            c = dict(zip(ctx.csa_keys, rest))
            a, pos = c["a"], c["pos"]
            gw = g_csa / (T * B if task_reduction == "mean" else B)
            if form == "printed":
                dpos = (-gw).expand(T, B)
                dneg = torch.softmax(c["neg"], dim=1).mul_(gw * T) if B > 1 else None
            else:
                q = torch.softmax(c["both"], dim=2)  # (T, B, 1 + B)
                dpos = (q[..., 0] - 1) * gw
                dneg = q[..., 1:].sum(dim=0).mul_(gw) if B > 1 else None
            dpp = dpos * pos  # (T, B)
            dpos_dot = dpos / (a * m_norm * tau)
            dm = -dpp / m_norm
            da = -dpp.sum(dim=0) / a
            if dneg is not None:
                D = dneg / tau  # (B, B), zero diagonal
                dK = D / (a.unsqueeze(1) * a.unsqueeze(0))
                Dc = D * c["cn"]
                da = da - (Dc.sum(dim=1) + Dc.sum(dim=0)) / a
            else:
                dK = torch.zeros_like(c["K"])
            dK.diagonal().add_(torch.where(torch.diagonal(c["K"]) > 0, da / (2 * a), 0.0))
            dAn = _anchor_gram_backward(An, ctx.ag_form, c["inter"], dK)
        return (_moments_backward(Xn, sd, sc, An, P, G, m_norm, wide, ds, dAn, dpos_dot, dm), *nones)


def _moments_backward(Xn: Tensor, sd: Tensor, sc: Tensor, An: Tensor, P: Tensor, G: Tensor, m_norm: Tensor,
                      wide: bool, g_s: Tensor | None, g_an: Tensor | None, g_pos: Tensor | None,
                      g_m: Tensor | None) -> Tensor:
    """``dX`` of :func:`_moments_forward`'s outputs (see :class:`_Penalty`): one fresh ``X``-sized tensor."""
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
        if wide:
            Y.baddbmm_(An.unsqueeze(0).expand(T, B, C, T).reshape(T * B, C, T), (dP * inv_d).reshape(T * B, T, L))
            back = torch.bmm(Xf, dP.reshape(T * B, T, L).transpose(1, 2)).reshape(T, B, C, T).sum(dim=0)
        else:
            Y.view(T, B, C, L).add_(torch.einsum("bcs,tbsl->tbcl", An, dP * inv_d))
            back = torch.einsum("tbcl,tbsl->bcs", Xn, dP)
        dAn = back if dAn is None else dAn + back
    Y4 = Y.view(T, B, C, L)
    if dAn is not None:
        Y4.add_((dAn.permute(2, 0, 1) / (sc * L)).unsqueeze(3))  # dA / L over every location
    if g_s is not None:
        Y4.add_((g_s / C).unsqueeze(2))  # dŜ / C over every channel
    return Y4


def penalty_terms(X: Tensor, tau: float = 0.1, form: str = "printed", task_reduction: str = "mean",
                  tsr: bool = True, csa: bool = True) -> tuple[Tensor, Tensor]:
    """``(L_tsr, L_csa)`` of the saliencies ``X`` ``(T, B, C, L)`` in one pass (Rep-MTL Eqs. 4–9,
    arXiv:2507.21049): the values of :func:`~mtlens.engine.saliency.tsr_loss` and :func:`csa_loss`, with one
    hand-written backward for both (:class:`_Penalty`). A term switched off is returned as 0 (not computed).

    Memory ``O(|X|)``: no intermediate larger than ``X``, forward or backward (the Gram is the smaller of
    ``C×C`` and ``L×L``). Exact at any saliency scale. Differentiable to any order (under ``create_graph=True``
    through autograd's forms).

    Raises:
        ShapeError: ``X`` is not 4-D."""
    if X.ndim != 4:
        raise ShapeError(f"penalty_terms expects saliencies (T, B, C, L), got shape {tuple(X.shape)}")
    return _Penalty.apply(X, tau, form, task_reduction, tsr, csa)


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
    One pass with one hand-written backward (:func:`penalty_terms`).

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
    return penalty_terms(X, tau, form, task_reduction, tsr=False)[1]


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
        if not self.csa:  # TSR alone: its channel means and a few small operators
            v = tsr_loss(S)
            values["tsr"] = float(v.detach())
            total = self.lambda_tsr * v
        else:  # one pass over S for both terms, one hand-written backward (penalty_terms)
            tsr, csa = penalty_terms(_channels_by_locations(S), self.tau, self.csa_form, self.csa_task_reduction,
                                     tsr=self.tsr)
            if self.tsr:
                values["tsr"] = float(tsr.detach())
            values["csa"] = float(csa.detach())
            total = self.lambda_tsr * tsr + self.lambda_csa * csa if self.tsr else self.lambda_csa * csa
        self._last = dict(values)
        return total, values

    def log_values(self) -> dict[str, float]:
        return dict(self._last)

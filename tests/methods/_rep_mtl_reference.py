"""The Rep-MTL penalties as implemented before the one-pass moments (mtlens ≤ 1 Dec 2026, plain autograd):
the reference the rewritten forms are checked against (values and gradients), kept verbatim in its maths."""

from __future__ import annotations

import torch
from torch import Tensor


def _safe(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def tsr_loss(S: Tensor) -> Tensor:
    T, B, C = S.shape[:3]
    s_hat = S.reshape(T, B, C, -1).mean(dim=2)
    a = s_hat.abs()
    r = a / _safe(a.detach().amax(dim=0, keepdim=True))
    p = r / _safe(r.sum(dim=0, keepdim=True))
    return (-(p * torch.log(_safe(p))).sum(dim=0)).mean()


def anchor_gram(An: Tensor) -> Tensor:
    B, C, T = An.shape
    pairs = B * B * T * T * C
    outer = B * C * C * T + B * B * C * (C + 1) // 2
    if 2 * outer < pairs and C * C <= B * T * T:
        Ahat = torch.bmm(An, An.transpose(1, 2))
        d = torch.diagonal(Ahat, dim1=1, dim2=2)
        iu = torch.triu_indices(C, C, offset=1, device=An.device)
        u = torch.index_select(Ahat.reshape(B, C * C), 1, iu[0] * C + iu[1])
        return d @ d.T + 2 * (u @ u.T)
    return torch.einsum("bcs,kcr->bksr", An, An).pow(2).sum(dim=(2, 3))


def csa_loss(S: Tensor, tau: float = 0.1, form: str = "printed", task_reduction: str = "mean") -> Tensor:
    T, B, C = S.shape[:3]
    X = S.reshape(T, B, C, -1)
    L = X.shape[3]
    d = X.detach().abs().amax(dim=(2, 3), keepdim=True)
    Xn = X / _safe(d)
    A = X.mean(dim=3)
    c = A.detach().abs().amax(dim=(0, 2), keepdim=True)
    An = (A / _safe(c)).permute(1, 2, 0)
    pos_dot = torch.einsum("bcs,tbcl->tbsl", An, Xn).pow(2).sum(dim=(2, 3))
    if L <= C:
        m_sq = torch.einsum("tbcl,tbcm->tblm", Xn, Xn).pow(2).sum(dim=(2, 3))
    else:
        m_sq = torch.einsum("tbcl,tbdl->tbcd", Xn, Xn).pow(2).sum(dim=(2, 3))
    a_gram = anchor_gram(An)
    a_norm = _safe(torch.diagonal(a_gram)).sqrt()
    cos_pos = pos_dot / (a_norm.unsqueeze(0) * _safe(m_sq).sqrt())
    if B > 1:
        cos_neg = a_gram / (a_norm.unsqueeze(1) * a_norm.unsqueeze(0))
        off = ~torch.eye(B, dtype=torch.bool, device=X.device)
        neg = (cos_neg / tau)[off].reshape(B, B - 1)
    else:
        neg = X.new_zeros(B, 0)
    pos = cos_pos / tau
    if form == "printed":
        lse = torch.logsumexp(neg, dim=1) if B > 1 else X.new_zeros(B)
        per = -pos + lse.unsqueeze(0)
    else:
        both = torch.cat([pos.unsqueeze(2), neg.unsqueeze(0).expand(T, B, B - 1)], dim=2)
        per = -pos + torch.logsumexp(both, dim=2)
    return per.mean() if task_reduction == "mean" else per.sum(dim=0).mean()


def rep_mtl(S: Tensor, lambda_tsr=0.9, lambda_csa=0.9, tau=0.1, tsr=True, csa=True, form="printed",
            task_reduction="mean") -> Tensor:
    total = S.new_zeros(())
    if tsr:
        total = total + lambda_tsr * tsr_loss(S)
    if csa:
        total = total + lambda_csa * csa_loss(S, tau, form, task_reduction)
    return total

"""Direction regularisation for triplet, ProxyNCA and multi-similarity losses.

Mohan, Sankaran, Fedorishin, Setlur, Govindaraju, "Moving in the Right Direction: A Regularization for
Deep Metric Learning", CVPR 2020. A triplet loss pushes the negative ``n`` away from the anchor ``a``
only, which can push it towards the positive ``p`` (and into the positive's cluster). The paper
instead pushes the negative away from the **midpoint** ``c = (a + p) / 2`` of the anchor and the
positive, and regularises the **direction** of that push: the line ``c -> n`` should be orthogonal to
the line ``a -> p``, weighted by gamma.

Source and what is followed. The search tools available here returned the paper's abstract and two
student reproductions (github.com/alpoler/mohan2020, CENG501-Spring2021/project_Karadeniz), not the
paper's equations; the reproductions differ from each other in details and both measure the angle at
the anchor (``cos(p - a, n - a)``), not at the midpoint. The paper's equation numbers could therefore not
be checked; this module implements the method as issue 3 describes it (negative distances measured from
the midpoint, and a penalty on the non-orthogonality of ``c -> n`` to ``a -> p``) with the formulas
below, which are this module's own (on L2-normalised embeddings, as PML's default distances use them)::

    c        = (a + p) / 2                                  midpoint of anchor and positive
    R(a,p,n) = cos^2(angle(p - a, n - c))                   in [0, 1]; 0 iff (n - c) is orthogonal to (p - a)
             = <p - a, n - c>^2 / (|p - a|^2 |n - c|^2)

    DR-triplet      l = [ |a - p| - |c - n| + margin + gamma R ]_+               (per triplet)
    DR-ProxyNCA     l = -log softmax_z( -s d_z )[y],   d_y = |x - P_y|^2,
                        d_z = |c - P_z|^2 - gamma R(x, P_y, P_z)  for z != y      (positive = own class proxy)
    DR-MS           l = 1/alpha log(1 + sum_P exp(-alpha (S_ap - base)))
                      + 1/beta  log(1 + sum_N exp( beta (cos(c, n) + gamma R(a, p*, n) - base)))
                        with p* the hardest (least similar) positive of the anchor

R is squared so that the penalty is symmetric (a negative nearer the positive and one nearer the anchor
are equally "non-orthogonal") and smooth with zero gradient at orthogonality. It is added to the
negative's violation *inside* the hinge / softmax, in the loss's own units, so a non-orthogonal negative
counts as harder; triplets that satisfy the margin get no gradient from it. Note that ``|c - n|`` is not
``|a - n|``: **with gamma = 0 these losses are not pytorch-metric-learning's plain losses** but their
midpoint versions; they reduce exactly to the plain losses only where the positive coincides with the
anchor (``c = a``), which is what the tests check. ``build_pair_loss`` uses the plain PML loss for
``direction_gamma = 0``.

Why by hand: pytorch-metric-learning has no direction regulariser and its losses only see the distance
matrix, not the positions the midpoint needs. The classes below subclass PML's own losses and reuse
their miner handling (``convert_to_triplets`` / ``convert_to_pairs`` / ``convert_to_weights``),
distances, reducers and proxy parameters; only ``compute_loss`` is new. Every geometric quantity is
computed from inner products (Gram matrices), never from per-triplet vectors, so memory stays
O(B^2 + B C) rather than O(B^2 m D) for "all" triplets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import MultiSimilarityLoss, ProxyNCALoss, TripletMarginLoss
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

__all__ = [
    "DIRECTION_LOSSES",
    "DirectionMultiSimilarityLoss",
    "DirectionProxyNCALoss",
    "DirectionTripletLoss",
    "direction_penalty",
    "direction_terms",
]

_COS_EPS = 1e-6  # floor of |p - a|^2 |n - c|^2: the penalty fades to 0 as the direction becomes undefined
_SQRT_EPS = 1e-12  # clamp before sqrt: d sqrt(x)/dx is infinite at 0


def direction_terms(
    aa: torch.Tensor,
    pp: torch.Tensor,
    nn: torch.Tensor,
    ap: torch.Tensor,
    an: torch.Tensor,
    pn: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|n - c|^2, R)`` from the inner products of anchor a, positive p and negative n (any broadcastable shapes).

    ``aa = <a, a>``, ``ap = <a, p>`` and so on; ``c = (a + p) / 2``, ``R = cos^2`` of the angle between
    ``p - a`` and ``n - c``. Squared norms are clamped at 0 against rounding; R is clamped to [0, 1].
    """
    uv = pn - an - 0.5 * (pp - aa)  # <p - a, n - c>
    uu = (aa - 2.0 * ap + pp).clamp(min=0.0)  # |p - a|^2
    cc = 0.25 * (aa + 2.0 * ap + pp)  # |c|^2
    vv = (nn - an - pn + cc).clamp(min=0.0)  # |n - c|^2
    penalty = (uv.square() / (uu * vv).clamp(min=_COS_EPS)).clamp(max=1.0)
    return vv, penalty


def direction_penalty(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """R = cos^2 of the angle between ``positive - anchor`` and ``negative - (anchor + positive) / 2``, per row.

    (N, D) x 3 -> (N,). Zero when the negative lies on the perpendicular bisector of anchor and
    positive (equidistant from both), one when it lies on their line.

    >>> a, p = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    >>> direction_penalty(a, p, torch.tensor([[0.0, 0.0, 1.0]])).item()
    0.0
    >>> round(direction_penalty(a, p, torch.tensor([[2.0, -1.0, 0.0]])).item(), 6)  # on the line through a and p
    1.0
    """

    def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum(-1)

    _, penalty = direction_terms(
        dot(anchor, anchor),
        dot(positive, positive),
        dot(negative, negative),
        dot(anchor, positive),
        dot(anchor, negative),
        dot(positive, negative),
    )
    return penalty


class DirectionTripletLoss(TripletMarginLoss):
    """DR-triplet: ``[ |a - p| - |c - n| + margin + gamma R ]_+`` over the (mined or all) triplets.

    Same arguments, miner handling and reducer (mean over the triplets with a positive loss) as PML's
    ``TripletMarginLoss``; Euclidean distance of L2-normalised embeddings. ``swap`` is not supported
    (it swaps the anchor for the positive, which the midpoint already treats symmetrically).
    """

    def __init__(self, gamma: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.swap:
            raise ValueError("the direction-regularised triplet loss does not support swap=True")
        c_f.assert_distance_type(self, LpDistance, normalize_embeddings=True, p=2, power=1)
        self.gamma = float(gamma)
        self.add_to_recordable_attributes(list_of_names=["gamma"], is_stat=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        a, p, n = lmu.convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor=self.triplets_per_anchor)
        if len(a) == 0:
            return self.zero_losses()
        mat = self.distance(embeddings)  # (B, B) |x_i - x_j|, exactly as TripletMarginLoss
        x = self.distance.normalize(embeddings)
        gram = x @ x.T  # (B, B)
        sq = gram.diagonal()
        cn_sq, penalty = direction_terms(sq[a], sq[p], sq[n], gram[a, p], gram[a, n], gram[p, n])  # (T,) each
        cn = cn_sq.clamp(min=_SQRT_EPS).sqrt()
        violation = self.distance.margin(mat[a, p], cn) + self.margin + self.gamma * penalty
        loss = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        return {"loss": {"losses": loss, "indices": (a, p, n), "reduction_type": "triplet"}}


class DirectionProxyNCALoss(ProxyNCALoss):
    """DR-ProxyNCA: the positive is the sample's class proxy; every other proxy is a negative.

    Softmax over ``-softmax_scale * d`` with ``d_y = |x - P_y|^2`` and, for the other proxies,
    ``d_z = |c - P_z|^2 - gamma R`` (squared Euclidean distances of L2-normalised vectors, PML's
    ProxyNCA distance). Differences from PML's ``ProxyNCALoss`` besides the midpoint: ``log_softmax``
    instead of ``log(softmax)``, so no sample is dropped when its probability underflows. Miner weights
    and the mean over samples are PML's.
    """

    def __init__(self, num_classes: int, embedding_size: int, gamma: float = 0.0, **kwargs) -> None:
        super().__init__(num_classes, embedding_size, **kwargs)
        c_f.assert_distance_type(self, LpDistance, normalize_embeddings=True, p=2, power=2)
        self.gamma = float(gamma)
        self.add_to_recordable_attributes(list_of_names=["gamma"], is_stat=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        self.cast_types(embeddings.dtype, embeddings.device)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)  # (B,)
        mat = self.distance(embeddings, self.proxies)  # (B, C) |x - P_z|^2, exactly as ProxyNCALoss
        x = self.distance.normalize(embeddings)  # (B, D)
        proxies = self.distance.normalize(self.proxies)  # (C, D)
        own = proxies[labels]  # (B, D) the positive of each sample
        cn_sq, penalty = direction_terms(
            (x * x).sum(1, keepdim=True),  # (B, 1)
            (own * own).sum(1, keepdim=True),  # (B, 1)
            (proxies * proxies).sum(1)[None],  # (1, C)
            (x * own).sum(1, keepdim=True),  # (B, 1)
            x @ proxies.T,  # (B, C)
            own @ proxies.T,  # (B, C)
        )
        is_own = F.one_hot(labels, mat.shape[1]).bool()  # (B, C)
        dist = torch.where(is_own, mat, cn_sq - self.gamma * penalty)
        log_prob = F.log_softmax(-self.softmax_scale * dist, dim=1).gather(1, labels[:, None]).squeeze(1)
        loss_dict = {
            "loss": {
                "losses": -log_prob * miner_weights,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        return loss_dict


class DirectionMultiSimilarityLoss(MultiSimilarityLoss):
    """DR-MS: the negative term uses the cosine similarity of each negative to the midpoint ``c`` of the
    anchor and its hardest positive (lowest similarity among its positive pairs, mined or all), plus
    ``gamma R``; the positive term is PML's. An anchor without a positive pair keeps ``c = a`` and no
    penalty, i.e. PML's term. Same arguments, miner handling and reducer as ``MultiSimilarityLoss``.
    """

    def __init__(self, gamma: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        self.gamma = float(gamma)
        self.add_to_recordable_attributes(list_of_names=["gamma"], is_stat=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        if len(a1) <= 1 and len(a2) <= 1:  # GenericPairLoss's early exit
            return self.zero_losses()
        sim = self.distance(embeddings)  # (B, B) cosine similarities = Gram matrix of the normalised embeddings
        pos_mask = torch.zeros_like(sim, dtype=torch.bool)
        neg_mask = torch.zeros_like(sim, dtype=torch.bool)
        pos_mask[a1, p] = True
        neg_mask[a2, n] = True
        rows = c_f.torch_arange_from_size(sim)
        hardest = sim.masked_fill(~pos_mask, float("inf")).argmin(dim=1)  # (B,)
        hardest = torch.where(pos_mask.any(dim=1), hardest, rows)  # no positive: c = a
        sq = sim.diagonal()
        aa, pp, ap = sq[:, None], sq[hardest][:, None], sim[rows, hardest][:, None]  # (B, 1)
        an, pn, nn = sim, sim[hardest], sq[None]  # (B, B), (B, B), (1, B)
        _, penalty = direction_terms(aa, pp, nn, ap, an, pn)
        cc = 0.25 * (aa + 2.0 * ap + pp)  # |c|^2
        neg_sim = 0.5 * (an + pn) / (cc * nn).clamp(min=_SQRT_EPS).sqrt()  # cos(c, n)

        pos_exp = self.distance.margin(sim, self.base)  # base - S_ap
        neg_exp = self.distance.margin(self.base, neg_sim + self.gamma * penalty)  # S_cn + gamma R - base
        pos_loss = (1.0 / self.alpha) * lmu.logsumexp(self.alpha * pos_exp, keep_mask=pos_mask, add_one=True)
        neg_loss = (1.0 / self.beta) * lmu.logsumexp(self.beta * neg_exp, keep_mask=neg_mask, add_one=True)
        return {
            "loss": {
                "losses": (pos_loss + neg_loss).squeeze(1),
                "indices": rows,
                "reduction_type": "element",
            }
        }


# name in arcfold.models.losses.LOSSES -> its direction-regularised version
DIRECTION_LOSSES = {
    "triplet": DirectionTripletLoss,
    "proxy_nca": DirectionProxyNCALoss,
    "multi_similarity": DirectionMultiSimilarityLoss,
}

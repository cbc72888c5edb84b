"""Direction regularisation for triplet, ProxyNCA and multi-similarity losses.

Mohan, Sankaran, Fedorishin, Setlur, Govindaraju, "Moving in the Right Direction: A Regularization for
Deep Metric Learning", CVPR 2020. A triplet loss pushes the negative ``n`` away from the anchor ``a``
only, which can push it towards the positive ``p``. As the reproductions below describe the paper, it
motivates its regulariser with the midpoint of anchor and positive and the orthogonality of the
midpoint->negative line to the anchor->positive line; the losses they implement add, with weight gamma,
the cosine of the angle **at the anchor** between ``p - a`` and ``n - a`` to the negative's distance.

Source and what is followed. The paper's equations could not be read here (the stored copies hold its
abstract only). The formulas below follow the public reproduction github.com/alpoler/mohan2020
(``loss/mvrloss.py``; a CENG501 student project that reproduces the paper, not the authors' own code),
whose triplet direction term a second, independent reproduction (CENG501-Spring2021/project_Karadeniz,
``loss.py``) writes the same way. ``benchmarks/results/direction_vs_mohan2020.md`` compares them term by term
with file, line and commit. On L2-normalised embeddings, with ``cos = cos(angle(p - a, n - a))``::

    DR-triplet      l = [ |a - p| - |a - n| + margin - gamma cos ]_+                       (per triplet)
    DR-ProxyNCA     l = -log softmax_z( -s d_z )[y],   d_y = |x - P_y|^2,
                        d_z = |x - P_z|^2 + gamma cos(angle(P_y - x, P_z - x))  for z != y
    DR-MS           l = 1/alpha log(1 + sum_P exp(-alpha (S_ap - base)))
                      + 1/beta  log(1 + sum_N exp( beta (S_an - gamma cos(angle(p* - a, n - a)) - base)))
                        with p* the hardest (least similar) positive of the anchor

In all three the term makes a negative lying towards the positive, as seen from the anchor (cos > 0),
count as farther, and one behind the anchor (cos < 0) as nearer; a triplet whose hinge the term closes
gives no gradient (the reproduction's "inherent mining" of negatives near both anchor and positive).
The term's own gradient on the negative turns ``n - a`` towards ``p - a``, which the midpoint
motivation does not obviously ask for; the paper's equations would settle the sign (the report above
says more). With gamma = 0 every loss
here is pytorch-metric-learning's plain loss, value for value (the tests check it on random batches).

Deliberate differences from the reproduction, each so that gamma = 0 is exactly arcfold's plain loss of
the same name (``build_pair_loss`` uses the plain PML loss for ``direction_gamma = 0``):

- Triplets come from PML (all triplets of the batch, or a miner's) and are averaged by PML's reducer,
  the mean over the triplets with a positive loss; the reproduction averages over all triplets
  (``torch.mean``), which ``reducer=MeanReducer()`` gives.
- ProxyNCA is PML's: squared distances of L2-normalised proxies, the own proxy in the softmax's
  denominator, ``softmax_scale`` multiplying the whole ``d_z``; the reproduction uses unsquared distances
  to raw proxies (initialised on the unit sphere) and leaves the own proxy out of the denominator, so
  with the same distances its per-sample loss ``r`` and arcfold's ``l`` satisfy ``l = softplus(r)``.
- Multi-similarity is PML's loss, which does not mine by itself: ``head.miner=multi_similarity``
  (epsilon 0.1) gives the reproduction's built-in pair mining. The hardest positive is the least
  similar of the anchor's (mined) positives, as there. An anchor without a positive gets no penalty
  (the reproduction fails on it).
- The cosine fades to 0 where ``|p - a| |n - a| < 1e-3`` (the direction is undefined; the Gram-matrix
  form below loses precision there in fp32); the reproduction floors each norm at 1e-8 instead.

Why by hand: pytorch-metric-learning has no direction regulariser and its losses only see the distance
matrix, not the positions the angle needs. The classes below subclass PML's own losses and reuse their
miner handling (``convert_to_triplets`` / ``convert_to_pairs`` / ``convert_to_weights``), distances,
reducers and proxy parameters; only ``compute_loss`` is new. Every cosine is computed from inner
products (Gram matrices), never from per-triplet vectors, so memory stays O(B^2 + B C) rather than
O(B^2 m D) for "all" triplets.
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
    "direction_cosine",
    "direction_cosine_from_gram",
]

_COS_EPS = 1e-6  # floor of |p - a|^2 |n - a|^2: the cosine fades to 0 as the direction becomes undefined


def direction_cosine_from_gram(
    aa: torch.Tensor,
    pp: torch.Tensor,
    nn: torch.Tensor,
    ap: torch.Tensor,
    an: torch.Tensor,
    pn: torch.Tensor,
) -> torch.Tensor:
    """``cos(angle(p - a, n - a))`` from the inner products of anchor a, positive p and negative n.

    ``aa = <a, a>``, ``ap = <a, p>`` and so on, any broadcastable shapes. Squared norms are clamped at 0
    against rounding, the result to [-1, 1]; the product ``|p - a|^2 |n - a|^2`` is floored at 1e-6, so
    the cosine fades to 0 where a direction is (nearly) undefined, and its gradient stays finite.
    """
    uv = pn - ap - an + aa  # <p - a, n - a>
    uu = (aa - 2.0 * ap + pp).clamp(min=0.0)  # |p - a|^2
    vv = (aa - 2.0 * an + nn).clamp(min=0.0)  # |n - a|^2
    # |uv| <= sqrt(uu vv), so below the floor the cosine shrinks continuously to 0
    return (uv / (uu * vv).clamp(min=_COS_EPS).sqrt()).clamp(-1.0, 1.0)


def direction_cosine(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """cos of the angle at the anchor between ``positive - anchor`` and ``negative - anchor``, per row.

    (N, D) x 3 -> (N,). On the unit circle the angle at ``a`` is half the arc from ``p`` to ``n`` that
    does not contain ``a`` (inscribed angle):

    >>> deg = torch.deg2rad(torch.tensor([0.0, 60.0, 180.0, 300.0]))
    >>> a, p, n, m = torch.stack([deg.cos(), deg.sin()], 1).split(1)
    >>> round(direction_cosine(a, p, n).item(), 6), round(direction_cosine(a, p, m).item(), 6)  # 60 and 120 deg
    (0.5, -0.5)
    """

    def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum(-1)

    return direction_cosine_from_gram(
        dot(anchor, anchor),
        dot(positive, positive),
        dot(negative, negative),
        dot(anchor, positive),
        dot(anchor, negative),
        dot(positive, negative),
    )


class DirectionTripletLoss(TripletMarginLoss):
    """DR-triplet: ``[ |a - p| - |a - n| + margin - gamma cos(angle(p - a, n - a)) ]_+`` over the triplets.

    Same arguments, miner handling and reducer (mean over the triplets with a positive loss) as PML's
    ``TripletMarginLoss``; Euclidean distance of L2-normalised embeddings. ``swap`` is not supported
    (the angle is taken at the anchor; a swapped triplet has none defined).
    """

    def __init__(self, gamma: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.swap:
            raise ValueError("the direction-regularised triplet loss does not support swap=True")
        c_f.assert_distance_type(self, LpDistance, normalize_embeddings=True, p=2)
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
        cos = direction_cosine_from_gram(sq[a], sq[p], sq[n], gram[a, p], gram[a, n], gram[p, n])  # (T,)
        violation = self.distance.margin(mat[a, p], mat[a, n]) + self.margin - self.gamma * cos
        loss = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        return {"loss": {"losses": loss, "indices": (a, p, n), "reduction_type": "triplet"}}


class DirectionProxyNCALoss(ProxyNCALoss):
    """DR-ProxyNCA: the positive is the sample's class proxy; every other proxy is a negative.

    Softmax over ``-softmax_scale * d`` with ``d_y = |x - P_y|^2`` and, for the other proxies,
    ``d_z = |x - P_z|^2 + gamma cos(angle(P_y - x, P_z - x))`` (PML's ProxyNCA distance: squared
    Euclidean of L2-normalised vectors). Differences from PML's ``ProxyNCALoss`` besides the term:
    ``log_softmax`` instead of ``log(softmax)``, so no sample is dropped when its probability underflows.
    Miner weights and the mean over samples are PML's.
    """

    def __init__(self, num_classes: int, embedding_size: int, gamma: float = 0.0, **kwargs) -> None:
        super().__init__(num_classes, embedding_size, **kwargs)
        c_f.assert_distance_type(self, LpDistance, normalize_embeddings=True, p=2)
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
        cos = direction_cosine_from_gram(
            (x * x).sum(1, keepdim=True),  # (B, 1)
            (own * own).sum(1, keepdim=True),  # (B, 1)
            (proxies * proxies).sum(1)[None],  # (1, C)
            (x * own).sum(1, keepdim=True),  # (B, 1)
            x @ proxies.T,  # (B, C)
            own @ proxies.T,  # (B, C)
        )
        is_own = F.one_hot(labels, mat.shape[1]).bool()  # (B, C)
        dist = torch.where(is_own, mat, mat + self.gamma * cos)
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
    """DR-MS: each negative's similarity to the anchor is lowered by ``gamma cos(angle(p* - a, n - a))``,
    ``p*`` the anchor's hardest positive (lowest similarity among its positive pairs, mined or all); the
    positive term is PML's. An anchor without a positive pair gets no penalty, i.e. PML's term. Same
    arguments, miner handling and reducer as ``MultiSimilarityLoss``.
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
        hardest = torch.where(pos_mask.any(dim=1), hardest, rows)  # no positive: p* = a, cosine 0
        sq = sim.diagonal()
        aa, pp, ap = sq[:, None], sq[hardest][:, None], sim[rows, hardest][:, None]  # (B, 1)
        an, pn, nn = sim, sim[hardest], sq[None]  # (B, B), (B, B), (1, B)
        cos = direction_cosine_from_gram(aa, pp, nn, ap, an, pn)  # (B, B): anchor i, negative j

        pos_exp = self.distance.margin(sim, self.base)  # base - S_ap
        neg_exp = self.distance.margin(self.base, sim - self.gamma * cos)  # S_an - gamma cos - base
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

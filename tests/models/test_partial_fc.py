"""The class-sharded margin head (Partial FC) against the unsharded ArcFace/CosFace heads.

The distributed checks spawn 2 and 3 CPU processes (gloo; 3 ranks: uneven class shards 4/4/3 and uneven
per-rank batches 5/4/3), each run with a deadline; every process computes the single-process reference itself
on the whole global batch (same seed) and reports the largest differences, which the tests below compare with
fp32 tolerances: logits ``4 eps32 * scale`` (a logit ``s cos`` is off by about ``s eps32``), losses
``4 eps32 (1 + loss)`` (a few ulps), gradients ``2e-6`` of their largest entry. The hand-written distributed
cross-entropy alone is checked in fp64 to ``1e-12``.
"""

from __future__ import annotations

import datetime
import json
import math
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from arcfold.models.heads import ArcFaceHead, CosFaceHead
from arcfold.models.partial_fc import SHARDED_KINDS, ShardedMarginHead, distributed_cross_entropy, shard_range

EPS32 = torch.finfo(torch.float32).eps
D_IN, D = 12, 16
SCALE, MARGINS = 30.0, {"arcface": 0.5, "cosface": 0.35}
UNSHARDED = {"arcface": ArcFaceHead, "cosface": CosFaceHead}
# world size -> (n_classes, per-rank batch sizes)
SETUPS = {2: (10, [6, 6]), 3: (11, [5, 4, 3])}
SPAWN_TIMEOUT_S = 60.0
GRAD_RTOL = 2e-6  # gradients: max |difference| <= GRAD_RTOL * max |reference|


# ----------------------------------------------------------------------------------------------------------------------
# in one process


def test_shard_range_is_contiguous_and_balanced():
    for n_classes in (1, 2, 7, 10, 11, 100_000, 1_000_003):
        for world_size in (1, 2, 3, 4, 8):
            if n_classes < world_size:
                with pytest.raises(ValueError, match="smaller than world_size"):
                    shard_range(n_classes, 0, world_size)
                continue
            ranges = [shard_range(n_classes, r, world_size) for r in range(world_size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n_classes
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert [shard_range(11, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 2, 2)


@pytest.mark.parametrize("kind", SHARDED_KINDS)
def test_world_size_1_is_the_unsharded_head_bit_for_bit(kind):
    torch.manual_seed(0)
    x, labels = torch.randn(24, D), torch.randint(0, 7, (24,))
    reference = UNSHARDED[kind](D, 7, scale=SCALE, margin=MARGINS[kind])
    head = ShardedMarginHead(kind, D, 7, SCALE, MARGINS[kind])
    head.load_full_state_dict({"weight": reference.weight.detach()})
    for h in (reference, head):
        h.margin_factor = 0.7
    x_ref, x_head = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_ref, loss = reference(x_ref, labels), head(x_head, labels)
    loss_ref.backward(), loss.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.equal(loss, loss_ref)
    assert torch.equal(x_head.grad, x_ref.grad) and torch.equal(head.weight.grad, reference.weight.grad)
    assert torch.equal(head.full_state_dict()["weight"], reference.weight)


def test_world_size_1_runs_under_autocast_in_fp32():
    torch.manual_seed(0)
    head = ShardedMarginHead("arcface", D, 5, SCALE, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(torch.randn(8, D).bfloat16(), torch.randint(0, 5, (8,)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_margin_goes_only_to_this_shards_targets():
    # the shard holding classes [4, 8) of 11: rows with a target there carry the margin, the others are s cos
    head = ShardedMarginHead("cosface", D, 11, SCALE, 0.35, rank=1, world_size=3)
    x, labels = torch.randn(6, D), torch.tensor([0, 4, 7, 8, 10, 5])
    logits = head.shard_logits(x, labels)  # (6, 4)
    cosine = F.normalize(x) @ F.normalize(head.weight).T
    expected = SCALE * cosine
    for row, label in enumerate(labels.tolist()):
        if 4 <= label < 8:
            expected[row, label - 4] -= SCALE * 0.35
    torch.testing.assert_close(logits, expected, atol=4 * EPS32 * SCALE, rtol=0)
    assert head.local_labels(labels).tolist() == [-1, 0, 3, -1, -1, 1]


def test_distributed_cross_entropy_without_group_is_cross_entropy_fp64():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(9, 6, generator=g, dtype=torch.float64) * 300).requires_grad_()  # exp(z) overflows
    labels = torch.randint(0, 6, (9,), generator=g)
    assert not torch.isfinite(logits.detach().exp().sum())
    loss = distributed_cross_entropy(logits, labels)
    reference_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_logits, labels)
    loss.backward(), reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logits.grad, reference_logits.grad, atol=1e-14, rtol=1e-12)


def _restricted_reference(kind, weight, labels, sampled):
    """The unsharded head on the sampled classes only (labels renumbered), its loss and weight gradient."""
    reference = UNSHARDED[kind](D, len(sampled), scale=SCALE, margin=MARGINS[kind])
    with torch.no_grad():
        reference.weight.copy_(weight[sampled])
    return reference, torch.searchsorted(sampled, labels)


@pytest.mark.parametrize("kind", SHARDED_KINDS)
def test_class_sampling_keeps_every_positive_and_is_the_head_on_the_kept_classes(kind):
    torch.manual_seed(0)
    n_classes = 50
    x, labels = torch.randn(12, D), torch.tensor([3, 3, 7, 11, 20, 20, 21, 33, 40, 49, 0, 7])
    head = ShardedMarginHead(kind, D, n_classes, SCALE, MARGINS[kind], sample_rate=0.3)
    full_weight = head.weight.detach().clone()
    loss = head(x, labels)
    loss.backward()
    sampled = head.last_sampled
    assert len(sampled) == 15 and torch.equal(sampled, sampled.sort().values)  # ceil(0.3 * 50), ascending
    assert set(labels.tolist()) <= set(sampled.tolist())
    reference, renumbered = _restricted_reference(kind, full_weight, labels, sampled)
    loss_ref = reference(x, renumbered)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, atol=4 * EPS32 * SCALE, rtol=4 * EPS32)
    torch.testing.assert_close(head.weight.grad[sampled], reference.weight.grad, atol=1e-7, rtol=1e-6)
    not_sampled = torch.ones(n_classes, dtype=torch.bool)
    not_sampled[sampled] = False
    assert (head.weight.grad[not_sampled] == 0).all() and (head.weight.grad[sampled] != 0).any()


def test_class_sampling_keeps_all_positives_when_they_are_more_than_the_rate():
    head = ShardedMarginHead("arcface", D, 40, SCALE, 0.5, sample_rate=0.1)  # 4 columns, 6 positives
    head(torch.randn(6, D), torch.tensor([1, 5, 9, 13, 17, 39]))
    assert head.last_sampled.tolist() == [1, 5, 9, 13, 17, 39]


def test_class_sampling_only_in_training():
    torch.manual_seed(0)
    x, labels = torch.randn(8, D), torch.randint(0, 30, (8,))
    head = ShardedMarginHead("cosface", D, 30, SCALE, 0.35, sample_rate=0.2).eval()
    exact = ShardedMarginHead("cosface", D, 30, SCALE, 0.35)
    exact.load_full_state_dict(head.full_state_dict())
    assert torch.equal(head(x, labels), exact(x, labels)) and head.last_sampled is None
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        ShardedMarginHead("cosface", D, 30, SCALE, 0.35, sample_rate=0.0)


def test_clear_errors():
    with pytest.raises(ValueError, match="kind 'subcenter_arcface' is unknown; choose one of arcface, cosface"):
        ShardedMarginHead("subcenter_arcface", D, 10, SCALE, 0.5)
    head = ShardedMarginHead("arcface", D, 10, SCALE, 0.5)
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 10\); got \[-1, 10\]"):
        head(torch.randn(3, D), torch.tensor([10, 3, -1]))
    with pytest.raises(ValueError, match=r"embeddings must be \(B, 16\)"):
        head(torch.randn(3, D + 1), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="labels must be int64"):
        head(torch.randn(3, D), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"full weight must be \(10, 16\)"):
        head.load_full_state_dict({"weight": torch.zeros(9, D)})
    sharded = ShardedMarginHead("arcface", D, 10, SCALE, 0.5, rank=1, world_size=2)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        sharded(torch.randn(3, D), torch.tensor([1, 2, 3]))


# ----------------------------------------------------------------------------------------------------------------------
# 2 and 3 processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(kind: str, world_size: int, labels_mode: str, seed: int = 0):
    """Inputs (N, D_IN), labels (N,), full weight (C, D), backbone state: identical on every rank."""
    n_classes, sizes = SETUPS[world_size]
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    inputs = torch.randn(n, D_IN, generator=g)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    if labels_mode == "other_rank":  # every row of rank r has a class of rank r + 1's shard
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        for r in range(world_size):
            a, b = shard_range(n_classes, (r + 1) % world_size, world_size)
            labels[offsets[r] : offsets[r + 1]] = torch.randint(a, b, (sizes[r],), generator=g)
    weight = torch.randn(n_classes, D, generator=g)
    backbone = nn.Linear(D_IN, D)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(D, D_IN, generator=g) / math.sqrt(D_IN))
        backbone.bias.copy_(torch.randn(D, generator=g) * 0.1)
    return inputs, labels, weight, backbone, sizes, n_classes


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _compare(kind: str, rank: int, world_size: int, labels_mode: str, scale: float) -> dict[str, dict]:
    inputs, labels, weight, backbone, sizes, n_classes = _global_batch(kind, world_size, labels_mode)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    start, stop = shard_range(n_classes, rank, world_size)
    out = {}

    # single process: the whole global batch through the unsharded head
    reference = UNSHARDED[kind](D, n_classes, scale=scale, margin=MARGINS[kind])
    with torch.no_grad():
        reference.weight.copy_(weight)
    backbone_ref = nn.Linear(D_IN, D)
    backbone_ref.load_state_dict(backbone.state_dict())
    emb_ref = backbone_ref(inputs)  # (N, D)
    emb_ref.retain_grad()
    ref_logits = reference.logits(emb_ref, labels)  # (N, C)
    loss_ref = reference(emb_ref, labels)
    loss_ref.backward()

    # this rank: its rows of the batch, its shard of the classes; the backbone gradient averaged as DDP does
    head = ShardedMarginHead(kind, D, n_classes, scale, MARGINS[kind], rank=rank, world_size=world_size)
    head.load_full_state_dict({"weight": weight})
    emb = backbone(inputs[rows])  # (B_r, D)
    emb.retain_grad()
    loss = head(emb, labels[rows])
    loss.backward()
    for p in backbone.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world_size
    losses = [torch.zeros(()) for _ in range(world_size)]
    dist.all_gather(losses, loss.detach())

    value_tol = 4 * EPS32 * scale

    def grad_tol(ref: torch.Tensor) -> float:
        return GRAD_RTOL * float(ref.abs().max())

    out["logits"] = {
        "diff": _max_diff(head.shard_logits(emb_ref.detach(), labels), ref_logits[:, start:stop]),
        "tol": value_tol,
    }
    out["loss"] = {"diff": _max_diff(loss, loss_ref), "tol": 4 * EPS32 * (1 + loss_ref.item())}
    out["loss_same_on_every_rank"] = {"diff": max(_max_diff(x, losses[0]) for x in losses), "tol": 0.0}
    ref_emb_grad = emb_ref.grad[rows]
    out["embedding_grad_is_world_size_times"] = {
        "diff": _max_diff(emb.grad, world_size * ref_emb_grad),
        "tol": grad_tol(world_size * ref_emb_grad),
    }
    for name, p in backbone.named_parameters():
        ref_grad = dict(backbone_ref.named_parameters())[name].grad
        out[f"backbone_{name}_grad_after_ddp_average"] = {
            "diff": _max_diff(p.grad, ref_grad),
            "tol": grad_tol(ref_grad),
        }
    ref_w_grad = reference.weight.grad[start:stop]
    out["weight_shard_grad"] = {"diff": _max_diff(head.weight.grad, ref_w_grad), "tol": grad_tol(ref_w_grad)}
    if scale > 100:  # the case is meaningful only if a naive exp(z) overflows fp32
        out["naive_softmax_overflows"] = {"diff": float(torch.isfinite(ref_logits.exp().sum(1)).all()), "tol": 0.0}
        out["loss_finite"] = {"diff": float(not torch.isfinite(loss)), "tol": 0.0}
    return out


def _fp64_cross_entropy(rank: int, world_size: int) -> dict[str, dict]:
    n_classes, sizes = SETUPS[world_size]
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(sum(sizes), n_classes, generator=g, dtype=torch.float64) * 500  # naive exp overflows
    labels = torch.randint(0, n_classes, (sum(sizes),), generator=g)
    start, stop = shard_range(n_classes, rank, world_size)
    full = logits.clone().requires_grad_()
    reference = F.cross_entropy(full, labels)
    reference.backward()
    local = logits[:, start:stop].clone().requires_grad_()
    here = (labels >= start) & (labels < stop)
    loss = distributed_cross_entropy(local, torch.where(here, labels - start, -1))
    loss.backward()
    return {
        "fp64_loss": {"diff": _max_diff(loss, reference), "tol": 1e-12 * float(reference)},
        "fp64_grad": {"diff": _max_diff(local.grad, full.grad[:, start:stop]), "tol": 1e-14},
    }


def _state_round_trip(rank: int, world_size: int) -> dict[str, dict]:
    n_classes, _ = SETUPS[world_size]
    torch.manual_seed(100 + rank)  # each rank initialises its shard differently
    head = ShardedMarginHead("arcface", D, n_classes, SCALE, 0.5, rank=rank, world_size=world_size)
    full = head.full_state_dict()["weight"]  # (C, D)
    shards = [torch.empty(n_classes, D) for _ in range(world_size)]
    dist.all_gather(shards, full)  # every rank returned the same full matrix
    start, stop = shard_range(n_classes, rank, world_size)
    other = ShardedMarginHead("arcface", D, n_classes, SCALE, 0.5, rank=rank, world_size=world_size)
    other.load_full_state_dict({"weight": full})
    return {
        "full_state_shape": {"diff": float(tuple(full.shape) != (n_classes, D)), "tol": 0.0},
        "full_state_rows_are_this_shard": {"diff": _max_diff(full[start:stop], head.weight), "tol": 0.0},
        "full_state_same_on_every_rank": {"diff": max(_max_diff(s, full) for s in shards), "tol": 0.0},
        "round_trip": {"diff": _max_diff(other.weight, head.weight), "tol": 0.0},
    }


def _labels_out_of_range(rank: int, world_size: int) -> dict[str, dict]:
    # only rank 0 has the bad label: every rank must raise (not hang in the next collective)
    n_classes, _ = SETUPS[world_size]
    head = ShardedMarginHead("cosface", D, n_classes, SCALE, 0.35, rank=rank, world_size=world_size)
    labels = torch.tensor([n_classes if rank == 0 else 0, 1])
    try:
        head(torch.randn(2, D), labels)
    except ValueError as e:
        raised = f"labels must be class ids in [0, {n_classes}); got [{n_classes}]" in str(e)
    else:
        raised = False
    return {"labels_out_of_range_raise_on_every_rank": {"diff": float(not raised), "tol": 0.0}}


def _sampled(rank: int, world_size: int) -> dict[str, dict]:
    # sample_rate 0.5: each rank keeps its positives + random others; the loss is the unsharded head's on the
    # union of the kept classes, and each rank's kept rows get that head's gradient
    n_classes, sizes = SETUPS[world_size]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(sum(sizes), D, generator=g)
    labels = torch.randint(0, n_classes, (sum(sizes),), generator=g)
    weight = torch.randn(n_classes, D, generator=g)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    torch.manual_seed(rank)
    head = ShardedMarginHead("arcface", D, n_classes, SCALE, 0.5, rank=rank, world_size=world_size, sample_rate=0.5)
    head.load_full_state_dict({"weight": weight})
    loss = head(x[rows], labels[rows])
    loss.backward()
    kept = [None] * world_size
    dist.all_gather_object(kept, head.last_sampled.tolist())
    sampled = torch.tensor(sorted(c for part in kept for c in part))
    start, stop = shard_range(n_classes, rank, world_size)
    reference, renumbered = _restricted_reference("arcface", weight, labels, sampled)
    loss_ref = reference(x, renumbered)
    loss_ref.backward()
    mine = (sampled >= start) & (sampled < stop)
    n_keep, n_positives = math.ceil(0.5 * (stop - start)), len(labels[(labels >= start) & (labels < stop)].unique())
    grad = head.weight.grad[sampled[mine] - start]
    return {
        "sampled_keeps_positives": {"diff": float(not set(labels.tolist()) <= set(sampled.tolist())), "tol": 0.0},
        "sampled_size": {"diff": float(len(head.last_sampled) != max(n_keep, n_positives)), "tol": 0.0},
        "sampled_loss": {"diff": _max_diff(loss, loss_ref), "tol": 4 * EPS32 * (1 + loss_ref.item())},
        "sampled_weight_grad": {
            "diff": _max_diff(grad, reference.weight.grad[mine]),
            "tol": GRAD_RTOL * float(reference.weight.grad.abs().max()),
        },
    }


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        results = {}
        for kind in SHARDED_KINDS:
            for labels_mode in ("random", "other_rank"):
                for check, res in _compare(kind, rank, world_size, labels_mode, SCALE).items():
                    results[f"{kind}/{labels_mode}/{check}"] = res
            for check, res in _compare(kind, rank, world_size, "random", scale=2000.0).items():
                results[f"{kind}/large_logits_s2000/{check}"] = res
        results.update(_fp64_cross_entropy(rank, world_size))
        results.update(_state_round_trip(rank, world_size))
        results.update(_labels_out_of_range(rank, world_size))
        results.update(_sampled(rank, world_size))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _spawn(world_size: int, out_dir: Path) -> list[dict[str, dict]]:
    context = mp.start_processes(
        _worker, args=(world_size, _free_port(), str(out_dir)), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException on a failure
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world_size} gloo processes did not finish within {SPAWN_TIMEOUT_S:.0f} s")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict[int, list[dict[str, dict]]]:
    return {w: _spawn(w, tmp_path_factory.mktemp(f"partial_fc_w{w}")) for w in SETUPS}


CHECKS = [
    f"{kind}/{mode}/{check}"
    for kind in SHARDED_KINDS
    for mode in ("random", "other_rank", "large_logits_s2000")
    for check in (
        "logits",
        "loss",
        "loss_same_on_every_rank",
        "embedding_grad_is_world_size_times",
        "backbone_weight_grad_after_ddp_average",
        "backbone_bias_grad_after_ddp_average",
        "weight_shard_grad",
    )
] + [
    f"{kind}/large_logits_s2000/{check}"
    for kind in SHARDED_KINDS
    for check in ("naive_softmax_overflows", "loss_finite")
]
CHECKS += [
    "fp64_loss",
    "fp64_grad",
    "full_state_shape",
    "full_state_rows_are_this_shard",
    "full_state_same_on_every_rank",
    "round_trip",
    "labels_out_of_range_raise_on_every_rank",
    "sampled_keeps_positives",
    "sampled_size",
    "sampled_loss",
    "sampled_weight_grad",
]


@pytest.mark.parametrize("world_size", list(SETUPS))
@pytest.mark.parametrize("check", CHECKS)
def test_sharded_head_matches_unsharded(distributed_results, world_size, check):
    for rank, results in enumerate(distributed_results[world_size]):
        res = results[check]
        assert res["diff"] <= res["tol"], (
            f"rank {rank} of {world_size}: {check} differs by {res['diff']:.3g} > {res['tol']:.3g}"
        )

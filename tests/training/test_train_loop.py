"""The training loop's mechanics on in-memory batches: accumulation, schedule, AMP, non-finite losses."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from arcfold.config import load_config
from arcfold.models.embedding import build_model
from arcfold.models.heads import build_head
from arcfold.runtime import amp_dtype_for
from arcfold.training.loop import train_one_epoch
from arcfold.training.schedule import build_optimizer, lr_factor
from arcfold.training.step import OptimizerStep, clip_grad_norm_if_needed_

from ..conftest import TINY


def _setup(*overrides, n_batches=6):
    cfg = load_config(None, [*TINY, "model.embedding_size=16", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    head = build_head(cfg.head, cfg.model.embedding_size, 5)
    optimizer = build_optimizer(cfg, model, head)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))) for _ in range(n_batches)]
    return cfg, model, head, optimizer, scheduler, batches


def _epoch(cfg, model, head, optimizer, scheduler, batches, amp_dtype=None):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_one_epoch(
        cfg, model, head, batches, len(batches),
        OptimizerStep.from_config(cfg, optimizer, scheduler, scaler, params),
        torch.device("cpu"), amp_dtype, 0,
    )  # fmt: skip


@pytest.mark.parametrize("accum, n_batches, updates", [(1, 6, 6), (2, 6, 3), (4, 6, 2), (3, 7, 3)])
def test_gradient_accumulation_steps_the_optimizer_every_accum_batches(accum, n_batches, updates):
    cfg, model, head, optimizer, scheduler, batches = _setup(f"train.accum_steps={accum}", n_batches=n_batches)
    _epoch(cfg, model, head, optimizer, scheduler, batches)
    assert scheduler.last_epoch == updates == math.ceil(n_batches / accum)  # the last partial window steps too
    assert optimizer.state[head.weight]["step"].item() == updates


def _sgd_epoch(accum, batches, head_wrapper=lambda h: h, lr=1.0):
    """One epoch with plain SGD (no momentum, decay or clipping) and the schedule lr / (1 + step), from the same
    initial weights every call; returns (model, head) before, (model, head) after, the optimizer and the scheduler."""
    cfg, model, head, *_ = _setup(f"train.accum_steps={accum}", "train.grad_clip=0", n_batches=0)
    params = _params(model, head)
    optimizer = torch.optim.SGD(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    before = copy.deepcopy((model, head))
    train_one_epoch(
        cfg, model, head_wrapper(head), batches, len(batches),
        OptimizerStep.from_config(cfg, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), params),
        torch.device("cpu"), None, 0,
    )  # fmt: skip
    return before, (model, head), optimizer, scheduler


def _mean_loss_gradient(model, head, batches):
    """d/dw of the mean of the batches' losses, by torch.autograd on a copy of the weights (train mode)."""
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    params = _params(model, head)
    loss = sum(head(model(x), y) for x, y in batches) / len(batches)
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_sgd_update(before, after, grads, lr):
    """after - before == -lr * grads over all weights (a weight without a gradient stays), to 1e-4 of its norm."""
    update = torch.cat([(p - p0).reshape(-1) for p0, p in zip(before, after, strict=True)])
    expected = torch.cat(
        [(-lr * g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(before, grads, strict=True)]
    )
    assert expected.norm() > 1e-3  # a real step: a wrong divisor (1/4 for 1/2, say) is far outside the tolerance
    assert (update - expected).norm() <= 1e-4 * expected.norm(), float((update - expected).norm() / expected.norm())


def _params(model, head):
    return [*model.parameters(), *head.parameters()]


def test_a_partial_accumulation_window_steps_on_the_mean_loss_of_its_real_batches():
    """accum 4 over 6 batches: the windows are [0..3] and [4, 5]. With SGD at lr 1 then 1/2 (the schedule), each
    update is minus lr times the gradient of its window's mean loss; the old code divided the window of 2 by 4."""
    _, _, _, _, _, batches = _setup(n_batches=6)
    (model0, head0), (model, head), _, scheduler = _sgd_epoch(4, batches)
    assert scheduler.last_epoch == 2
    first = _mean_loss_gradient(model0, head0, batches[:4])
    mid = copy.deepcopy((model0, head0))  # the weights after the first window: w0 - 1 * g(batches 0..3)
    with torch.no_grad():
        for p, g in zip(_params(*mid), first, strict=True):
            if g is not None:
                p -= g
    _assert_sgd_update(_params(*mid), _params(model, head), _mean_loss_gradient(*mid, batches[4:]), lr=0.5)


def test_a_single_short_window_equals_the_gradient_of_its_mean_loss():
    _, _, _, _, _, batches = _setup(n_batches=2)
    (model0, head0), (model, head), _, _ = _sgd_epoch(4, batches)
    _assert_sgd_update(_params(model0, head0), _params(model, head), _mean_loss_gradient(model0, head0, batches), lr=1)


@pytest.mark.parametrize("bad", [0, 1])  # the first or the last batch of the first window of 2
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_a_window_with_a_non_finite_loss_applies_no_update_and_keeps_the_schedule(bad):
    """accum 2 over 4 batches, a NaN loss in the first window: no update from that window (the finite batch's
    gradient is dropped too), the scheduler still advances, so the second window steps at the lr of step 1 and
    the epoch ends with the lr of a clean epoch."""
    _, _, _, _, _, batches = _setup(n_batches=4)
    _, (model, head), _, scheduler = _sgd_epoch(2, batches, lambda h: _FlakyHead(h, {bad}), lr=0.1)
    (model0, head0), _, _, clean = _sgd_epoch(2, batches, lr=0.1)
    assert scheduler.last_epoch == clean.last_epoch == 2
    assert scheduler.get_last_lr() == clean.get_last_lr() == pytest.approx([0.1 / 3])
    grads = _mean_loss_gradient(model0, head0, batches[2:])  # the second window, from the untouched weights
    _assert_sgd_update(_params(model0, head0), _params(model, head), grads, lr=0.05)


def test_head_gets_its_own_learning_rate_and_no_decay_on_norms():
    cfg, model, head, optimizer, *_ = _setup("optim.lr=0.001", "optim.head_lr=0.05", "optim.weight_decay=0.01")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert group_of[id(head.weight)]["lr"] == 0.05
    assert group_of[id(model.neck[0].weight)]["lr"] == 0.001 and group_of[id(model.neck[0].weight)]["weight_decay"] > 0
    assert group_of[id(model.neck[1].weight)]["weight_decay"] == 0  # batch-norm scale
    assert group_of[id(model.pool.p)]["weight_decay"] == 0  # GeM p


def test_schedule_warms_up_then_follows_a_cosine_to_the_floor():
    f = [lr_factor(s, total=100, warmup=10, warmup_factor=0.01, min_factor=0.05, name="cosine") for s in range(101)]
    assert f[0] == pytest.approx(0.01) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.05 + 0.95 * 0.5)  # half-way through the cosine
    assert f[100] == pytest.approx(0.05)
    assert all(a <= b for a, b in zip(f[:10], f[1:11], strict=True))
    assert all(a >= b for a, b in zip(f[10:-1], f[11:], strict=True))


def test_bf16_autocast_on_cpu_trains_with_finite_loss():
    cfg, model, head, optimizer, scheduler, batches = _setup("train.amp=bf16")
    before = model.neck[0].weight.detach().clone()
    stats = _epoch(
        cfg, model, head, optimizer, scheduler, batches, amp_dtype=amp_dtype_for("bf16", torch.device("cpu"))
    )
    assert math.isfinite(stats["train_loss"]) and stats["skipped_batches"] == 0
    assert torch.isfinite(model.neck[0].weight).all() and not torch.equal(model.neck[0].weight, before)


def test_amp_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype_for("auto", cpu) is None and amp_dtype_for("auto", cuda) is torch.float16
    assert amp_dtype_for("bf16", cpu) is torch.bfloat16 and amp_dtype_for("off", cuda) is None
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        amp_dtype_for("fp16", cpu)


class _FlakyHead(torch.nn.Module):
    """Wraps a head; returns a non-finite loss on the calls listed (an fp16 overflow, say)."""

    def __init__(self, head, bad_calls):
        super().__init__()
        self.head, self.bad_calls, self.calls = head, set(bad_calls), 0

    def forward(self, embeddings, labels):
        loss = self.head(embeddings, labels)
        self.calls += 1
        return loss * float("inf") if self.calls - 1 in self.bad_calls else loss


def test_non_finite_losses_are_skipped_then_stop_the_run():
    cfg, model, head, optimizer, scheduler, batches = _setup("train.max_nonfinite_steps=10", n_batches=12)
    stats = _epoch(cfg, model, _FlakyHead(head, {1, 2}), optimizer, scheduler, batches)
    # the scheduler advances once per window (here per batch), skipped or not; the optimizer only on good ones
    assert stats["skipped_batches"] == 2 and scheduler.last_epoch == 12 and math.isfinite(stats["train_loss"])
    assert optimizer.state[head.weight]["step"].item() == 10
    assert all(torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers(), *head.parameters()])
    with pytest.raises(
        FloatingPointError, match=r"10 training steps in a row skipped \(train.max_nonfinite_steps=10\)"
    ):
        _epoch(cfg, model, _FlakyHead(head, range(12)), optimizer, scheduler, batches)


def test_margin_warmup_ramps_the_margin_within_the_epoch():
    cfg, model, head, optimizer, scheduler, batches = _setup("head.margin_warmup_epochs=2", n_batches=4)
    seen = []
    forward = head.forward

    def recording_forward(embeddings, labels):
        seen.append(head.margin_factor)
        return forward(embeddings, labels)

    head.forward = recording_forward
    _epoch(cfg, model, head, optimizer, scheduler, batches)
    # batch i of epoch 0 is at progress i/4 epochs, half-way through a 2-epoch warm-up at most
    assert seen == pytest.approx([0.0, 0.125, 0.25, 0.375])


def test_pair_loss_parameters_train_at_the_head_learning_rate():
    cfg, model, head, optimizer, scheduler, batches = _setup(
        "head.name=proxy_anchor", "optim.lr=0.001", "optim.head_lr=0.05", n_batches=3
    )
    proxies = [p for p in head.parameters() if p.requires_grad]
    assert proxies, "ProxyAnchor's proxies must be parameters of the head module"
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert all(group_of[id(p)]["lr"] == 0.05 for p in proxies)
    before = [p.detach().clone() for p in proxies]
    stats = _epoch(cfg, model, head, optimizer, scheduler, batches)
    assert math.isfinite(stats["train_loss"])
    assert all(not torch.equal(p, b) for p, b in zip(proxies, before, strict=True))


@pytest.mark.parametrize("scale", [1e-3, 0.5, 1.0, 1 + 1e-7, 3.0, float("inf"), float("nan")])
def test_clipping_only_above_the_threshold_equals_clip_grad_norm(scale):
    """The same gradients and norm as ``clip_grad_norm_`` (bit for bit), also right at and around the threshold."""
    torch.manual_seed(0)
    grads = [torch.randn(7, 5), torch.randn(11), torch.randn(3, 2, 2)]
    clip = float(torch.nn.utils.get_total_norm(grads))  # scale 1: the norm is exactly the threshold
    grads = [g * scale for g in grads]

    def params() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads] + [torch.nn.Parameter(torch.zeros(2))]
        for p, g in zip(ps, grads, strict=False):
            p.grad = g.clone()  # the last parameter has no gradient
        return ps

    stock, ours = params(), params()
    norm_stock = torch.nn.utils.clip_grad_norm_(stock, clip)
    norm_ours = clip_grad_norm_if_needed_(ours, clip)
    torch.testing.assert_close(norm_ours, norm_stock, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(stock[:-1], ours[:-1], strict=True):
        if math.isnan(scale) or math.isinf(scale):  # a skipped step: only the norm's verdict matters
            assert not torch.isfinite(norm_ours)
        else:
            assert torch.equal(a.grad, b.grad)
    assert ours[-1].grad is None
    if 0 < scale < 1:
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads, strict=False))  # untouched: no multiply
    if scale == 3.0:
        assert not torch.equal(ours[0].grad, grads[0])  # clipped


def test_uint8_batches_normalised_on_the_device_train_like_float_batches():
    """The CUDA data path (uint8 over the bus, ``normalise`` after ``.to(device)``), run on the CPU: the same
    losses and weights as feeding the normalised float batches."""
    from arcfold.data.transforms import BatchNormalise

    normalise = BatchNormalise(torch.device("cpu"))
    runs = []
    for on_device in (False, True):
        cfg, model, head, optimizer, scheduler, _ = _setup()
        gen = torch.Generator().manual_seed(1)
        raw = [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(8) % 5)]
        batches = raw * 3 if on_device else [(normalise(x), y) for x, y in raw] * 3
        params = [p for g in optimizer.param_groups for p in g["params"]]
        stats = train_one_epoch(
        cfg, model, head, batches, len(batches),
        OptimizerStep.from_config(cfg, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), params),
        torch.device("cpu"), None, 0, normalise=normalise if on_device else None,
    )  # fmt: skip
        runs.append((stats["train_loss"], [p.detach().clone() for p in params]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_optimizer_is_fused_and_steps_as_torchs_looped_reference(name):
    """build_optimizer's fused kernel (CPU too) against torch's single-tensor loop, same groups and hyper-parameters:
    three steps from the same gradients agree to float32 rounding."""
    cfg, model, head, optimizer, _, batches = _setup(f"optim.name={name}", "optim.weight_decay=0.01", n_batches=3)
    assert optimizer.defaults["fused"] is True and len(optimizer.param_groups) == 3  # model decay / not, the head
    ref_model, ref_head = copy.deepcopy(model), copy.deepcopy(head)
    ref_groups = [
        {**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
         "params": [p for p, q in zip(_params(ref_model, ref_head), _params(model, head), strict=True)
                    if any(q is r for r in g["params"])]}
        for g in optimizer.param_groups
    ]  # fmt: skip
    reference = type(optimizer)(ref_groups, foreach=False)
    before = [p.detach().clone() for p in _params(model, head)]
    for images, labels in batches:  # the same gradients into both: only the update rules are compared
        optimizer.zero_grad()
        head(model(images), labels).backward()
        for p, q in zip(_params(model, head), _params(ref_model, ref_head), strict=True):
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
        for p, q in zip(_params(model, head), _params(ref_model, ref_head), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    changed = [not torch.equal(p, q) for p, q in zip(_params(model, head), before, strict=True)]
    assert changed[0] and changed[-1] and sum(changed) > 0.9 * len(changed)  # the stem conv, the head: trained

"""DistributedDataParallel training on CPU: 2 processes (gloo) against one process at the same global batch.

Runs start 2 processes either through the real CLI (``NPROC_PER_NODE=2 bash train_fold.sh``, i.e. torchrun) or
with ``torch.multiprocessing`` spawn (each rank calls ``train_fold`` with torchrun's environment set by hand, and
records its per-step losses, its final head and the file writes it made). Every start has a timeout; every
spawned group a free port of its own.

Comparability: ``data.augment=none``, no dropout, and a backbone without batch norm (timm's ``test_convnext``,
LayerNorm) with the ``gp`` neck. PyTorch's SyncBatchNorm runs on GPUs only, so on CPU a batch-norm model would
normalise each rank's half batch on its own and differ from one process by design; with no batch norm the two
runs compute the same function of the same global batches.

Tolerances: the 2-process run sums the gradients of two half batches (gloo all-reduce, fp32) where one process
sums one batch, so the two differ by float rounding (~1e-7 relative per step), which AdamW's updates carry on.
Losses per step: 1e-4 relative (measured ~1e-7). OOF embeddings: 1e-4 absolute per coordinate (unit vectors).
Recall@1: equal within 2 queries of the ~830 (a rounding difference can flip a near tie of two neighbours;
measured: equal).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from arcfold.data.samplers import ShardedBatchSampler, build_sampler, global_batches
from arcfold.distributed import shard_range
from arcfold.io import load_json, load_npz

from .conftest import REPO, tmp_path_overrides

SPAWN_TIMEOUT_S = 300
LOSS_RTOL = 1e-4
EMBEDDING_ATOL = 1e-4

# a tiny, deterministic, batch-norm-free run on the glyph set (see the module docstring)
COMPARABLE = [
    "model.backbone=test_convnext",
    "model.neck=gp",
    "model.embedding_size=64",
    "data.image_size=32",
    "data.augment=none",
    "train.batch_size=32",
    "train.eval_batch_size=128",
    "train.progress=false",
    "train.device=cpu",
    "train.amp=off",
    "train.epochs=3",
    "train.limit_train_batches=3",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` spawned processes; fail (and kill them) after
    SPAWN_TIMEOUT_S, or as soon as one fails."""
    port = _free_port()
    context = mp.start_processes(
        fn, args=(world_size, port, *args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.time() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.time() > deadline:
                pytest.fail(f"{world_size} training processes still running after {SPAWN_TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


def _set_rank_env(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)  # 2 ranks on a 2-core machine
    if world_size > 1:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )


# --------------------------------------------------------------------------------------------
# the batches each rank trains on


@pytest.mark.parametrize("m_per_class", [0, 4])
def test_ranks_get_disjoint_slices_that_together_are_the_single_process_batch(m_per_class):
    labels = np.repeat(np.arange(20), 6)  # 20 classes x 6 images
    batch, world_size, seed = 16, 2, 1234
    sampler = build_sampler(labels, m_per_class, batch, seed=seed) if m_per_class else None
    if sampler is not None:
        sampler.set_epoch(3)
    # what the single-process train loop iterates (train.py: shuffle with a seeded generator, or the sampler)
    single = torch.utils.data.DataLoader(
        torch.arange(len(labels)),
        batch_size=batch,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    single_batches = [b.tolist() for b in single]
    batches = global_batches(len(labels), batch, seed, sampler)
    assert batches == single_batches and len(batches) == len(labels) // batch
    assert batches != [list(range(i * batch, (i + 1) * batch)) for i in range(len(batches))]  # shuffled

    per_rank = [list(ShardedBatchSampler(batches, rank, world_size)) for rank in range(world_size)]
    for step, global_batch in enumerate(batches):
        slices = [per_rank[rank][step] for rank in range(world_size)]
        assert all(len(s) == batch // world_size for s in slices)
        assert not set(slices[0]) & set(slices[1])  # disjoint
        assert slices[0] + slices[1] == global_batch  # together: the single-process batch, in order
        if m_per_class:  # each class's m images stay together on one rank
            for s in slices:
                blocks = labels[s].reshape(-1, m_per_class)
                assert (blocks == blocks[:, :1]).all()
            assert not set(labels[slices[0]]) & set(labels[slices[1]])


def test_sharded_batches_must_split_evenly():
    with pytest.raises(ValueError, match="multiple of world_size=3"):
        ShardedBatchSampler([[0, 1, 2, 3]], rank=0, world_size=3)


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["train.batch_size=30"], 4, "train.batch_size=30 is the global batch and must split evenly over the 4"),
        (["train.batch_size=32", "sampler.m_per_class=16"], 4, "8 per process, not a multiple of .*m_per_class=16"),
        (["train.sync_bn=true"], 2, "train.sync_bn=true needs CUDA"),
    ],
)
def test_distributed_settings_the_config_alone_cannot_check_are_config_errors(overrides, world_size, message):
    from arcfold.config import load_config
    from arcfold.distributed import DistContext
    from arcfold.errors import ConfigError
    from arcfold.training.ddp import check_distributed_config as _check_distributed_config

    cfg = load_config(None, overrides)
    _check_distributed_config(cfg, DistContext(0, 1), torch.device("cpu"))  # one process: fine
    with pytest.raises(ConfigError, match=message):
        _check_distributed_config(cfg, DistContext(0, world_size), torch.device("cpu"))


def test_sharded_head_takes_only_the_margin_heads_it_supports():
    from arcfold.config import load_config
    from arcfold.errors import ConfigError

    load_config(None, ["head.sharded=true", "head.name=cosface"])
    with pytest.raises(ConfigError, match="head.sharded=true supports head.name=arcface or cosface.*subcenter_arcface"):
        load_config(None, ["head.sharded=true", "head.name=subcenter_arcface"])
    with pytest.raises(ConfigError, match="not head.dynamic_margin=power"):
        load_config(None, ["head.sharded=true", "head.dynamic_margin=power"])


# --------------------------------------------------------------------------------------------
# the loop's collectives: gathered rows, no_sync on accumulation steps, head kept in sync


def _loop_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    _set_rank_env(rank, world_size, port)
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from arcfold.config import load_config
    from arcfold.distributed import dist_context, gather_rows, process_group
    from arcfold.models.embedding import build_model
    from arcfold.models.heads import build_head
    from arcfold.training.ddp import build_ddp
    from arcfold.training.ema import build_ema
    from arcfold.training.loop import train_one_epoch
    from arcfold.training.schedule import build_optimizer
    from arcfold.training.step import OptimizerStep

    ctx = dist_context()
    with process_group(ctx, torch.device("cpu"), timeout_s=120):
        # rows 0..10 split 6/5: gathered back in order, the padding of the shorter shard cut off
        lo, hi = shard_range(11, rank, world_size)
        local = np.arange(lo * 3, hi * 3, dtype=np.float32).reshape(-1, 3)
        gathered = gather_rows(local, ctx, torch.device("cpu"))

        cfg = load_config(None, [*COMPARABLE, "train.accum_steps=2", "optim.head_lr=0.05"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        head = build_head(cfg.head, cfg.model.embedding_size, 5)
        head_before = head.weight.detach().clone()
        optimizer = build_optimizer(cfg, model, head)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        ddp = build_ddp(cfg, model, head, ctx, torch.device("cpu"))
        ema = build_ema(model, head, 0.5, warmup=False)  # of the unwrapped modules, as train_fold builds it
        events: list[str] = []

        def counting_hook(state, bucket):
            events.append("allreduce")
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        forward = head.forward

        def recording_forward(embeddings, labels):
            events.append("step")
            return forward(embeddings, labels)

        head.forward = recording_forward
        generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        batches = [(torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 5, (8,), generator=generator))]
        batches *= 4
        params = [p for g in optimizer.param_groups for p in g["params"]]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        cpu = torch.device("cpu")
        train_one_epoch(
            cfg,
            model,
            head,
            batches,
            4,
            OptimizerStep.from_config(cfg, optimizer, scheduler, scaler, params, ema=ema),
            cpu,
            None,
            0,
            ddp=ddp,
            ctx=ctx,
        )
        weights = [torch.zeros_like(head.weight) for _ in range(world_size)]
        dist.all_gather(weights, head.weight.detach())
        ema_weights = [torch.zeros_like(head.weight) for _ in range(world_size)]
        dist.all_gather(ema_weights, ema.head.weight.detach())
        torch.save(
            {
                "gathered": gathered,
                "events": events,
                "head_changed": not torch.equal(head.weight.detach(), head_before),
                "weights": weights,
                "ema_updates": ema.updates,
                "ema_weights": ema_weights,
                "ema_between": bool(((ema.head.weight - head_before).abs() > 0).any())
                and not torch.equal(ema.head.weight, head.weight),
            },
            Path(out_dir) / f"loop_rank{rank}.pt",
        )


@pytest.mark.slow
def test_loop_gathers_rows_in_order_skips_allreduce_on_accumulation_steps_and_keeps_heads_equal(tmp_path):
    _spawn(_loop_worker, 2, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"loop_rank{rank}.pt", weights_only=False)
        np.testing.assert_array_equal(out["gathered"], np.arange(33, dtype=np.float32).reshape(11, 3))
        # accum_steps=2 over 4 micro-batches: gradients all-reduced after micro-batches 2 and 4 only
        segments = " ".join(out["events"]).split("step")[1:]  # what happened after each forward
        n_allreduce = [s.split().count("allreduce") for s in segments]
        assert n_allreduce[0] == n_allreduce[2] == 0, out["events"]
        assert n_allreduce[1] > 0 and n_allreduce[3] > 0, out["events"]
        # each rank trained on its own data, yet the head (inside DDP) is the same on every rank
        assert out["head_changed"]
        assert all(torch.equal(w, out["weights"][0]) for w in out["weights"])
        # the EMA: one update per optimizer step (2 windows), the same on every rank, neither start nor end
        assert out["ema_updates"] == 2 and out["ema_between"]
        assert all(torch.equal(w, out["ema_weights"][0]) for w in out["ema_weights"])


# --------------------------------------------------------------------------------------------
# a whole fold: train_fold in 1 and in 2 spawned processes


def _fold_worker(rank: int, world_size: int, port: int, overrides: list[str], out_dir: str) -> None:
    """Train fold 0, recording the head's loss at every micro-step, the final head and the file writes."""
    _set_rank_env(rank, world_size, port)
    import arcfold.training.ddp
    import arcfold.training.finalize
    import arcfold.training.fold
    import arcfold.training.loop
    from arcfold.config import load_config

    record: dict = {"losses": [], "writes": [], "head": None}

    def recorded(build):
        def wrapper(*args, **kwargs):
            head = build(*args, **kwargs)
            forward = head.forward

            def recording_forward(embeddings, labels):
                loss = forward(embeddings, labels)
                record["losses"].append(loss.item())
                return loss

            head.forward = recording_forward
            record["head"] = head
            return head

        return wrapper

    arcfold.training.fold.build_head = recorded(arcfold.training.fold.build_head)
    pair_forward = arcfold.training.ddp.GlobalPairLoss.forward  # pair/proxy losses under DDP bypass head.forward

    def recording_pair_forward(self, embeddings, labels):
        loss = pair_forward(self, embeddings, labels)
        record["losses"].append(loss.item())
        return loss

    arcfold.training.ddp.GlobalPairLoss.forward = recording_pair_forward
    arcfold.training.fold.build_sharded_head = recorded(arcfold.training.fold.build_sharded_head)
    writers = ["save_torch", "save_npz", "save_json", "save_text", "save_history", "atomic_path", "file_lock"]

    def recording_writer(module, name: str):
        real = getattr(module, name)

        def writer(*args, **kwargs):
            record["writes"].append(name)
            return real(*args, **kwargs)

        return writer

    for name in [*writers, "run_log", "ensure_dataset", "ensure_folds", "remove_stale_temp_files"]:
        for module in (arcfold.training.fold, arcfold.training.finalize):  # where the training package writes
            if hasattr(module, name):
                setattr(module, name, recording_writer(module, name))
    cfg = load_config(None, overrides)
    scores = arcfold.training.fold.train_fold(cfg, 0)
    head = record["head"]
    torch.save(
        {
            "losses": record["losses"],
            "writes": record["writes"],
            "scores": scores,
            "head": {k: v.detach().clone() for k, v in head.state_dict().items()},
        },
        Path(out_dir) / f"fold_rank{rank}.pt",
    )


def _run_fold(root: Path, glyphs_input: Path, world_size: int, *extra: str) -> list[dict]:
    overrides = [
        *tmp_path_overrides(root),
        f"data.input_dir={glyphs_input}",
        *COMPARABLE,
        "name=spawned",
        "sampler.m_per_class=4",
        "train.accum_steps=2",
        *extra,
    ]
    root.mkdir(parents=True, exist_ok=True)
    _spawn(_fold_worker, world_size, overrides, str(root))
    return [torch.load(root / f"fold_rank{r}.pt", weights_only=False) for r in range(world_size)]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "fold_rank" not in p.name)


@pytest.fixture(scope="module")
def spawned_single(tmp_path_factory, glyphs_input):
    root = tmp_path_factory.mktemp("spawned") / "single"
    return root, _run_fold(root, glyphs_input, 1)


def _assert_same_training(single_out: dict, ranks_out: list[dict], what: str) -> None:
    single_losses = np.array(single_out["losses"])
    # every rank records its half batch's mean loss; the global batch's loss is their mean
    ddp_losses = np.mean([r["losses"] for r in ranks_out], axis=0)
    assert len(single_losses) == len(ddp_losses) == 9  # 3 epochs x 3 micro-batches
    rel = np.abs(ddp_losses - single_losses) / np.abs(single_losses)
    print(f"{what}: loss per step, max relative difference {rel.max():.2e}")
    assert rel.max() < LOSS_RTOL, (single_losses, ddp_losses)
    r1_single, r1_ddp = single_out["scores"]["recall@1"], ranks_out[0]["scores"]["recall@1"]
    n_queries = single_out["scores"]["n_queries"]
    print(f"{what}: OOF R@1 single {r1_single:.4f}, 2 processes {r1_ddp:.4f} ({n_queries} queries)")
    assert abs(r1_single - r1_ddp) <= 2 / n_queries
    assert ranks_out[1]["scores"] == ranks_out[0]["scores"]  # every rank returns rank 0's scores


@pytest.mark.slow
def test_two_processes_match_one_at_equal_global_batch(spawned_single, tmp_path, glyphs_input):
    single_root, (single,) = spawned_single
    ddp_root = tmp_path / "single"  # the same name, so the two file trees compare directly
    ranks = _run_fold(ddp_root, glyphs_input, 2)
    _assert_same_training(single, ranks, "margin head in DDP, m-per-class, accum 2")

    # the head's weights (all-reduced gradients) are identical on both ranks, and close to one process's
    for key, value in ranks[0]["head"].items():
        assert torch.equal(value, ranks[1]["head"][key]), key
        torch.testing.assert_close(value, single["head"][key], atol=1e-5, rtol=1e-4)

    # OOF: the held-out fold in fold-file order, the gathered embeddings those of one process
    oof_single = load_npz(single_root / "oof" / "spawned" / "fold0.npz")
    oof_ddp = load_npz(ddp_root / "oof" / "spawned" / "fold0.npz")
    assert oof_ddp["ids"].tolist() == oof_single["ids"].tolist()
    np.testing.assert_allclose(oof_ddp["embeddings"], oof_single["embeddings"], atol=EMBEDDING_ATOL)

    # only rank 0 wrote files, took the lock or prepared data; the file tree is that of one process
    assert ranks[1]["writes"] == [], ranks[1]["writes"]
    assert {"file_lock", "save_torch", "save_npz", "save_history", "ensure_folds"} <= set(ranks[0]["writes"])
    assert _files(ddp_root) == _files(single_root)


@pytest.mark.slow
def test_sharded_head_matches_one_process(spawned_single, tmp_path, glyphs_input):
    pytest.importorskip("arcfold.models.partial_fc")
    _, (single,) = spawned_single
    ranks = _run_fold(tmp_path / "sharded", glyphs_input, 2, "head.sharded=true")
    _assert_same_training(single, ranks, "sharded ArcFace head (Partial FC)")
    # each rank holds its own rows of the class centres; together they are one process's head
    rows = torch.cat([ranks[0]["head"]["weight"], ranks[1]["head"]["weight"]])
    torch.testing.assert_close(rows, single["head"]["weight"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_proxy_loss_sees_the_global_batch_and_matches_one_process(tmp_path, glyphs_input):
    """Proxy Anchor (PML) through DistributedLossWrapper: the loss of the all-gathered batch on every rank, the
    embeddings' gradient scaled so that DDP's average gives the backbone the single-process gradient and the
    proxies theirs (a wrong factor on either shows in the losses of the later steps)."""
    extra = ["head.name=proxy_anchor", "optim.head_lr=0.01"]
    (single,) = _run_fold(tmp_path / "single", glyphs_input, 1, *extra)
    ranks = _run_fold(tmp_path / "ddp", glyphs_input, 2, *extra)
    for r in ranks:  # the wrapped loss is the global batch's, the same on both ranks
        np.testing.assert_allclose(r["losses"], ranks[0]["losses"], rtol=1e-6)
    _assert_same_training(single, ranks, "proxy_anchor (DistributedLossWrapper)")
    for key, value in ranks[0]["head"].items():  # the proxies, trained inside DDP
        assert torch.equal(value, ranks[1]["head"][key]), key
        torch.testing.assert_close(value, single["head"][key], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# through the real CLI: train_fold.sh under torchrun


def _cli(root: Path, glyphs_input: Path, nproc: int | None, *extra: str, env_extra: dict | None = None):
    overrides = [*tmp_path_overrides(root), f"data.input_dir={glyphs_input}", *COMPARABLE, "name=cli", *extra]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("NPROC_PER_NODE", None)
    if nproc:
        env["NPROC_PER_NODE"] = str(nproc)
    cmd = ["bash", str(REPO / "train_fold.sh"), "0", str(REPO / "configs" / "glyphs_arcface.yaml"), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)


@pytest.mark.slow
def test_train_fold_sh_under_torchrun_matches_one_process_and_resumes(tmp_path, glyphs_input):
    t0 = time.time()
    single = _cli(tmp_path / "single", glyphs_input, None)
    t1 = time.time()
    ddp = _cli(tmp_path / "ddp", glyphs_input, 2)
    t2 = time.time()
    assert single.returncode == 0, single.stderr[-3000:]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    print(f"train_fold.sh: 1 process {t1 - t0:.1f} s, 2 processes (torchrun) {t2 - t1:.1f} s")
    table = "leave-one-out retrieval on each held-out fold"
    assert ddp.stdout.count(table) == single.stdout.count(table) == 1  # scored once, by one process

    h_single = pd.read_csv(tmp_path / "single" / "models" / "cli" / "fold0" / "history.csv")
    h_ddp = pd.read_csv(tmp_path / "ddp" / "models" / "cli" / "fold0" / "history.csv")
    rel = np.abs(h_ddp["train_loss"] - h_single["train_loss"]) / h_single["train_loss"]
    print(f"train_fold.sh: epoch loss max relative difference {rel.max():.2e}")
    assert rel.max() < LOSS_RTOL
    s_single = load_json(tmp_path / "single" / "oof" / "cli" / "fold0.json")
    s_ddp = load_json(tmp_path / "ddp" / "oof" / "cli" / "fold0.json")
    print(f"train_fold.sh: R@1 single {s_single['recall@1']:.4f}, torchrun x2 {s_ddp['recall@1']:.4f}")
    assert abs(s_single["recall@1"] - s_ddp["recall@1"]) <= 2 / s_single["n_queries"]
    assert "torch.distributed" not in single.stderr and "[rank1]" not in ddp.stderr  # rank 1 stays quiet

    # resume under DDP: rank 0 is SIGKILLed while writing epoch 1's resume point; torchrun stops rank 1 (no
    # hang); the resumed 2-process run replays epochs 1-2 from epoch 0's checkpoint and ends where the
    # uninterrupted one did
    killed = _cli(tmp_path / "resumed", glyphs_input, 2, env_extra={"ARCFOLD_KILL_AT": "write:last.pt#2"})
    assert killed.returncode != 0
    last = torch.load(tmp_path / "resumed" / "models" / "cli" / "fold0" / "last.pt", weights_only=True)
    assert last["epoch"] == 0
    resumed = _cli(tmp_path / "resumed", glyphs_input, 2, "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming fold 0 from epoch 1" in resumed.stderr
    oof_resumed = load_npz(tmp_path / "resumed" / "oof" / "cli" / "fold0.npz")
    oof_ddp = load_npz(tmp_path / "ddp" / "oof" / "cli" / "fold0.npz")
    np.testing.assert_allclose(oof_resumed["embeddings"], oof_ddp["embeddings"], atol=EMBEDDING_ATOL)
    h_resumed = pd.read_csv(tmp_path / "resumed" / "models" / "cli" / "fold0" / "history.csv")
    np.testing.assert_allclose(h_resumed["train_loss"], h_ddp["train_loss"], rtol=LOSS_RTOL)


def _crash_worker(rank: int, world_size: int, port: int, overrides: list[str], out_dir: str) -> None:
    """Rank 1 SIGKILLs itself at its 2nd training step (no clean-up at all); rank 0 records how it ended."""
    _set_rank_env(rank, world_size, port)
    import arcfold.training.ddp
    import arcfold.training.fold
    import arcfold.training.loop
    from arcfold.config import load_config

    if rank == 1:
        real, calls = arcfold.training.loop.reduce_mean, []

        def dying_reduce_mean(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        arcfold.training.loop.reduce_mean = dying_reduce_mean
    try:
        arcfold.training.fold.train_fold(load_config(None, overrides), 0)
        outcome = "finished"
    except Exception as e:  # noqa: BLE001 - what the surviving rank saw
        outcome = f"{type(e).__name__}: {e}"
    Path(out_dir, f"crash_rank{rank}.txt").write_text(outcome)


@pytest.mark.slow
def test_a_rank_that_dies_makes_the_other_fail_instead_of_hanging(tmp_path, glyphs_input):
    """Without torchrun (which would stop the survivor itself): rank 1 dies mid-epoch while rank 0 waits for it
    in a collective; rank 0 fails within seconds (gloo sees the closed connection), long before the 120 s
    timeout that bounds a hang."""
    overrides = [*tmp_path_overrides(tmp_path), f"data.input_dir={glyphs_input}", *COMPARABLE, "name=crash"]
    overrides.append("train.dist_timeout_s=120")
    spawn = mp.get_context("spawn")
    port = _free_port()
    procs = [spawn.Process(target=_crash_worker, args=(r, 2, port, overrides, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    t0 = time.time()
    try:
        procs[0].join(timeout=100)
        waited = time.time() - t0
        assert procs[0].exitcode is not None, "rank 0 still waits for the dead rank 1"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    assert procs[1].exitcode == -signal.SIGKILL
    outcome = (tmp_path / "crash_rank0.txt").read_text()
    print(f"rank 0 ended {waited:.1f} s after start: {outcome[:200]}")
    assert outcome != "finished"
    assert not (tmp_path / "oof" / "crash" / "fold0.npz").exists()

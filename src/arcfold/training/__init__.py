"""Training: one fold of one experiment, validated every epoch; the last (or the best) epoch kept.

Files (``<exp>`` = ``cfg.name``, ``K`` = fold):

* ``models/<exp>/fold<K>/``: work folder while training — ``last.pt`` (full training state, written
  every epoch: resume point), ``best_e<E>.pt`` / ``best_oof_e<E>.npz`` (the kept epoch E's weights and
  validation embeddings; the name predates ``train.keep``), ``history.csv`` (one row per epoch), ``train.log``
  (appended by each run, ending with the error that stopped one: the line the CLI printed, or a bug's traceback).
* When the fold finishes: ``models/<exp>/fold<K>.pt`` (the kept epoch's embedding weights + config),
  ``oof/<exp>/fold<K>.npz`` (ids, images, labels, groups, L2-normalised embeddings of the held-out
  fold at the kept epoch), ``oof/<exp>/fold<K>.json`` (scores), ``oof/<exp>/fold<K>.config.yaml``.
  The OOF ``.npz`` is written last and marks the fold as finished: a finished fold is never
  overwritten without ``train.force=true``.

Validation is leave-one-out retrieval inside the held-out fold (whose classes were never trained
on): Recall@1/2/4/5/8/10 and MAP@R. Which epoch the fold keeps is ``train.keep``:

* ``last`` (default): the last epoch; the schedule decides, so the OOF score is an honest estimate. Only the
  last epoch's files are written.
* ``best``: the epoch with the highest validation Recall@1 (the first of ties), its files written at each
  improvement. The epoch is then chosen on the fold it is scored on: the OOF score is optimistic, and score and
  leaderboard flag it ("epoch chosen on the validation fold").

Full-data fit (``--fold full``, :data:`~arcfold.artifacts.FULL_FIT`): the same loop on every row of every fold
(never the test split, fold -1), seeded with ``train.seed + n_splits``, with no validation set: no OOF, no per-epoch
validation, the last epoch kept. Work folder ``models/<exp>/full/``; outputs ``models/<exp>/full.pt`` (the format of
``fold<K>.pt``, ``"fold": "full"``), ``full.config.yaml`` and ``full.json`` (written last: marks it finished; epochs
and the rule that chose them, images, classes, time, commit, fold file). Epochs: :func:`full_fit_epochs`, fixed
when the run starts (``last.pt`` keeps them for a resume); the schedule spans them.

``fold<K>.json`` holds the kept epoch's scores at the top level (``recall@1``, ..., ``map@r``, ``n_queries``)
with ``keep`` and ``kept_epoch``, the last epoch's as ``last_epoch`` and ``last`` (``{metric: value}``), and
``best_epoch``, the kept epoch's old name (kept for readers of older files, whose folds always kept the best).

EMA and multi-stage fine-tuning: with ``train.ema_decay > 0`` an EMA of the model and head is kept
(:mod:`arcfold.training.ema`); validation, the kept OOF embeddings and ``fold<K>.pt`` are the EMA weights', and the
fold JSON records ``ema_decay`` / ``ema_warmup`` (``history.csv``: the decay of each epoch's last update).
``model.init_from`` starts a fresh fold from a finished fold's checkpoint (:mod:`arcfold.training.init_from`; the fold
JSON records ``init_from``: path, fold, epoch, whether the head was loaded). For it, ``fold<K>.pt`` also holds the
head's state dict and class list (``head``, ``classes``; not for a sharded head) and the fold file's ``folds_sha256``.

Crashes and resume
------------------
An epoch counts as done once its ``last.pt`` is written, after its kept-epoch files and ``history.csv``.
A run killed at any point (SIGKILL, power loss) resumes with ``train.resume=true`` from the last
*finished* epoch: a kill mid-epoch or during validation loses that epoch's progress, which is then
trained again. Every epoch reseeds Python, NumPy, torch, the augmentations and the sampler from
``(seed, fold, epoch)``, and ``last.pt`` holds model, head, optimizer, scheduler, GradScaler, EMA, best and
kept epoch and history, so on a deterministic device a resumed run ends bit-identical to one never
interrupted (tests/training/test_reliability_resume.py). Resuming with another config is refused (the keys that
differ are listed), except for keys that do not change the result (``train.progress``, paths, ...). ``last.pt`` also
keeps the elapsed seconds so far, so the fold JSON's (and ``full.json``'s) ``seconds`` covers every process of the
run, not only the one that finished it (the time from a kill to the resume is not counted, nor an interrupted
epoch's lost part).

Safety: one process per fold (``models/<exp>/.fold<K>.lock``; a second one is refused at once);
non-finite losses, and steps GradScaler skips for inf/NaN gradients, are skipped and counted, and
``train.max_nonfinite_steps`` of them in a row stop the run with the last good checkpoint kept.

Several processes (DistributedDataParallel)
-------------------------------------------
Under ``torchrun`` (``NPROC_PER_NODE=2 bash train_fold.sh 0``; docs/distributed.md) every process trains the fold
on its slice of each global batch (``train.batch_size`` is the global batch; :class:`ShardedBatchSampler`). DDP
wraps one module holding the embedding model *and* the head or loss (:class:`DistributedTrainStep`), so the head's
gradients are all-reduced like the backbone's and its weights stay identical on every rank; a sharded head
(``head.sharded``, Partial FC) stays outside DDP, each rank holding its own rows. Pair/proxy losses see the global
batch through pytorch-metric-learning's ``DistributedLossWrapper``. Accumulation steps run under ``no_sync()``.
Validation embeddings are computed on row shards and gathered back in the fold-file order. Only rank 0 takes the
fold lock, prepares the data and folds, and writes files and logs; every rank reads the same ``last.pt`` to
resume. The non-finite checks are all-reduced, so every rank skips the same steps.

The CLI is :mod:`arcfold.stages.train`. The pieces: :mod:`~arcfold.training.paths` (files, start/resume/refuse),
:mod:`~arcfold.training.state` (the resume point), :mod:`~arcfold.training.schedule` (optimizer, lr schedule),
:mod:`~arcfold.training.step` (the optimizer step), :mod:`~arcfold.training.loop` (the epoch),
:mod:`~arcfold.training.ddp` (several processes), :mod:`~arcfold.training.finalize` (the outputs).
"""

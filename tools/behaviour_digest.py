#!/usr/bin/env python
"""A digest of what training produces, to show that a refactor changed no behaviour.

Trains fold 0 of the embedded glyphs data set (resnet10t, 32 px, 2 epochs, random init) with the code of one source
tree, in a scratch folder, and prints the SHA-256 of the OOF embeddings, of the history's losses and of every weight
of ``fold0.pt`` (embedding model and head)::

    python tools/behaviour_digest.py --src /path/to/old/src > old.json
    python tools/behaviour_digest.py --src src > new.json
    diff old.json new.json        # empty: bit-identical

Both runs use the same machine and one torch thread (``OMP_NUM_THREADS=1``), so any difference is the code's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "model.backbone=resnet10t",
    "data.image_size=32",
    "train.epochs=2",
    "train.progress=false",
    "name=digest",
]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(workdir: Path) -> dict[str, object]:
    import numpy as np
    import pandas as pd
    import torch

    oof = np.load(workdir / "oof" / "digest" / "fold0.npz", allow_pickle=False)
    history = pd.read_csv(workdir / "models" / "digest" / "fold0" / "history.csv")
    losses = history[[c for c in history.columns if "loss" in c]]
    ckpt = torch.load(workdir / "models" / "digest" / "fold0.pt", map_location="cpu", weights_only=False)
    state = {**ckpt["state_dict"], **{f"head.{k}": v for k, v in (ckpt.get("head") or {}).items()}}
    weights = {k: _sha(v.contiguous().numpy().tobytes()) for k, v in sorted(state.items())}
    return {
        "oof_embeddings": _sha(np.ascontiguousarray(oof["embeddings"]).tobytes()),
        "oof_ids": _sha("\n".join(map(str, oof["ids"])).encode()),
        "history_losses": losses.to_dict(orient="list"),
        "history_losses_sha256": _sha(losses.to_numpy().tobytes()),
        "weights_sha256": _sha(json.dumps(weights, sort_keys=True).encode()),
        "n_weight_tensors": len(weights),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(ROOT / "src"), help="the source tree whose arcfold package trains")
    parser.add_argument("--input-dir", default=str(ROOT / "input"), help="where input/glyphs is (made if missing)")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(Path(args.src).resolve()), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="arcfold-digest-") as tmp:
        work = Path(tmp)
        cmd = [
            sys.executable, "-m", "arcfold", "train", "--config", str(ROOT / "configs" / "glyphs_arcface.yaml"),
            "--fold", "0", *OVERRIDES, f"data.input_dir={Path(args.input_dir).resolve()}",
            f"paths.folds_dir={work / 'folds'}", f"paths.oof_dir={work / 'oof'}", f"paths.models_dir={work / 'models'}",
        ]  # fmt: skip
        subprocess.run(cmd, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
        print(json.dumps(digest(work), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

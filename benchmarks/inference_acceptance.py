"""Issue 5 acceptance: re-ranking chosen on OOF, then inference.py on a held-out fold, offline, scored.

For each case below:

1. ``python -m arcfold rerank`` on the folds *other* than the holdout fold (nested over them), for the
   ``recognition`` task (vote + new-label threshold, MAP@5) and the ``retrieval`` task (MAP@R);
2. ``python -m arcfold holdout make`` on the holdout fold (a fifth of its classes made "new");
3. ``inference.py`` run the way a Kaggle notebook runs it: from another working directory, the code copied
   alone (``inference.py``, ``src/``, ``configs/``: no install), the weights copied and made read-only (and
   compared before/after, since root ignores permissions), the network cut by a ``sitecustomize`` that makes
   every socket connection fail; only the holdout fold's own model (``folds=[K]``: the other folds trained on
   these images), top5 and retrieval submissions, each with and without the chosen re-ranking;
4. ``python -m arcfold holdout score`` (the project's own metric functions).

Writes ``benchmarks/results/inference_acceptance.{json,md}``. Needs the trained experiments named below
(``oof/`` and ``models/``): ``bash train_fold.sh 0..1`` (glyphs) and the Omniglot r10 pair
(``bash train_fold.sh 0..3 configs/omniglot_r10_arcface.yaml``, the same for cosface, then
``python -m arcfold blend --experiments omniglot_r10_arcface omniglot_r10_cosface --name r10_arcface_cosface``).

    OMP_NUM_THREADS=1 python benchmarks/inference_acceptance.py [--cases glyphs omniglot]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

CASES = {
    "glyphs": {
        "source": ["--experiment", "glyphs_arcface"],
        "inference": ["experiment=glyphs_arcface"],
        "experiments": ["glyphs_arcface"],
        "holdout_experiment": "glyphs_arcface",
        "holdout_fold": 0,
        "rerank_folds": [1],
        "image_root": "input/glyphs",
        "spec": lambda task: REPO / "oof" / "glyphs_arcface" / f"rerank-{task}.json",
    },
    "omniglot": {
        "source": ["--blend", "oof/blends/r10_arcface_cosface.json"],
        "inference": ["experiment=null", f"blend={REPO / 'oof/blends/r10_arcface_cosface.json'}"],
        "experiments": ["omniglot_r10_arcface", "omniglot_r10_cosface"],
        "holdout_experiment": "omniglot_r10_arcface",
        "holdout_fold": 0,
        "rerank_folds": [1, 2, 3],
        "image_root": "input/omniglot",
        "spec": lambda task: REPO / "oof" / "blends" / f"r10_arcface_cosface.rerank-{task}.json",
    },
}

SITECUSTOMIZE = """import socket
def _offline(*args, **kwargs):
    raise OSError("network access attempted during the offline acceptance run")
socket.socket.connect = _offline
socket.create_connection = _offline
socket.getaddrinfo = _offline
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}")
    return result


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def acceptance(name: str, case: dict, work: Path, reuse: bool = False) -> dict:
    out: dict = {"case": name}
    # 1. re-ranking chosen on the other folds
    out["rerank"] = {}
    for task in ("recognition", "retrieval"):
        folds = [str(k) for k in case["rerank_folds"]]
        if not (reuse and case["spec"](task).is_file()):
            run([sys.executable, "-m", "arcfold", "rerank", *case["source"], "--task", task, "--folds", *folds,
                 "--force"], cwd=REPO)  # fmt: skip
        spec = json.loads(case["spec"](task).read_text())
        assert spec["folds"] == case["rerank_folds"] or spec["nesting"] == "class_halves", spec["folds"]
        spec["seconds_total"] = round(sum(m["seconds"] for m in spec["methods"].values()), 1)
        out["rerank"][task] = spec
    # 2. the holdout
    holdout = work / "holdout"
    run([sys.executable, "-m", "arcfold", "holdout", "make", "--experiment", case["holdout_experiment"],
         "--fold", str(case["holdout_fold"]), "--out", str(holdout)], cwd=REPO)  # fmt: skip
    out["holdout"] = json.loads((holdout / "holdout.json").read_text())
    # 3. inference.py offline, from elsewhere, code alone, weights read-only
    code = work / "arcfold-code"
    code.mkdir()
    shutil.copy(REPO / "inference.py", code)
    shutil.copytree(REPO / "src", code / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "configs", code / "configs")
    models = work / "arcfold-models"
    for exp in case["experiments"]:
        shutil.copytree(REPO / "models" / exp, models / exp, ignore=shutil.ignore_patterns("fold[0-9]", "*.lock"))
    for p in [models, *models.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    before = snapshot(models)
    site = work / "offline_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('pypi.org', 443))"],
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert probe.returncode != 0 and "offline acceptance run" in probe.stderr, "the network is not cut"
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    root = REPO / case["image_root"]
    out["runs"] = []
    for fmt in ("top5", "retrieval"):
        task = "retrieval" if fmt == "retrieval" else "recognition"
        for rerank in ("none", str(case["spec"](task))):
            sub_name = f"{name}_{fmt}_{'rerank' if rerank != 'none' else 'plain'}"
            # plain search still votes with the settings chosen on OOF for plain search (threshold included)
            plain_vote = out["rerank"]["recognition"]["methods"]["none"]["vote"]
            vote = [f"vote.{k}={v}" for k, v in plain_vote.items()] if rerank == "none" and fmt != "retrieval" else []
            command = [
                sys.executable, str(code / "inference.py"), "-c", str(code / "configs" / "inference" / "glyphs.yaml"),
                *case["inference"], f"models_dir={models}", f"folds=[{case['holdout_fold']}]", f"rerank={rerank}",
                f"query.csv={holdout / 'query.csv'}", f"gallery.csv={holdout / 'gallery.csv'}",
                f"query.image_root={root}", f"gallery.image_root={root}", f"submission.format={fmt}",
                f"submission.name={sub_name}", f"out_dir={elsewhere / 'submissions'}", "progress=false", *vote,
            ]  # fmt: skip
            started = time.perf_counter()
            result = run(command, cwd=elsewhere, env=env)
            seconds = time.perf_counter() - started
            assert f"arcfold from {code / 'src' / 'arcfold'}" in result.stderr
            scored = run([sys.executable, "-m", "arcfold", "holdout", "score", "--submission",
                          str(elsewhere / "submissions" / f"{sub_name}.csv"), "--holdout", str(holdout),
                          "--format", fmt], cwd=REPO)  # fmt: skip
            scores = json.loads(scored.stdout)
            steps = "none" if rerank == "none" else out["rerank"][task]["enabled"]
            out["runs"].append({"format": fmt, "rerank": steps, "seconds": round(seconds, 1), **scores})
            print(name, fmt, steps, scores, f"{seconds:.1f} s", flush=True)
    assert snapshot(models) == before, "the models folder changed"
    out["models_untouched"] = True
    return out


def render(results: list[dict]) -> str:
    from arcfold.experiments.rerank import render_rerank

    lines = [
        "# Inference acceptance (issue 5)",
        "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/inference_acceptance.py`, on "
        f"{platform.machine()} CPU ({os.cpu_count()} cores), no GPU. Re-ranking chosen on the folds other than the "
        "holdout fold; inference.py then runs offline from another directory, code alone, weights read-only, "
        "with the holdout fold's own model only, and its submission is scored by `arcfold holdout score`.",
        "",
    ]
    for r in results:
        h = r["holdout"]
        lines += [
            f"## {r['case']}",
            "",
            f"Holdout: fold {h['fold']} of `{h['experiment']}`: {h['n_query']} queries ({h['n_new_queries']} of "
            f"new classes), {h['n_gallery']} gallery images. Models folder unchanged: {r['models_untouched']}.",
            "",
            "| submission | re-ranking | MAP@5 (top5) | Recall@1 | Recall@5 | mAP@5 (retrieval) | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for run_ in r["runs"]:
            cells = [run_.get(k) for k in ("map@5", "recall@1", "recall@5", "map@5")]
            if run_["format"] == "retrieval":
                cells[0] = None
            else:
                cells[1:] = [None, None, None]
            text = " | ".join("—" if c is None else f"{c:.4f}" for c in cells)
            lines.append(f"| {run_['format']} | {run_['rerank']} | {text} | {run_['seconds']} |")
        lines.append("")
        for task in ("recognition", "retrieval"):
            table = render_rerank(r["rerank"][task]).replace("# Re-ranking on OOF", f"### Re-ranking on OOF ({task})")
            lines += [table, f"(rerank stage: {r['rerank'][task]['seconds_total']} s)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--reuse-rerank", action="store_true", help="use the rerank specs already written")
    args = parser.parse_args()
    results = []
    for name in args.cases:
        with tempfile.TemporaryDirectory(prefix=f"acceptance_{name}_") as tmp:
            results.append(acceptance(name, CASES[name], Path(tmp), reuse=args.reuse_rerank))
            for p in Path(tmp).rglob("*"):  # let the temporary folder be removed
                p.chmod(0o755)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference_acceptance.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / "inference_acceptance.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()

"""benchmarks/omniglot_errors.py: the test split's errors per alphabet and per confused pair, on a hand-made case
whose nearest neighbours are worked out in the comments."""

from __future__ import annotations

import importlib.util

import numpy as np

from arcfold.io import save_npz

from .conftest import REPO


def test_errors_per_alphabet_and_pair_on_a_hand_made_case(tmp_path):
    spec = importlib.util.spec_from_file_location("omniglot_errors", REPO / "benchmarks" / "omniglot_errors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    labels, groups, ids = np.array(["A", "A", "B", "B"]), np.array(["g1", "g1", "g2", "g2"]), np.array(list("0123"))
    # arcfold: 0 -> 1 (cos 0.994), 1 -> 0 (0.994 > 0.969 to 2), 2 -> 1 (0.969, an A: wrong), 3 -> 2 (0.351): 1 error
    arc = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0]], dtype=np.float32)
    # reference: each image's nearest neighbour is of the other class: 4 errors
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]], dtype=np.float32)
    save_npz(tmp_path / "arc" / "test.npz", ids=ids, fold0=arc)
    save_npz(tmp_path / "ref" / "fold0.npz", val=ref, test=ref)
    out = module.analyse(tmp_path / "arc", tmp_path / "ref", labels, groups, ids, top=3)
    assert out["errors"] == {"arcfold": 1, "reference": 4, "both": 1, "only_arcfold": 0, "only_reference": 3}
    assert out["per_group"] == {
        "g1": {"arcfold": 0, "reference": 2, "n": 2},
        "g2": {"arcfold": 1, "reference": 2, "n": 2},
    }
    # per character, arcfold's R@1 minus the reference's: A 2/2 = 1, B 1/2 = 0.5; a draw of two characters gives
    # 0.5 (B, B), 0.75 (A and B) or 1 (A, A), each end a quarter of 10,000 draws: the 95 % interval is [0.5, 1]
    assert out["difference_ci95"] == [0.5, 1.0]
    assert out["pairs"] == [{"pair": ["A", "B"], "arcfold": 1, "reference": 4}]
    assert "| 0 | all | 4 | 1 | 4 | 0.7500 | 0.0000 | +0.7500 |" in module.render({"command": "c", "seeds": {"0": out}})
    assert out["characters"] == {"A": [2, 2], "B": [2, 1]}  # [queries, reference errors - arcfold errors]

    # a second seed where arcfold's embeddings are the reference's: 4 errors each, no gain on either character
    save_npz(tmp_path / "arc1" / "test.npz", ids=ids, fold0=ref)
    other = module.analyse(tmp_path / "arc1", tmp_path / "ref", labels, groups, ids, top=3)
    both = module.pooled({"0": out, "1": other})
    assert both["recall@1"] == {"arcfold": 0.375, "reference": 0.0}  # (0.75 + 0) / 2, (0 + 0) / 2
    assert both["difference"] == 0.375 and np.isclose(both["difference_sd"], 0.75 / np.sqrt(2))
    # summed over the seeds: A 4 queries, gain 2; B 4 queries, gain 1. Two characters drawn: 0.5 (A, A), 0.375
    # (A and B), 0.25 (B, B), each end a quarter of the draws: the 95 % interval is [0.25, 0.5]
    assert both["difference_ci95"] == [0.25, 0.5]
    assert "difference **+0.3750**" in module.render({"command": "c", "seeds": {"0": out, "1": other}, "pooled": both})

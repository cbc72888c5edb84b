"""A finished fold's stored config against a new run: keys added to the config after the fold was trained."""

from __future__ import annotations

import pytest
import yaml

from arcfold.config import config_to_dict, load_config
from arcfold.errors import ArtifactExistsError
from arcfold.training.state import check_resume_config, check_same_experiment


def _cfg(tmp_path, *overrides: str):
    base = ["name=exp", f"paths.oof_dir={tmp_path / 'oof'}", f"paths.models_dir={tmp_path / 'm'}"]
    return load_config(None, [*base, *overrides])


def _stored_without(tmp_path, *keys: str):
    """``oof/exp/fold0.config.yaml`` as a version of arcfold without ``keys`` wrote it (the default config)."""
    cfg = _cfg(tmp_path)
    stored = config_to_dict(cfg)
    for key in keys:
        section, leaf = key.split(".")
        del stored[section][leaf]
    cfg.oof_dir.mkdir(parents=True)
    (cfg.oof_dir / "fold0.config.yaml").write_text(yaml.safe_dump(stored))
    return stored


def test_a_key_the_stored_config_lacks_counts_at_its_default(tmp_path):
    # a fold trained before model.output_stride existed ran with the backbone's own stride (the key's default):
    # setting it now changes the result, so it is another experiment, not "finished" (the old rule skipped the key)
    stored = _stored_without(tmp_path, "model.output_stride")
    with pytest.raises(ArtifactExistsError, match=r"model\.output_stride: None -> 16.*name=exp_output_stride16"):
        check_same_experiment(_cfg(tmp_path, "model.output_stride=16"), tmp_path / "own.yaml", force=False)
    with pytest.raises(ArtifactExistsError, match=r"model\.output_stride: None -> 16"):
        check_resume_config(stored, _cfg(tmp_path, "model.output_stride=16"), tmp_path / "last.pt")
    # at its default the run is the same experiment: accepted, also on resume (the old rule refused the resume)
    check_same_experiment(_cfg(tmp_path), tmp_path / "own.yaml", force=False)
    check_resume_config(stored, _cfg(tmp_path), tmp_path / "last.pt")


def test_a_changed_key_is_still_refused_and_a_neutral_one_accepted(tmp_path):
    _stored_without(tmp_path)
    with pytest.raises(ArtifactExistsError, match=r"train\.epochs: 10 -> 3"):
        check_same_experiment(_cfg(tmp_path, "train.epochs=3"), tmp_path / "own.yaml", force=False)
    check_same_experiment(_cfg(tmp_path, "train.progress=false"), tmp_path / "own.yaml", force=False)

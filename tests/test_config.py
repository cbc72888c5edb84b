from pathlib import Path

import pytest

from arcfold.config import config_from_dict, config_to_dict, load_config
from arcfold.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.epochs=3", "optim.lr=0.01", "model.pool=avg", "data.group_column=null"])
    assert cfg.train.epochs == 3
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.model.pool == "avg"
    assert cfg.data.group_column is None
    assert cfg.name == "default"


def test_base_chain_and_name_from_file(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 7\n  batch_size: 16\nmodel:\n  backbone: resnet34\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.batch_size=8"])
    # child beats base, command line beats both, untouched base keys survive
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.backbone) == (9, 8, "resnet34")
    assert cfg.name == "b"


def test_repo_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem
    omniglot = load_config(REPO / "configs" / "omniglot_arcface.yaml")
    assert (omniglot.model.backbone, omniglot.data.image_size, omniglot.model.embedding_size) == ("resnet18", 64, 512)
    assert (omniglot.head.name, omniglot.train.epochs, omniglot.folds.n_splits) == ("arcface", 10, 3)
    assert omniglot.folds.test_fraction == 0.25  # 2 of the 8 alphabets held out as the test split


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch' \(did you mean 'train.epochs'\?\)"):
        load_config(None, ["train.epoch=3"])
    (tmp_path / "bad.yaml").write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.backbon'"):
        load_config(tmp_path / "bad.yaml")


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="invalid value for 'train.epochs'"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="invalid value for 'train.resume'"):
        load_config(None, ["train.resume=maybe"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-0.1", "optim.lr"),
        ("train.amp=fp8", "train.amp='fp8' is not one of"),
        ("head.margin=28.6", "radians"),
        ("train.batch_size=1", "train.batch_size"),
        ("folds.n_splits=1", "folds.n_splits"),
        ("data.hflip=2", "data.hflip"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
        ("sampler.m_per_class=3", r"train.batch_size=64 must be a multiple of sampler.m_per_class=3"),
        ("data.skip_bad_images=sometimes", "invalid value for 'data.skip_bad_images'"),
    ],
)
def test_impossible_values_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_cosface_margins_are_checked_in_cosine_units_not_radians():
    """A CosFace margin is subtracted from a cosine (cos(theta) - m), so it is not bounded by pi; an ArcFace margin is
    an angle. (The old check applied the radians bound to both: cosface m=2.5 passed, m=3.2 gave 'radians'.)"""
    with pytest.raises(ConfigError, match=r"cosface is in cosine units and must be < 2 \(got 2.5"):
        load_config(None, ["head.name=cosface", "head.margin=2.5"])
    with pytest.raises(ConfigError, match="cosine units") as e:
        load_config(None, ["head.name=cosface", "head.margin=3.2"])
    assert "radians" not in str(e.value)
    assert load_config(None, ["head.name=cosface", "head.margin=0.35"]).head.margin == 0.35
    with pytest.raises(ConfigError, match="radians and must be < pi"):
        load_config(None, ["head.name=arcface", "head.margin=3.2"])
    assert load_config(None, ["head.name=arcface", "head.margin=2.5"]).head.margin == 2.5  # an angle: allowed


def test_amp_off_is_not_read_as_a_boolean(tmp_path):
    assert load_config(None, ["train.amp=off"]).train.amp == "off"  # YAML would make it False, then "False"
    (tmp_path / "c.yaml").write_text("train:\n  amp: off\n")
    assert load_config(tmp_path / "c.yaml").train.amp == "off"


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "loop.yaml")


def test_round_trip_through_plain_dict():
    cfg = load_config(None, ["model.neck=linear_bn", "train.epochs=2"])
    plain = config_to_dict(cfg)
    assert isinstance(plain["model"], dict)
    assert config_from_dict(plain) == cfg

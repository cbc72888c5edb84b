import numpy as np
import pytest
from PIL import Image

from arcfold.config import DataConfig
from arcfold.data.table import load_train_table
from arcfold.errors import DataValidationError


def _write_images(root, names, size=8):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size), 128, np.uint8)).save(root / name)


def _sop_like(tmp_path, rows):
    """A data set with SOP's column names: path,class_id,super_class_id."""
    data = tmp_path / "input" / "sop"
    data.mkdir(parents=True)
    (data / "train.csv").write_text("path,class_id,super_class_id,extra\n" + "\n".join(rows) + "\n")
    cfg = DataConfig(
        dataset="sop",
        input_dir=str(tmp_path / "input"),
        image_column="path",
        label_column="class_id",
        group_column="super_class_id",
    )
    return data, cfg


def test_custom_columns_map_to_the_standard_frame(tmp_path):
    data, cfg = _sop_like(tmp_path, ["a/1.png,10,1,x", "a/2.png,10,1,y", "b/3.png,NA,2,z"])
    _write_images(data, ["a/1.png", "a/2.png", "b/3.png"])
    df = load_train_table(cfg)
    assert list(df.columns) == ["id", "image", "label", "group", "extra"]
    assert df["label"].tolist() == ["10", "10", "NA"]  # "NA" is a real label, not a missing value
    assert df["group"].tolist() == ["1", "1", "2"]
    assert df["id"].tolist() == df["image"].tolist()


def test_missing_column_names_the_column_and_lists_what_exists(tmp_path):
    data, cfg = _sop_like(tmp_path, ["a/1.png,10,1,x"])
    cfg.label_column = "landmark_id"
    with pytest.raises(DataValidationError, match=r"column 'landmark_id' \(data.label_column\) is missing") as e:
        load_train_table(cfg)
    assert "'path', 'class_id', 'super_class_id', 'extra'" in str(e.value)
    assert "train.csv" in str(e.value)


def test_empty_labels_and_duplicates_name_row_line_and_column(tmp_path):
    data, cfg = _sop_like(tmp_path, ["a/1.png,10,1,x", "a/2.png, ,1,y", "a/1.png,11,1,z"])
    _write_images(data, ["a/1.png", "a/2.png"])
    with pytest.raises(DataValidationError) as e:
        load_train_table(cfg)
    message = str(e.value)
    assert "2 problem(s)" in message
    assert "row 1 (line 3), column 'class_id': empty label" in message
    assert "row 2 (line 4), column 'path': duplicate id 'a/1.png'" in message


def test_missing_and_unreadable_images_are_all_reported(tmp_path):
    data, cfg = _sop_like(tmp_path, ["a/1.png,10,1,x", "a/2.png,10,1,y", "a/3.jpg,11,1,z", "a/4.png,11,1,w"])
    _write_images(data, ["a/1.png", "a/4.png"])
    (data / "a" / "3.jpg").write_bytes(b"not an image at all")
    png = (data / "a" / "4.png").read_bytes()
    (data / "a" / "4.png").write_bytes(png[: len(png) // 2])  # truncated
    with pytest.raises(DataValidationError) as e:
        load_train_table(cfg)
    message = str(e.value)
    assert "3 problem(s)" in message
    assert "row 1 (line 3), column 'path': file not found" in message
    assert "row 2 (line 4), column 'path': cannot decode image" in message
    assert "row 3 (line 5), column 'path': cannot decode image" in message
    # "exists" mode skips decoding: only the missing file is a problem
    with pytest.raises(DataValidationError, match="1 problem"):
        load_train_table(cfg, check_images="exists")


def test_missing_csv_and_no_group_column(tmp_path):
    with pytest.raises(DataValidationError, match="file not found"):
        load_train_table(DataConfig(dataset="nothing", input_dir=str(tmp_path)))
    data, cfg = _sop_like(tmp_path, ["a/1.png,10,1,x"])
    _write_images(data, ["a/1.png"])
    cfg.group_column = None
    df = load_train_table(cfg)
    assert df["group"].tolist() == df["label"].tolist()  # no super-class: group by class


def test_the_table_check_accepts_16bit_and_transparent_pngs(tmp_path):
    root = tmp_path / "input" / "mini"
    root.mkdir(parents=True)
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(root / "a.png")
    Image.fromarray(np.dstack([np.zeros((2, 2), np.uint8), np.eye(2, dtype=np.uint8) * 255]), "LA").save(root / "b.png")
    (root / "train.csv").write_text("image,label\na.png,x\nb.png,y\n")
    cfg = DataConfig(dataset="mini", input_dir=str(tmp_path / "input"), group_column=None)
    assert load_train_table(cfg)["image"].tolist() == ["a.png", "b.png"]

"""A user's data: ImageFolder, .npz and data set names; deletion requests and their refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deepclean.deletion.userdata import (
    Preprocessing,
    class_indices,
    forget_digest,
    load_user_data,
    parse_normalize,
    read_forget_request,
    resolve_forget_ids,
)
from deepclean.errors import ConfigurationError, DataError, DataNotFoundError


def write_folder(root, classes=("cat", "dog", "eel"), per_class=4, size=8, mode="L", seed=0):
    """PNG files root/<class>/<k>.png with pixel value 10 * (class index) + k (mode L) or that value
    in the red channel (RGB); returns the expected pixel values by relative path."""
    values = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            v = 10 * c + k
            if mode == "L":
                img = Image.fromarray(np.full((size, size), v, dtype=np.uint8), mode="L")
            else:
                arr = np.zeros((size, size, 3), dtype=np.uint8)
                arr[..., 0] = v
                img = Image.fromarray(arr, mode="RGB")
            img.save(root / name / f"{k:02d}.png")
            values[f"{name}/{k:02d}.png"] = v
    return values


def test_image_folder_grayscale_in_unit_range_with_ids(tmp_path):
    values = write_folder(tmp_path / "train")
    data = load_user_data(tmp_path / "train", preprocessing=Preprocessing(grayscale=True))
    assert data.kind == "folder" and len(data) == 12 and data.classes == ("cat", "dog", "eel")
    assert data.x.shape == (12, 1, 8, 8) and data.x.dtype == torch.float32
    assert data.ids[0] == "cat/00.png" and data.ids[-1] == "eel/03.png"
    for i, sid in enumerate(data.ids):
        assert data.x[i].max().item() == pytest.approx(values[sid] / 255.0, abs=1e-6)
    assert data.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.in_channels == 1 and data.num_classes == 3


def test_image_folder_rgb_resize_and_normalize(tmp_path):
    write_folder(tmp_path / "train", mode="RGB", size=10)
    prep = Preprocessing(image_size=4, normalize=parse_normalize("0.5,0.25"))
    data = load_user_data(tmp_path / "train", preprocessing=prep)
    assert data.x.shape == (12, 3, 4, 4)
    # green channel is 0 everywhere: (0 - 0.5) / 0.25 = -2
    assert torch.allclose(data.x[:, 1], torch.full((12, 4, 4), -2.0))
    assert data.describe()["preprocessing"]["normalize"] == {"mean": [0.5], "std": [0.25]}


def test_holdout_folder_labels_follow_training_class_names(tmp_path):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "hold", classes=("dog", "eel"), per_class=2)  # no 'cat'
    train = load_user_data(tmp_path / "train")
    hold = load_user_data(tmp_path / "hold", classes=train.classes)
    assert hold.y.tolist() == [1, 1, 2, 2]  # dog=1, eel=2 as in the training data
    write_folder(tmp_path / "other", classes=("cat", "fox"), per_class=1)
    with pytest.raises(DataError, match="'fox'"):
        load_user_data(tmp_path / "other", classes=train.classes)


def test_image_folder_of_different_sizes_is_refused_with_the_fix(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "d" / "a" / "1.png")
    Image.new("L", (9, 9)).save(tmp_path / "d" / "a" / "2.png")
    with pytest.raises(DataError, match="--image-size"):
        load_user_data(tmp_path / "d")
    assert load_user_data(tmp_path / "d", preprocessing=Preprocessing(image_size=8)).x.shape == \
        (2, 3, 8, 8)


def test_npz_uint8_nhw_and_float_nhwc(tmp_path):
    x = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    data = load_user_data(tmp_path / "a.npz")
    assert data.kind == "npz" and data.x.shape == (5, 1, 4, 4) and data.ids is None
    assert data.x[0, 0, 0, 1].item() == pytest.approx(1 / 255)
    assert data.classes == ("0", "1", "2")
    xf = np.random.default_rng(0).random((3, 6, 6, 3)).astype(np.float32)
    np.savez(tmp_path / "b.npz", x=xf, y=np.array([0, 1, 1]))
    data = load_user_data(tmp_path / "b.npz")
    assert data.x.shape == (3, 3, 6, 6)
    assert data.x[1, 2, 4, 5].item() == pytest.approx(float(xf[1, 4, 5, 2]))


def test_npz_refusals(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 3)), y=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match=r"expected 'x'"):
        load_user_data(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 3)), y=np.zeros(2))
    with pytest.raises(DataError, match="integer class labels"):
        load_user_data(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3)), y=np.zeros(3, dtype=int))
    with pytest.raises(DataError, match="2 rows and y 3"):
        load_user_data(tmp_path / "c.npz")
    with pytest.raises(ConfigurationError, match="only to image folders"):
        load_user_data(tmp_path / "c.npz", preprocessing=Preprocessing(grayscale=True))
    with pytest.raises(DataNotFoundError):
        load_user_data(tmp_path / "missing.npz")
    with pytest.raises(DataNotFoundError, match="neither an existing folder"):
        load_user_data(tmp_path / "nowhere")


def test_dataset_name_train_and_test_split():
    train = load_user_data("digits")
    test = load_user_data("digits:test")
    assert (len(train), len(test)) == (1497, 300)
    assert train.x.shape[1:] == (1, 8, 8) and train.num_classes == 10
    with pytest.raises(ConfigurationError, match="already normalised"):
        load_user_data("digits", preprocessing=Preprocessing(grayscale=True))
    with pytest.raises(ConfigurationError, match="digits:test"):
        load_user_data("digits:val")


def test_parse_normalize():
    assert parse_normalize("0.1,0.2,0.3,1,2,3") == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    for bad in ("0.5", "a,b", "0.5,0"):
        with pytest.raises(ConfigurationError):
            parse_normalize(bad)


@pytest.fixture
def folder(tmp_path):
    write_folder(tmp_path / "train")
    return load_user_data(tmp_path / "train")


def test_request_by_paths_lines_json_csv(folder, tmp_path):
    (tmp_path / "r.txt").write_text("# two images\ndog/01.png\n\n./eel/03.png\n")
    assert read_forget_request(tmp_path / "r.txt", folder) == [5, 11]
    (tmp_path / "c.txt").write_text("dog/01.png   # user 17\r\n7 #row\n  # only a comment\n")
    assert read_forget_request(tmp_path / "c.txt", folder) == [5, 7]  # dog/01.png is row 5
    (tmp_path / "r.json").write_text(json.dumps(["eel/00.png", 2]))
    assert read_forget_request(tmp_path / "r.json", folder) == [8, 2]
    (tmp_path / "r.csv").write_text("user,path\nu1,cat/03.png\nu2,dog/00.png\n")
    assert read_forget_request(tmp_path / "r.csv", folder) == [3, 4]
    (tmp_path / "plain.csv").write_text("7\n1\n")
    assert read_forget_request(tmp_path / "plain.csv", folder) == [7, 1]
    absolute = str((tmp_path / "train" / "cat" / "01.png").resolve())
    assert resolve_forget_ids([absolute], folder) == [1]


def test_one_sample_is_a_valid_request(folder, tmp_path):
    (tmp_path / "one.txt").write_text("4\n")
    assert read_forget_request(tmp_path / "one.txt", folder) == [4]


def test_unknown_paths_are_refused_naming_the_first_few(folder):
    wanted = [f"cow/{k}.png" for k in range(7)] + ["cat/00.png"]
    with pytest.raises(DataError) as err:
        resolve_forget_ids(wanted, folder)
    msg = str(err.value)
    assert "7 entries not in" in msg and "'cow/0.png'" in msg and "'cow/4.png'" in msg
    assert "'cow/5.png'" not in msg and "(and 2 more)" in msg and "'cat/00.png'" in msg


def test_out_of_range_and_duplicates_are_refused(folder):
    with pytest.raises(DataError, match=r"2 index\(es\) out of range: 12, -1; expected indices "
                                        r"from 0 to 11"):
        resolve_forget_ids([0, 12, -1], folder)
    with pytest.raises(DataError, match=r"1 duplicate entry: 'dog/00.png'"):
        resolve_forget_ids(["dog/00.png", 4], folder)
    with pytest.raises(DataError, match="is empty"):
        resolve_forget_ids([], folder)
    with pytest.raises(DataError, match="all 12 samples"):
        resolve_forget_ids(list(range(12)), folder)


def test_paths_for_data_without_paths_are_refused(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 2), dtype=np.float32), y=np.array([0, 1, 0, 1]))
    data = load_user_data(tmp_path / "a.npz")
    with pytest.raises(DataError, match="row indices 0 to 3"):
        resolve_forget_ids(["cat/00.png"], data)


def test_bad_request_files(folder, tmp_path):
    with pytest.raises(DataNotFoundError):
        read_forget_request(tmp_path / "none.txt", folder)
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(DataError, match="not valid JSON"):
        read_forget_request(tmp_path / "bad.json", folder)
    (tmp_path / "bad2.json").write_text("[1.5]")
    with pytest.raises(DataError, match="integers or path strings"):
        read_forget_request(tmp_path / "bad2.json", folder)


def test_forget_class(folder):
    assert class_indices(folder, "dog") == [4, 5, 6, 7]
    assert class_indices(folder, "2") == [8, 9, 10, 11]
    with pytest.raises(DataError, match="no such class"):
        class_indices(folder, "cow")


def test_forget_digest_depends_on_the_set_not_the_order(folder):
    a, b = forget_digest([5, 1], folder), forget_digest([1, 5], folder)
    assert a == b and set(a) == {"indices_sha256", "paths_sha256", "samples_sha256"}
    assert forget_digest([1, 6], folder)["samples_sha256"] != a["samples_sha256"]

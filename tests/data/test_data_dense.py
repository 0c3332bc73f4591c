"""NYUv2 / Cityscapes loaders on fixtures written in the real preprocessed .npy layout."""

import shutil

import numpy as np
import pytest
import torch

import mtlens  # noqa: F401
from mtlens.data import make_cityscapes_datasets, make_nyuv2_datasets
from mtlens.data.fixtures import write_cityscapes_fixture, write_nyuv2_fixture
from mtlens.data.transforms import random_hflip, random_scale_crop
from mtlens.errors import DataError


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nyuv2")
    write_nyuv2_fixture(root, n_train=5, n_test=2, size=(288, 384))
    return root


def test_nyuv2_real_layout_splits_and_shapes(nyu_root):
    ds = make_nyuv2_datasets(nyu_root, augment=False)
    # "val" folder is the papers' test split; validation is carved from train (10 %, at least 1).
    assert {k: len(v) for k, v in ds.items()} == {"train": 4, "val": 1, "test": 2}
    assert set(ds["train"].ids).isdisjoint(ds["val"].ids)
    assert sorted(ds["train"].ids + ds["val"].ids) == list(range(5))
    s = ds["test"][1]
    assert s["input"].shape == (3, 288, 384) and s["input"].dtype == torch.float32
    t = s["targets"]
    assert set(t) == {"segmentation", "depth", "normal"}
    assert t["segmentation"].shape == (288, 384) and t["segmentation"].dtype == torch.int64
    assert t["depth"].shape == (1, 288, 384) and t["normal"].shape == (3, 288, 384)
    raw = np.load(nyu_root / "val" / "depth" / "1.npy")
    assert torch.equal(t["depth"][0], torch.from_numpy(raw[..., 0]))
    assert int(t["segmentation"].min()) >= -1 and int(t["segmentation"].max()) <= 12
    # The carved split does not depend on the run seed, only on split_seed.
    again = make_nyuv2_datasets(nyu_root, seed=7, augment=False)
    assert again["val"].ids == ds["val"].ids
    other = make_nyuv2_datasets(nyu_root, augment=False, split_seed=3, val_fraction=0.4)
    assert len(other["val"]) == 2


def test_nyuv2_augmented_train_keeps_shapes_and_units(nyu_root):
    ds = make_nyuv2_datasets(nyu_root, augment=True)
    assert ds["train"].augment and not ds["val"].augment and not ds["test"].augment
    s = ds["train"][0]
    assert s["input"].shape == (3, 288, 384)
    n = s["targets"]["normal"]
    norms = n.norm(dim=0)
    assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5)


def test_scale_crop_divides_depth_by_scale_and_flip_negates_normal_x():
    H, W = 12, 16
    img = torch.rand(3, H, W)
    seg = torch.randint(0, 5, (H, W))
    depth = torch.full((1, H, W), 3.0)
    normal = torch.nn.functional.normalize(torch.randn(3, H, W), dim=0)
    kinds = {"segmentation": "segmentation", "depth": "depth", "normal": "normal"}
    targets = {"segmentation": seg, "depth": depth, "normal": normal}
    im2, t2 = random_scale_crop(img, targets, kinds, scales=(1.5,))
    assert im2.shape == img.shape and t2["depth"].shape == depth.shape
    assert torch.allclose(t2["depth"], torch.full_like(depth, 2.0))
    assert set(t2["segmentation"].unique().tolist()) <= set(seg.unique().tolist())
    assert t2["segmentation"].dtype == torch.int64
    assert torch.allclose(t2["normal"].norm(dim=0), torch.ones(H, W), atol=1e-5)
    im3, t3 = random_hflip(img, targets, kinds, p=1.0)
    assert torch.equal(im3, img.flip(-1))
    assert torch.equal(t3["normal"][0], -normal[0].flip(-1))
    assert torch.equal(t3["normal"][1:], normal[1:].flip(-1))
    assert torch.equal(t3["segmentation"], seg.flip(-1))
    _, t4 = random_hflip(img, targets, kinds, p=0.0)
    assert t4["normal"] is normal


def test_nyuv2_missing_folder_names_layout(tmp_path):
    write_nyuv2_fixture(tmp_path, n_train=2, n_test=1, size=(8, 8))
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError) as e:
        make_nyuv2_datasets(tmp_path, check_size=False)
    msg = str(e.value)
    assert "val" in msg and "Expected layout" in msg and "normal/{i}.npy" in msg


def test_nyuv2_malformed_files_raise(tmp_path):
    write_nyuv2_fixture(tmp_path, n_train=3, n_test=1, size=(288, 384))
    np.save(tmp_path / "train" / "depth" / "0.npy", np.zeros((288, 384, 2), np.float32))
    with pytest.raises(DataError, match="depth of shape"):
        make_nyuv2_datasets(tmp_path)
    write_nyuv2_fixture(tmp_path, n_train=3, n_test=1, size=(288, 384))
    (tmp_path / "train" / "label" / "1.npy").write_bytes(b"not an array")
    ds = make_nyuv2_datasets(tmp_path, augment=False)
    with pytest.raises(DataError, match="not a readable .npy"):
        for i in range(len(ds["train"])):
            ds["train"][i]
        ds["val"][0]
    (tmp_path / "train" / "normal" / "2.npy").unlink()
    with pytest.raises(DataError, match="same sample numbers"):
        make_nyuv2_datasets(tmp_path)
    write_nyuv2_fixture(tmp_path, n_train=3, n_test=1, size=(100, 100))
    with pytest.raises(DataError, match="expected 288×384"):
        make_nyuv2_datasets(tmp_path)


def test_nyuv2_label_out_of_range(tmp_path):
    write_nyuv2_fixture(tmp_path, n_train=2, n_test=1, size=(8, 8))
    np.save(tmp_path / "train" / "label" / "0.npy", np.full((8, 8), 13.0, np.float32))
    with pytest.raises(DataError, match="label values"):
        make_nyuv2_datasets(tmp_path, check_size=False)


def test_cityscapes_layout_and_label7_alias(tmp_path):
    write_cityscapes_fixture(tmp_path, n_train=10, n_test=2, size=(128, 256), label_dir="label_7")
    with pytest.raises(DataError, match="label_7"):
        make_cityscapes_datasets(tmp_path)  # error names the alias in the printed layout
    ds = make_cityscapes_datasets(tmp_path, label_dir="label_7")
    assert {k: len(v) for k, v in ds.items()} == {"train": 9, "val": 1, "test": 2}
    s = ds["train"][3]
    assert set(s["targets"]) == {"segmentation", "depth"}
    assert s["input"].shape == (3, 128, 256) and s["targets"]["depth"].shape == (1, 128, 256)
    assert int(s["targets"]["segmentation"].max()) <= 6


def _resize_sample(root, split, i, size):
    H, W = size
    np.save(root / split / "image" / f"{i}.npy", np.zeros((H, W, 3), np.float32))
    np.save(root / split / "label" / f"{i}.npy", np.zeros((H, W), np.float32))
    np.save(root / split / "depth" / f"{i}.npy", np.ones((H, W, 1), np.float32))
    np.save(root / split / "normal" / f"{i}.npy", np.ones((H, W, 3), np.float32) / np.sqrt(3))


def test_size_checking_off_still_rejects_one_sample_of_another_size_with_its_file(tmp_path):
    write_nyuv2_fixture(tmp_path, n_train=2, n_test=4, size=(8, 8))
    _resize_sample(tmp_path, "val", 2, (10, 8))
    ds = make_nyuv2_datasets(tmp_path, check_size=False, augment=False)
    loader = torch.utils.data.DataLoader(ds["test"], batch_size=4)
    with pytest.raises(DataError, match=r"val/image/2\.npy: image of size 10×8, but .*/0\.npy is 8×8"):
        for _ in loader:  # not a RuntimeError from inside default_collate
            pass


def test_fractional_class_ids_are_refused_not_truncated(tmp_path):
    write_nyuv2_fixture(tmp_path, n_train=2, n_test=2, size=(8, 8))
    lab = np.load(tmp_path / "val" / "label" / "1.npy")
    lab[3, 4] = 2.7
    np.save(tmp_path / "val" / "label" / "1.npy", lab)
    ds = make_nyuv2_datasets(tmp_path, check_size=False, augment=False)
    with pytest.raises(DataError, match=r"val/label/1\.npy: label value 2\.7 at \(3, 4\) is not an integer class id"):
        ds["test"][1]
    lab[3, 4] = np.nan
    np.save(tmp_path / "val" / "label" / "1.npy", lab)
    with pytest.raises(DataError, match="label value nan .*not an integer class id"):
        ds["test"][1]
    lab[3, 4] = 2.0  # whole numbers stored as floats (as the releases do) are fine
    np.save(tmp_path / "val" / "label" / "1.npy", lab)
    assert int(ds["test"][1]["targets"]["segmentation"][3, 4]) == 2

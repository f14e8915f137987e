import pickle

import pytest
import torch
from fake_datasets import make_cifar10, make_fashion_mnist, make_image_folder

from blendq.data import DataError, FolderLoader, ImageFolder, TensorLoader, load_dataset, read_idx


def test_digits_bundled():
    spec = load_dataset("digits")
    assert spec.train_images.shape[1:] == (1, 8, 8) and spec.num_classes == 10
    assert len(spec.train_labels) + len(spec.test_labels) == 1797


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx(tmp_path, compress):
    make_fashion_mnist(tmp_path, 20, 10, compress)
    spec = load_dataset(str(tmp_path))
    assert spec.name == "fashion-mnist"
    assert spec.train_images.shape == (20, 1, 28, 28) and spec.test_labels.shape == (10,)
    assert spec.train_labels.dtype == torch.long


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match="bad magic"):
        read_idx(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="truncated"):
        read_idx(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)


def test_cifar10_batches(tmp_path):
    make_cifar10(tmp_path, per_batch=8)
    spec = load_dataset("cifar10", tmp_path)
    assert spec.train_images.shape == (40, 3, 32, 32) and spec.test_images.shape == (8, 3, 32, 32)
    assert spec.augment


def test_cifar10_missing_says_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match="make_cifar10_batches.py"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_refuses_code_in_pickle(tmp_path):
    make_cifar10(tmp_path, per_batch=2)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": print}, f)  # a callable: must not be resolved
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", tmp_path)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset("nope")


def test_image_folder(tmp_path):
    make_image_folder(tmp_path)
    spec = load_dataset(str(tmp_path))
    assert spec.num_classes == 3 and spec.folder == tmp_path
    train = ImageFolder(tmp_path / "train", 32, train=True)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y == 0
    loader = FolderLoader(train, batch_size=4, shuffle=True, rank=1, world_size=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 2 and batches[0][0].shape == (4, 3, 32, 32)
    val = ImageFolder(tmp_path / "val", 32, train=False)
    torch.testing.assert_close(val[1][0], val[1][0])  # deterministic


def test_image_folder_layout_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="needs val/"):
        load_dataset(str(tmp_path))
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("imagenet")


def test_tensor_loader_shards_and_is_deterministic():
    x, y = torch.arange(20.0).view(20, 1, 1, 1).expand(20, 1, 4, 4), torch.arange(20)
    a = TensorLoader(x, y, 3, shuffle=True, seed=1, rank=0, world_size=2)
    b = TensorLoader(x, y, 3, shuffle=True, seed=1, rank=1, world_size=2)
    ya = torch.cat([t for _, t in a])
    yb = torch.cat([t for _, t in b])
    sa, sb = set(ya.tolist()), set(yb.tolist())
    assert len(sa | sb) == 20 and not sa & sb
    assert torch.equal(ya, torch.cat([t for _, t in a]))  # same epoch, same order
    a.set_epoch(1)
    assert not torch.equal(ya, torch.cat([t for _, t in a]))


def test_crop_flip_augmentation_keeps_shape():
    x = torch.randn(8, 3, 32, 32)
    loader = TensorLoader(x, torch.zeros(8, dtype=torch.long), 8, augment=True)
    (out, _), = list(loader)
    assert out.shape == x.shape and not torch.equal(out, x)

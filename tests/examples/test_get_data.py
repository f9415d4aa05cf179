"""Image sources: digits split, CIFAR-10 pickle batches (a tiny fake), image folders, clear errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from examples.get_distillation import data


def test_digits_split_is_fixed_disjoint_and_in_range():
    train, test = data.load_digits("train"), data.load_digits("test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.min() == -1 and train.images.max() == 1 and train.num_classes == 10
    assert set(test.labels.tolist()) == set(range(10))
    # disjoint: no held-out image appears in train (digits has no exact duplicates across the split)
    flat_train = {tuple(x) for x in train.images.flatten(1).tolist()}
    assert sum(tuple(x) in flat_train for x in test.images.flatten(1).tolist()) == 0
    assert torch.equal(data.load_digits("train").images, train.images)


def _write_fake_cifar(root, n_per_batch=4, names=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    arrays = {}
    for name in names or [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.randint(0, 256, size=(n_per_batch, 3072)).astype(np.uint8)
        labels = rng.randint(0, 10, size=n_per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": pixels,
                 b"filenames": [f"img{k}.png".encode() for k in range(n_per_batch)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        arrays[name] = (pixels, labels)
    return arrays


def test_cifar10_reads_the_pickle_batch_format(tmp_path):
    arrays = _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    train = data.load_cifar10(tmp_path, "train")  # the parent folder works too
    test = data.load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    pixels, labels = arrays["test_batch"]
    expected = pixels.reshape(4, 3, 32, 32).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(test.images.numpy(), expected, rtol=0, atol=1e-6)
    assert test.labels.tolist() == labels
    assert -1 <= train.images.min() and train.images.max() <= 1


def test_cifar10_errors_say_what_was_expected_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.load_cifar10(tmp_path / "nowhere")
    _write_fake_cifar(tmp_path / "c", names=["data_batch_1", "test_batch"])
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        data.load_cifar10(tmp_path / "c", "train")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"uint8 \(N, 3072\)"):
        data.load_cifar10(tmp_path / "c", "test")
    with pytest.raises(ValueError, match="split"):
        data.load_cifar10(tmp_path / "c", "valid")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_unpickler_refuses_arbitrary_code(tmp_path):
    folder = tmp_path / "c"
    _write_fake_cifar(folder, names=["data_batch_1"])
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="posix.getcwd|os.getcwd|refusing"):
        data.load_cifar10(folder, "test")


def _png(path, color, size=(5, 7)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_with_class_subfolders_and_flat(tmp_path):
    _png(tmp_path / "cats" / "a.png", (255, 0, 0))
    _png(tmp_path / "cats" / "b.png", (255, 0, 0))
    _png(tmp_path / "dogs" / "c.PNG", (0, 0, 255))
    out = data.load_image_folder(tmp_path, size=4)
    assert out.images.shape == (3, 3, 4, 4) and out.num_classes == 2
    assert out.labels.tolist() == [0, 0, 1]
    torch.testing.assert_close(out.images[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    gray = data.load_image_folder(tmp_path / "dogs", size=6, channels=1)
    assert gray.images.shape == (1, 1, 6, 6) and gray.num_classes == 1 and gray.labels.tolist() == [0]


def test_image_folder_and_dispatch_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        data.load_image_folder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        data.load_image_folder(tmp_path / "empty", 8)
    with pytest.raises(ValueError, match="channels"):
        data.load_image_folder(tmp_path / "empty", 8, channels=2)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.get_dataset("mnist")
    with pytest.raises(ValueError, match="needs a root"):
        data.get_dataset("cifar10")
    assert data.get_dataset("digits", split="test").images.shape[0] == 360

import os
import pickle

import numpy as np
import pytest

from qnn.data import (iterate_batches, load_cifar10, load_dataset, load_image_folder, safe_unpickle,
                      synthetic_dataset)
from qnn.errors import QNNError
from tests.conftest import SHARED


def test_synthetic_is_deterministic_and_balanced():
    a, b = synthetic_dataset(300, seed=3), synthetic_dataset(300, seed=3)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, synthetic_dataset(300, seed=4).x)
    assert a.x.shape == (300, 32, 32, 3) and a.x.dtype == np.uint8
    assert set(np.unique(a.y)) == set(range(10))


def _write_batches(d, n=20):
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        obj = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (d / name).write_bytes(pickle.dumps(obj))


def test_cifar_python_batches_load(tmp_path):
    _write_batches(tmp_path / "cifar-10-batches-py")
    tr = load_cifar10(tmp_path, "train")
    te = load_cifar10(tmp_path, "test")
    assert tr.x.shape == (100, 32, 32, 3) and te.x.shape == (20, 32, 32, 3)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    with pytest.raises(QNNError, match="refusing pickle"):
        safe_unpickle(pickle.dumps({b"data": _Evil(), b"labels": [1]}))
    d = tmp_path / "cifar-10-batches-py"
    _write_batches(d)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [1]}))
    with pytest.raises(QNNError, match="refusing pickle"):
        load_cifar10(tmp_path, "test")


def test_missing_and_empty_data_dir(tmp_path):
    with pytest.raises(QNNError, match="not found"):
        load_cifar10(tmp_path / "nope", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QNNError, match="empty"):
        load_cifar10(tmp_path / "empty", "test")
    with pytest.raises(QNNError, match="empty"):
        load_image_folder(tmp_path / "empty")


def test_image_folder(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_image_folder(tmp_path, size=24)
    assert ds.x.shape == (6, 24, 24, 3) and ds.classes == ("cat", "dog")


def test_batches_augment_and_bad_batch_size():
    ds = synthetic_dataset(50)
    xb, yb = next(iterate_batches(ds, 16, shuffle=True, aug=True, seed=1))
    assert xb.shape == (16, 3, 32, 32) and 0 <= float(xb.min()) and float(xb.max()) <= 1
    x2, _ = next(iterate_batches(ds, 16, shuffle=True, aug=True, seed=1))
    assert (xb == x2).all()
    with pytest.raises(QNNError):
        next(iterate_batches(ds, 0, False, False))


def test_unknown_dataset():
    with pytest.raises(QNNError, match="unknown dataset"):
        load_dataset("mnist", "train")


@pytest.mark.skipif(not (SHARED / "cifar10" / "test.npz").is_file(), reason="needs ../shared/data")
def test_shared_cifar_npz_layout():
    te = load_cifar10(SHARED / "cifar10", "test")
    assert te.x.shape == (10000, 32, 32, 3)
    assert list(te.y[:10]) == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]

import hashlib
import os
import pickle

import numpy as np
import pytest

from qnn.data import (check_data_fits, iterate_batches, load_cifar10, load_dataset, load_image_folder, safe_unpickle,
                      synthetic_dataset)
from qnn.errors import QNNError
from tests.conftest import ROOT, SHARED

GRAY = f"{ROOT / 'tests' / 'qnn' / 'user_models.py'}:grayscale_28"


def test_synthetic_is_deterministic_and_balanced():
    a, b = synthetic_dataset(300, seed=3), synthetic_dataset(300, seed=3)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, synthetic_dataset(300, seed=4).x)
    assert a.x.shape == (300, 32, 32, 3) and a.x.dtype == np.uint8
    assert set(np.unique(a.y)) == set(range(10))
    # the default set is the one earlier versions made, image for image: their results and checkpoints still hold
    assert hashlib.sha256(a.x.tobytes() + a.y.tobytes()).hexdigest()[:16] == "ee1b59bf6c10793e"


def test_synthetic_set_takes_channels_size_and_classes():
    g = synthetic_dataset(60, seed=1, size=28, channels=1, num_classes=4)
    assert g.x.shape == (60, 28, 28, 1) and g.classes == ("class0", "class1", "class2", "class3")
    assert set(np.unique(g.y)) == set(range(4)) and g.x.std() > 20
    for kw, msg in (({"channels": 2}, "1 \\(grayscale\\) or 3"), ({"num_classes": 1}, "num_classes"),
                    ({"size": 0}, "size")):
        with pytest.raises(QNNError, match=msg):
            synthetic_dataset(8, **kw)


def test_data_is_made_to_fit_the_model_and_refused_when_it_does_not(tmp_path):
    from PIL import Image

    from qnn.models import create_model
    from qnn.models.quantized import IMAGENET_MEAN, IMAGENET_STD

    gray = create_model(GRAY, num_classes=4, in_size=28)
    assert gray.in_channels == 1 and (gray.mean, gray.std) == ((0.5,), (0.5,))
    rgb = create_model("small_cnn")
    assert rgb.in_channels == 3 and (rgb.mean, rgb.std) == (IMAGENET_MEAN, IMAGENET_STD)  # as before (checkpoints)
    ds = load_dataset("synthetic", "test", n_synthetic=40, like=gray)
    assert ds.x.shape == (40, 28, 28, 1) and len(ds.classes) == 4
    check_data_fits(gray, ds)
    with pytest.raises(QNNError, match=r"^test set: images have 3 channels \(RGB\), the model's first conv takes 1 "):
        check_data_fits(gray, load_dataset("synthetic", "test", n_synthetic=40, image_size=28, num_classes=4), "test set")
    for c in ("cat", "dog"):  # RGB files, read as the model's grayscale at its size
        (tmp_path / c).mkdir()
        Image.fromarray(np.full((40, 50, 3), (200, 100, 50), np.uint8)).save(tmp_path / c / "0.png")
    f = load_dataset("imagefolder", "test", str(tmp_path), like=gray)
    assert f.x.shape == (2, 28, 28, 1) and int(f.x[0, 0, 0, 0]) == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)


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
    assert load_image_folder(tmp_path, size=24, channels=1).x.shape == (6, 24, 24, 1)


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

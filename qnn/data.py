"""Datasets without torchvision: CIFAR-10 (shared npz layout or `cifar-10-batches-py`), ImageFolder (Pillow),
and an embedded synthetic set generated from a seed. Batches are float NCHW in [0, 1]; augmentation (random crop
with padding, horizontal flip) runs on whole batches in plain torch.

Data fits the model: the synthetic set is made, and ImageFolder images are read, with the model's input channels
(1 grayscale, 3 RGB), image side and (synthetic) classes (`load_dataset(..., like=model)`); CIFAR-10 is what it is.
`check_data_fits` refuses, in one line, data the model cannot take.
"""

from __future__ import annotations

import functools

import hashlib
import io
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from qnn.errors import QNNError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the dataset's page
DATASETS = ("synthetic", "cifar10", "imagefolder")
CHANNELS = {1: "grayscale", 3: "RGB"}  # image channels the loaders make and read
DEFAULT_SIZE = {"synthetic": 32, "cifar10": 32, "imagefolder": 224}  # image side when neither model nor option says


@dataclass
class ArrayDataset:
    """Images as uint8 NHWC (1 channel: grayscale, 3: RGB) plus int64 labels."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.shape[-1] not in CHANNELS or self.x.dtype != np.uint8:
            raise QNNError(f"images must be uint8 NHWC with 1 (grayscale) or 3 (RGB) channels, got {self.x.dtype} "
                           f"{self.x.shape}")
        y = np.asarray(self.y)
        if y.ndim != 1 or y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
            raise QNNError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(self.x) != len(y):
            raise QNNError(f"{len(self.x)} images but {len(y)} labels")
        if len(self.x) == 0:
            raise QNNError("dataset is empty")
        if y.min() < 0 or y.max() >= len(self.classes):
            raise QNNError(f"labels must be in 0..{len(self.classes) - 1} ({len(self.classes)} classes), "
                           f"found {int(y.min())}..{int(y.max())}")
        self.y = y.astype(np.int64)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def channels(self) -> int:
        return int(self.x.shape[-1])

    def subset(self, n: int | None, start: int = 0) -> "ArrayDataset":
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or start < 0:
            raise QNNError(f"subset size must be a positive integer, got {n!r}")
        if start + n > len(self):  # a silent cut would report figures on fewer images than asked for
            raise QNNError(f"{n} images asked for{f' from image {start} on' if start else ''}, but the set has "
                           f"{len(self)}; ask for at most {len(self) - start}")
        return ArrayDataset(self.x[start:start + n], self.y[start:start + n], self.classes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensor(self.x), torch.as_tensor(self.y, dtype=torch.long)


def check_data_fits(model, ds: ArrayDataset, what: str = "data") -> None:
    """The images have the channels and size the model takes, and every label is one of the model's classes."""
    ch = getattr(model, "in_channels", None)
    if ch is not None and ds.channels != ch:
        raise QNNError(f"{what}: images have {_channels(ds.channels)}, the model's first conv takes {_channels(ch)}"
                       + ("; the synthetic set and ImageFolder are made to the model's channels" if ch in CHANNELS
                          else ""))
    size = getattr(model, "in_size", None)
    if size is not None and tuple(ds.x.shape[1:3]) != (size, size):
        raise QNNError(f"{what}: images are {ds.x.shape[1]}x{ds.x.shape[2]}, the model takes {size}x{size}")
    n_cls = getattr(model, "num_classes", None)
    if n_cls is not None and int(ds.y.max()) >= n_cls:
        raise QNNError(f"{what}: label {int(ds.y.max())} is outside the model's {n_cls} classes")


def _channels(c: int) -> str:
    return f"{c} channel{'s' if c != 1 else ''}" + (f" ({CHANNELS[c]})" if c in CHANNELS else "")


def to_tensor(x_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_uint8)).permute(0, 3, 1, 2).float().div_(255.0)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip, on a whole batch (one offset per image)."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = _crop(xp, dy, dx, h, w)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def _crop(xp: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n = xp.shape[0]
    iy = (dy[:, None] + torch.arange(h)[None])  # n,h
    ix = (dx[:, None] + torch.arange(w)[None])  # n,w
    b = torch.arange(n)[:, None, None]
    return xp.permute(0, 2, 3, 1)[b, iy[:, :, None], ix[:, None, :]].permute(0, 3, 1, 2).contiguous()


def iterate_batches(ds: ArrayDataset, batch_size: int, shuffle: bool, aug: bool, seed: int = 0, epoch: int = 0,
                    rank: int = 0, world: int = 1, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic batches for (seed, epoch); with world>1 each rank takes a disjoint shard of equal size."""
    if batch_size <= 0:
        raise QNNError(f"batch size must be > 0, got {batch_size}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    idx = torch.randperm(len(ds), generator=gen) if shuffle else torch.arange(len(ds))
    if world > 1:
        per = len(idx) // world
        idx = idx[rank * per:(rank + 1) * per]
    aug_gen = torch.Generator().manual_seed(seed * 7_919 + epoch * 31 + rank)
    for i in range(0, len(idx), batch_size):
        j = idx[i:i + batch_size].numpy()
        if drop_last and len(j) < batch_size:
            break
        xb = to_tensor(ds.x[j])
        if aug:
            xb = augment(xb, aug_gen)
        yield xb, torch.as_tensor(ds.y[j], dtype=torch.long)


# --------------------------------------------------------------------------- CIFAR-10


class _DataOnlyUnpickler(pickle.Unpickler):
    """Admits plain containers, numbers, strings, bytes and numpy arrays; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "builtins" and name in ("list", "dict", "tuple", "set", "frozenset", "bytearray", "int", "float",
                                               "complex", "str", "bytes", "bool"):
            return super().find_class(module, name)
        raise QNNError(f"refusing pickle: it references {module}.{name}, and only plain data is admitted")


def safe_unpickle(data: bytes) -> object:
    try:
        return _DataOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except QNNError:
        raise
    except Exception as e:
        raise QNNError(f"corrupt pickle: {type(e).__name__}: {str(e)[:120]}") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = safe_unpickle(path.read_bytes())
    if not isinstance(obj, dict):
        raise QNNError(f"{path}: not a CIFAR batch (expected a dict)")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in d or "labels" not in d:
        raise QNNError(f"{path}: not a CIFAR batch (no data/labels)")
    try:
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (ValueError, TypeError) as e:
        raise QNNError(f"{path}: CIFAR batch data is not N x 3072 bytes: {str(e)[:100]}") from None
    return np.ascontiguousarray(x), np.asarray(d["labels"])  # dtype kept: ArrayDataset refuses float labels


def load_cifar10(data_dir: str | Path, split: str) -> ArrayDataset:
    """From `{train,test}.npz` (shared layout) or a `cifar-10-batches-py` folder (inside data_dir or data_dir itself)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise QNNError(f"data dir not found: {root}")
    if not any(root.iterdir()):
        raise QNNError(f"data dir is empty: {root}")
    npz = root / f"{split}.npz"
    if npz.is_file():
        try:
            with np.load(npz, allow_pickle=False) as z:
                x, y = z["x"], z["y"]
        except Exception as e:
            raise QNNError(f"{npz}: unreadable npz: {str(e)[:120]}") from None
        return _cifar(ArrayDataset(x, y, CIFAR10_CLASSES), npz)
    for cand in (root / "cifar-10-batches-py", root):
        names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        if all((cand / n).is_file() for n in names):
            parts = [_read_cifar_batch(cand / n) for n in names]
            return _cifar(ArrayDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                       CIFAR10_CLASSES), cand)
    raise QNNError(f"{root}: no CIFAR-10 found (expected {split}.npz or cifar-10-batches-py/); use --download")


def _cifar(ds: ArrayDataset, src: Path) -> ArrayDataset:
    if ds.x.shape[1:3] != (32, 32):
        raise QNNError(f"{src}: CIFAR-10 images are 32x32, these are {ds.x.shape[1]}x{ds.x.shape[2]}")
    return ds


def download_cifar10(cache_dir: str | Path) -> Path:
    """Download the official python archive, check its MD5, extract it into cache_dir."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if (cache / "cifar-10-batches-py" / "test_batch").is_file():
        return cache
    try:
        data = urllib.request.urlopen(CIFAR10_URL, timeout=60).read()
    except Exception as e:
        raise QNNError(f"download of {CIFAR10_URL} failed: {e}") from None
    if hashlib.md5(data).hexdigest() != CIFAR10_MD5:
        raise QNNError("downloaded CIFAR-10 archive has the wrong checksum")
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(cache, filter="data")
    return cache


# --------------------------------------------------------------------------- ImageFolder


def load_image_folder(root: str | Path, size: int = 224, max_per_class: int | None = None,
                      channels: int = 3) -> ArrayDataset:
    """root/<class>/<image>; images resized (shorter side) and center-cropped to size x size, as RGB (channels 3) or
    grayscale (channels 1: Pillow's "L", ITU-R 601 luma)."""
    from PIL import Image

    _check_shape(size, channels)

    root = Path(root)
    if not root.is_dir():
        raise QNNError(f"data dir not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise QNNError(f"data dir is empty (no class folders): {root}")
    xs, ys = [], []
    for ci, c in enumerate(classes):
        files = sorted(f for f in (root / c).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
        for f in files[:max_per_class]:
            try:
                im = Image.open(f).convert("L" if channels == 1 else "RGB")
            except Exception as e:
                raise QNNError(f"{f}: unreadable image: {e}") from None
            w, h = im.size
            r = size / min(w, h)
            im = im.resize((max(size, round(w * r)), max(size, round(h * r))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            xs.append(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8).reshape(size, size,
                                                                                                       channels))
            ys.append(ci)
    if not xs:
        raise QNNError(f"no images under {root}")
    return ArrayDataset(np.stack(xs), np.asarray(ys, dtype=np.int64), tuple(classes))


# --------------------------------------------------------------------------- embedded synthetic set

SYNTH_CLASSES = tuple(f"class{i}" for i in range(10))


def synthetic_dataset(n: int, seed: int = 0, size: int = 32, channels: int = 3, num_classes: int = 10) -> ArrayDataset:
    """Deterministic set of `num_classes` classes (RGB, or grayscale with channels 1): each class is an oriented
    grating of its own frequency and colour (grey level) pair mixed with a class-shaped blob; random phase,
    position, contrast, colour jitter, clutter from the other classes' patterns and pixel noise make it non-trivial
    (a small CNN does not reach 100% in one epoch). The default 32x32 RGB 10-class set is the one earlier versions
    made, image for image. Generated once per process for each setting (it takes seconds); each call gets its own
    copy."""
    _check_shape(size, channels)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= 1000:
        raise QNNError(f"synthetic set: num_classes must be an integer in 2..1000, got {num_classes!r}")
    x, y = _synthetic_arrays(n, seed, size, channels, num_classes)
    return ArrayDataset(x.copy(), y.copy(), tuple(f"class{i}" for i in range(num_classes)))


def _check_shape(size, channels) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
        raise QNNError(f"image size must be an integer side in pixels in 1..4096, got {size!r}")
    if channels not in CHANNELS or isinstance(channels, bool):
        raise QNNError(f"image channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


@functools.lru_cache(maxsize=4)
def _synthetic_arrays(n: int, seed: int, size: int, channels: int = 3, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    # the draws are those of the original 10-class RGB generator whenever (channels, k) = (3, 10): same images
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base_rng = np.random.default_rng(12345)  # class definitions fixed, independent of the sample seed
    angles = np.linspace(0, np.pi, k, endpoint=False) + base_rng.uniform(-0.1, 0.1, k)
    freqs = base_rng.uniform(2.0, 6.0, k)
    cols = base_rng.uniform(0.2, 1.0, (k, 2, channels))
    y = rng.integers(0, k, n)
    x = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        c = y[i]
        img = _pattern(c, xx, yy, angles, freqs, cols, rng) * rng.uniform(0.5, 1.0)
        d = rng.integers(0, k)  # distractor from another class, weaker
        img += 0.35 * rng.uniform(0.3, 1.0) * _pattern(d, xx, yy, angles, freqs, cols, rng)
        img += rng.normal(0, 0.12, img.shape)
        img = (img - img.min()) / (img.max() - img.min() + 1e-6)
        x[i] = (img * 255).astype(np.uint8)
    return x, y.astype(np.int64)


def _pattern(c, xx, yy, angles, freqs, cols, rng) -> np.ndarray:
    a = angles[c] + rng.normal(0, 0.15)
    ph = rng.uniform(0, 2 * np.pi)
    g = 0.5 + 0.5 * np.sin(2 * np.pi * freqs[c] * (xx * np.cos(a) + yy * np.sin(a)) + ph)
    cx, cy = rng.uniform(0.25, 0.75, 2)
    r = 0.12 + 0.02 * (c % 3)
    blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
    cj = cols[c] + rng.normal(0, 0.08, cols.shape[1:])
    return g[..., None] * cj[0] + blob[..., None] * cj[1]


def load_dataset(name: str, split: str, data_dir: str | None = None, seed: int = 0, n_synthetic: int | None = None,
                 image_size: int | None = None, download: bool = False, channels: int | None = None,
                 num_classes: int | None = None, like=None) -> ArrayDataset:
    """The `split` of dataset `name`, made (synthetic) or read (ImageFolder) to fit a model.

    Args:
        image_size: side in pixels of synthetic and ImageFolder images (default: `like`'s, else 32 and 224).
        channels: 1 (grayscale) or 3 (RGB) for synthetic and ImageFolder images (default: `like`'s, else 3).
        num_classes: classes of the synthetic set (default: `like`'s, else 10).
        like: a model (its `in_channels`, `in_size`, `num_classes`) whose input the data is made to fit; explicit
            arguments take precedence. CIFAR-10 is 32x32 RGB with 10 classes whatever is asked: `check_data_fits`
            then says what does not fit.
    """
    if like is not None:
        image_size = image_size or getattr(like, "in_size", None)
        channels = channels or getattr(like, "in_channels", None)
        num_classes = num_classes or getattr(like, "num_classes", None)
    size, channels = image_size or DEFAULT_SIZE.get(name, 32), channels or 3
    if name == "synthetic":
        n = n_synthetic or (5000 if split == "train" else 1000)
        return synthetic_dataset(n, seed=seed + (0 if split == "train" else 99_991), size=size, channels=channels,
                                 num_classes=num_classes or len(SYNTH_CLASSES))
    if name == "cifar10":
        if data_dir is None:
            raise QNNError("--data-dir is required for cifar10 (e.g. ../shared/data/cifar10)")
        if download and not Path(data_dir).exists():
            download_cifar10(data_dir)
        return load_cifar10(data_dir, split)
    if name == "imagefolder":
        if data_dir is None:
            raise QNNError("--data-dir is required for imagefolder")
        return load_image_folder(Path(data_dir) / split if (Path(data_dir) / split).is_dir() else data_dir, size,
                                 channels=channels)
    raise QNNError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")


def dataset_classes(name: str, data_dir: str | None, split: str = "train") -> int | None:
    """How many classes the dataset has before its images are read (None: the synthetic set, made to order)."""
    if name == "cifar10":
        return len(CIFAR10_CLASSES)
    if name == "imagefolder" and data_dir is not None:
        root = Path(data_dir) / split if (Path(data_dir) / split).is_dir() else Path(data_dir)
        if root.is_dir():
            return sum(1 for p in root.iterdir() if p.is_dir()) or None
    return None


def model_fit_kwargs(cfg) -> dict:
    """`num_classes` and `in_size` to build the model of training config `cfg` with, before any image is read.

    Classes: the dataset's (CIFAR-10: 10, ImageFolder: its class folders), else `cfg.num_classes`, else (synthetic)
    a user's model decides (its fixed head or its factory's default) and a zoo model gets 10. Size: `cfg.image_size`,
    else for a user's model (which does not say what images it takes) the dataset's default side; a zoo model keeps
    its own. None values mean: not passed. `train_test_sets` then makes the data to fit the model built."""
    from qnn.models.registry import is_user_model, takes_in_size

    user = is_user_model(cfg.model)
    n_cls = dataset_classes(cfg.dataset, cfg.data_dir)
    if n_cls is not None and cfg.num_classes is not None and cfg.num_classes != n_cls:
        raise QNNError(f"num_classes {cfg.num_classes}: {cfg.dataset} at {cfg.data_dir} has {n_cls} classes")
    n_cls = n_cls or cfg.num_classes or (None if user else len(SYNTH_CLASSES))
    size = cfg.image_size
    if size is None and user:
        size = DEFAULT_SIZE.get(cfg.dataset, 32)
    if size is not None and not user and not takes_in_size(cfg.model):
        size = None  # a fixed-size zoo model: train_test_sets names the clash with image_size
    return {"num_classes": n_cls, "in_size": size}


def train_test_sets(cfg, model) -> tuple[ArrayDataset, ArrayDataset]:
    """The training and test sets of `cfg`, made or read to fit `model` (channels, size, synthetic classes) and
    checked: data the model cannot take is one line (a QNNError), before any training."""
    if cfg.image_size is not None and getattr(model, "in_size", None) not in (None, cfg.image_size):
        raise QNNError(f"image_size {cfg.image_size}: model '{cfg.model}' takes {model.in_size}x{model.in_size} "
                       f"images")
    kw = {"seed": cfg.seed, "n_synthetic": cfg.n_synthetic, "image_size": cfg.image_size,
          "num_classes": cfg.num_classes, "like": model}
    train = load_dataset(cfg.dataset, "train", cfg.data_dir, **kw).subset(cfg.train_subset)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir, **kw).subset(cfg.test_subset)
    check_data_fits(model, train, "training set")
    check_data_fits(model, test, "test set")
    return train, test

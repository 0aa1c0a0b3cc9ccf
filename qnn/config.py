"""Typed, validated configs (one dataclass per concern), serialisable to JSON/YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from qnn.errors import QNNError
from qnn.layers import check_bits, check_pinned_bits
from qnn.data import DATASETS
from qnn.options import check_options, option
from qnn.validate import MAX_SEED, check_float

SCHEDULES = ("fixed", "random", "round_robin", "curriculum")


def check_device(device: str) -> None:
    """'auto', 'cpu', 'cuda' or 'cuda:N', and a CUDA device only where one is present."""
    import re

    import torch

    if device in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        raise QNNError(f"unknown device '{device}'; choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise QNNError(f"device '{device}' asked for, but this machine has no CUDA GPU (use --device cpu)")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise QNNError(f"device '{device}' does not exist: {torch.cuda.device_count()} GPU(s) here")


def _model(name: str, v: str) -> None:
    from qnn.models import is_user_model, list_models
    from qnn.models.registry import user_model_parts

    if is_user_model(v):
        user_model_parts(v)  # the file exists and the factory is a name
    elif v not in list_models():
        raise QNNError(f"unknown model '{v}'; available: {', '.join(list_models())}, or path/to/file.py:factory")


def _defense(name: str, v: str) -> None:
    from qnn.defenses import list_defenses

    if v not in list_defenses():
        raise QNNError(f"unknown defense '{v}'; choose from {', '.join(list_defenses())}")


def _mapping(name: str, v) -> None:
    if not isinstance(v, dict):
        raise QNNError(f"{name} must be a mapping of option: value, got {v!r}")


@dataclass
class TrainConfig:
    """What `qnn train` runs: every field is a flag of `qnn train` (`qnn.options.add_flags`) and a key of its YAML."""

    model: str = option("small_cnn", "a zoo model (qnn list models) or your own: path/to/file.py:factory returning a "
                        "float CNN (quantized with qnn.quantize) or a model on Brevitas layers", check=_model)
    dataset: str = option("synthetic", "the data (synthetic: embedded, no download)", choices=DATASETS)
    data_dir: str | None = option(None, "dataset folder (CIFAR-10 npz or cifar-10-batches-py; ImageFolder root)")
    init: str | None = option(None, "float checkpoint (akamaster layout) or qnn checkpoint to start from")
    bits: list[int] = option(help="bit-width or set, e.g. 4 or 2,4,8,32 (32 = float)", factory=lambda: [4],
                             check=check_bits)
    schedule: str = option("fixed", "DBWT schedule over --bits (a set of bit-widths makes 'fixed' random)",
                           choices=SCHEDULES)
    epochs: int = option(2, "training epochs", lo=1)
    batch_size: int = option(128, "images per step", lo=1)
    lr: float = option(0.05, "peak SGD learning rate, cosine decay", lo=0.0, hi=100.0, lo_open=True)
    momentum: float = option(0.9, "SGD momentum", lo=0.0, hi=0.999)
    weight_decay: float = option(5e-4, "L2 weight decay", lo=0.0, hi=1.0)
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up, in epochs (at most --epochs)", lo=0.0)
    seed: int = option(0, "seed of data order, augmentation and bit-width draws", lo=0, hi=MAX_SEED)
    out_dir: str = option("runs/train", "run directory: checkpoint, metrics, config", flag="--out")
    overwrite: bool = option(False, "replace an existing run directory")
    resume: bool = option(False, "continue an interrupted run from its last epoch")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)", lo=1, hi=1024)
    train_subset: int | None = option(None, "train on the first N images only", lo=1)
    test_subset: int | None = option(None, "evaluate on the first N test images only", lo=1)
    n_synthetic: int | None = option(None, "images of the synthetic set per split (default 5000 train, 1000 test)",
                                     lo=1)
    image_size: int | None = option(None, "side of synthetic / ImageFolder images in pixels (default: the model's, "
                                    "else 32 / 224)", lo=1, hi=4096)
    num_classes: int | None = option(None, "classes of the synthetic set (default: your model's head, else 10)",
                                     lo=2, hi=1000)
    first_last_bits: int | None = option(8, "weight bits of the first conv and the classifier, 2..8", lo=2, hi=8,
                                         check=check_pinned_bits)
    residual_bits: int | None = option(None, "ResNets: residual stream (adds, block outputs) at >= this many bits, "
                                       "2..8; conv inputs stay at the bit-width", lo=2, hi=8, check=check_pinned_bits)
    reduce_range: bool = option(True, "8-bit weights on the full grid [-127, 127] instead of [-63, 63]; the int8 "
                                "export can then saturate on x86 without AVX-VNNI, so `--weight-type auto` stores "
                                "those layers as uint8 (slower)")
    eval_bits: list[int] | None = option(None, "bit-widths evaluated after each epoch (default: --bits)",
                                         check=check_bits)
    eval_every: int = option(1, "evaluate on the test set every N epochs and after the last", lo=1)
    distill: str | None = option(None, "knowledge distillation at quantized steps from a frozen float teacher: a "
                                 "checkpoint path, or 'init' for the --init checkpoint")
    distill_alpha: float = option(0.5, "weight of the distillation term: (1-a) CE + a T^2 KL(teacher || student)",
                                  lo=0.0, hi=1.0)
    distill_temp: float = option(2.0, "distillation temperature", lo=0.0, hi=100.0, lo_open=True)
    defense: str = option("none", "the defense trained with (qnn list defenses); its options below", check=_defense)
    defense_args: dict = option(help="the defense's options (its flags, --defense-arg KEY=VALUE)", factory=dict,
                                check=_mapping, cli=False)
    device: str = option("auto", "torch device: auto (cuda when present), cpu, cuda, cuda:N",
                         check=lambda name, v: check_device(v))
    progress: bool = option(True, "no progress bars")
    compile: bool = option(False, "torch.compile the training forward (fuses fake-quant elementwise work)")
    deterministic: bool = option(False, "deterministic kernels, so that a GPU run repeats (slower; CPU runs repeat "
                                 "anyway)")

    def __post_init__(self) -> None:
        check_options(self)
        if self.schedule == "fixed" and len(self.bits) != 1:
            self.schedule = "random"  # a set of bit-widths means DBWT; 'fixed' is for one bit-width
        check_float("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))
        if self.distill and self.defense != "none":
            raise QNNError("--distill works with plain QAT only (--defense none)")
        if self.distill == "init" and not self.init:
            raise QNNError("--distill init needs --init")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise QNNError(f"config file not found: {p}")
    try:
        obj = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise QNNError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise QNNError(f"{p}: config must be a mapping")
    return obj


def build(cls, file_cfg: dict, overrides: dict):
    """Defaults <- config file <- explicit flags (None = not given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in file_cfg if k not in names]
    if unknown:
        raise QNNError(f"unknown config key(s) {unknown}; allowed: {sorted(names)}")
    merged = dict(file_cfg)
    merged.update({k: v for k, v in overrides.items() if v is not None and k in names})
    return cls(**merged)

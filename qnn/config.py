"""Typed, validated configs (one dataclass per concern), serialisable to JSON/YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from qnn.errors import QNNError
from qnn.layers import check_pinned_bits, parse_bits
from qnn.validate import MAX_SEED, check_field_types, check_float, check_int

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


@dataclass
class TrainConfig:
    model: str = "small_cnn"
    dataset: str = "synthetic"
    data_dir: str | None = None
    init: str | None = None             # float checkpoint (akamaster layout) or a qnn checkpoint to start from
    bits: list[int] = field(default_factory=lambda: [4])
    schedule: str = "fixed"             # DBWT schedule over `bits`: fixed|random|round_robin|curriculum
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    seed: int = 0
    out_dir: str = "runs/train"
    overwrite: bool = False
    resume: bool = False
    threads: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    n_synthetic: int | None = None
    image_size: int | None = None       # side of synthetic / ImageFolder images (default: the model's, else 32 / 224)
    num_classes: int | None = None      # classes of the synthetic set (default: the user model's head, else 10)
    first_last_bits: int | None = 8
    residual_bits: int | None = None    # ResNets: keep the residual stream at >= this many bits (None: a_bits)
    reduce_range: bool = True           # 8-bit weights on the 7-bit grid: the int8 export is exact on every CPU
    eval_bits: list[int] | None = None
    eval_every: int = 1                 # test-set evaluation every N epochs (and after the last)
    distill: str | None = None         # teacher for quantized steps: a float checkpoint, or "init" (= --init)
    distill_alpha: float = 0.5          # loss = (1-alpha) CE + alpha T^2 KL(teacher || student)
    distill_temp: float = 2.0
    defense: str = "none"
    defense_args: dict = field(default_factory=dict)
    device: str = "auto"
    progress: bool = True
    compile: bool = False               # torch.compile the training forward (fuses fake-quant elementwise work)
    deterministic: bool = False         # deterministic kernels (a GPU run repeats; slower)

    def __post_init__(self) -> None:
        check_field_types(self)
        self.bits = parse_bits(self.bits)
        if self.eval_bits is not None:
            self.eval_bits = parse_bits(self.eval_bits)
        if self.schedule not in SCHEDULES:
            raise QNNError(f"unknown schedule '{self.schedule}'; choose from {', '.join(SCHEDULES)}")
        if self.schedule == "fixed" and len(self.bits) != 1:
            self.schedule = "random"  # a set of bit-widths means DBWT; 'fixed' is for one bit-width
        check_int("epochs", self.epochs, 1)
        check_int("eval_every", self.eval_every, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_float("lr", self.lr, 0.0, 100.0, lo_open=True)
        check_float("momentum", self.momentum, 0.0, 0.999)
        check_float("weight_decay", self.weight_decay, 0.0, 1.0)
        check_float("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))
        check_float("distill_alpha", self.distill_alpha, 0.0, 1.0)
        check_float("distill_temp", self.distill_temp, 0.0, 100.0, lo_open=True)
        if self.threads is not None:
            check_int("threads", self.threads, 1, 1024)
        check_pinned_bits("first_last_bits", self.first_last_bits)
        check_pinned_bits("residual_bits", self.residual_bits)
        if self.distill and self.defense != "none":
            raise QNNError("--distill works with plain QAT only (--defense none)")
        if self.distill == "init" and not self.init:
            raise QNNError("--distill init needs --init")
        for n in ("train_subset", "test_subset", "n_synthetic"):
            if getattr(self, n) is not None:
                check_int(n, getattr(self, n), 1)
        if self.image_size is not None:
            check_int("image_size", self.image_size, 1, 4096)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 2, 1000)
        if not isinstance(self.defense_args, dict):
            raise QNNError(f"defense_args must be a mapping of option: value, got {self.defense_args!r}")
        check_device(self.device)
        from qnn.models import is_user_model, list_models
        from qnn.models.registry import user_model_parts

        if is_user_model(self.model):
            user_model_parts(self.model)  # the file exists and the factory is a name
        elif self.model not in list_models():
            raise QNNError(f"unknown model '{self.model}'; available: {', '.join(list_models())}, or "
                           f"path/to/file.py:factory")

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

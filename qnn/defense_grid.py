"""The defense-experiment runner: a grid of defense rows (a YAML list), trained per seed and scored cell by cell under
a named evaluation protocol (`qnn.evaluation`), resumable at every cell.

A row is {name, defense, args: {...}, bits: [..] | per-bit, epochs (optional), compute: ROW (optional: given ROW's
total training compute, see `matched_training`), deploy: true (optional: a 32-bit model evaluated at every bit-width,
BatchNorm re-calibrated), seeds: [..] (optional: only these seeds), train: {lr, schedule, residual_bits,
warmup_epochs} (optional)}. `per-bit` trains one fixed-precision model per evaluated bit-width (the spec's PBAT).

A cell is (row, seed, bit-width, patch configuration, attack member): its per-image scores, ASR, the checkpoint's
sha256 and its weights' (`qnn.checkpoint.weights_sha256`), the row's definition and the code that ran. Cells are
written to `<out>.json` as they finish; a re-run keeps every cell whose key, row definition, weights and protocol
version match (so a model retrained after runs/ was lost keeps its cells when the training repeats to the bit), and refuses a file made under another
budget or protocol. Trained checkpoints live under `runs_dir`, in folders named by a hash of their settings, and are
reused by any later run with the same settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qnn.errors import QNNError
from qnn.outputs import read_results_json

PER_BIT = "per-bit"
#: training settings a row may change from the budget's
TRAIN_OVERRIDES = ("lr", "schedule", "residual_bits", "warmup_epochs")


@dataclass(frozen=True)
class Budget:
    """Training and data settings shared by every row."""

    name: str
    model: str
    dataset: str
    data_dir: str | None
    init: str | None
    epochs: int
    train_subset: int | None
    batch_size: int
    lr: float
    test_subset: int             # test images the training run evaluates on (the first n; scoring uses the last)
    n_synthetic: int | None = None
    eval_bits: tuple[int, ...] = (32, 8, 4, 2)
    left_out: tuple[int, ...] = (3, 5, 6)
    cost_steps: int = 40         # interleaved training steps per row for the compute column


BUDGETS = {
    "cpu": Budget("cpu", "resnet20", "cifar10", "../shared/data/cifar10", "../shared/data/weights/resnet20-12fca82f.th",
                  epochs=1, train_subset=20000, batch_size=128, lr=0.02, test_subset=2000),
    "full": Budget("full", "resnet20", "cifar10", "../shared/data/cifar10",
                   "../shared/data/weights/resnet20-12fca82f.th", epochs=30, train_subset=None, batch_size=128, lr=0.05,
                   test_subset=10000, cost_steps=100),
    "smoke": Budget("smoke", "small_cnn", "synthetic", None, None, epochs=1, train_subset=600, batch_size=64, lr=0.05,
                    test_subset=64, n_synthetic=600, left_out=(3,), cost_steps=4),
}


@dataclass(frozen=True)
class Config:
    """A patch configuration of the table, the bit-widths it is scored at, and the seeds it runs on."""

    label: str
    patch: dict
    bits: str = "eval"           # eval | left_out
    seeds: tuple[int, ...] | None = None


def table_configs(seen_seeds: tuple[int, ...] = (0,)) -> list[Config]:
    """Issue #34's configurations, taken from the patch suites (qnn/configs/suite_*.yaml, defined once): unseen 10x10
    square and 6.25% circle at the evaluated bit-widths, the 10x10 at the left-out bit-widths (switchable models), and
    the seen configuration (6x6 square) on `seen_seeds`."""
    from qnn.attacks.suites import label, patch_settings

    unseen = {label(p): p for p in patch_settings("unseen")}
    seen = patch_settings("seen")[0]
    return [Config("10x10 sq", unseen["10x10 sq"]), Config("6.25% circ", unseen["6.25% circ"]),
            Config("10x10 sq", unseen["10x10 sq"], bits="left_out"),
            Config(f"{label(seen)} (seen)", seen, seeds=seen_seeds)]


@dataclass(frozen=True)
class Row:
    name: str
    defense: str
    args: dict = field(default_factory=dict)
    bits: tuple[int, ...] | str = (2, 4, 8, 32)
    epochs: int | None = None
    compute: str | None = None
    deploy: bool = False
    seeds: tuple[int, ...] | None = None
    train: dict = field(default_factory=dict)

    @property
    def per_bit(self) -> bool:
        return self.bits == PER_BIT

    def definition(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in s)


def load_grid(path: str | Path) -> list[Row]:
    """The rows of a grid file, validated (one line naming the row and the field otherwise)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise QNNError(f"grid file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise QNNError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, list) or not raw:
        raise QNNError(f"{p}: expected a non-empty list of rows")
    known = {f.name for f in dataclasses.fields(Row)}
    rows, slugs = [], set()
    for g in raw:
        if not isinstance(g, dict) or "name" not in g or "defense" not in g:
            raise QNNError(f"{p}: every row needs 'name' and 'defense', got {g!r}")
        name = str(g["name"])
        unknown = sorted(set(g) - known)
        if unknown:
            raise QNNError(f"{p}: row '{name}': unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        if slug(name) in slugs:  # two names with one run folder would overwrite each other's runs
            raise QNNError(f"{p}: row name '{name}' appears twice (or differs from another only in characters its "
                           "run folder replaces by '_')")
        slugs.add(slug(name))
        bits = g.get("bits", [2, 4, 8, 32])
        if bits != PER_BIT and not (isinstance(bits, list) and bits and all(type(b) is int for b in bits)):
            raise QNNError(f"{p}: row '{name}': bits must be a non-empty list of integers or '{PER_BIT}'")
        args, train = g.get("args") or {}, g.get("train") or {}
        if not isinstance(args, dict) or not isinstance(train, dict):
            raise QNNError(f"{p}: row '{name}': args and train must be mappings")
        bad = sorted(set(train) - set(TRAIN_OVERRIDES))
        if bad:
            raise QNNError(f"{p}: row '{name}': train may change only {', '.join(TRAIN_OVERRIDES)}, got {', '.join(bad)}")
        epochs = g.get("epochs")
        if epochs is not None and not (type(epochs) is int and epochs > 0):
            raise QNNError(f"{p}: row '{name}': epochs must be a positive integer, got {epochs!r}")
        deploy = g.get("deploy", False)
        if not isinstance(deploy, bool) or (deploy and bits != [32]):
            raise QNNError(f"{p}: row '{name}': deploy must be true or false, and needs bits [32]")
        seeds = g.get("seeds")
        if seeds is not None and not (isinstance(seeds, list) and seeds and all(type(s) is int and s >= 0 for s in seeds)):
            raise QNNError(f"{p}: row '{name}': seeds must be a non-empty list of non-negative integers")
        rows.append(Row(name, g["defense"], args, PER_BIT if bits == PER_BIT else tuple(bits), epochs,
                        g.get("compute"), deploy, tuple(seeds) if seeds else None, train))
    names = {r.name for r in rows}
    for r in rows:
        if r.compute is not None:
            if r.compute not in names or r.compute == r.name:
                raise QNNError(f"{p}: row '{r.name}': compute must name another row, got {r.compute!r}")
            if r.epochs is not None:
                raise QNNError(f"{p}: row '{r.name}': give epochs or compute, not both")
            target = next(t for t in rows if t.name == r.compute)
            if target.compute is not None:
                raise QNNError(f"{p}: row '{r.name}': its compute row '{target.name}' is itself compute-matched")
    return rows


# ---------------------------------------------------------------- training

def train_config(budget: Budget, row: Row, bits: list[int], seed: int, out_dir: str, threads: int, device: str,
                 epochs: int | None = None, train_subset: int | None = None):
    from qnn.config import TrainConfig

    kw = dict(model=budget.model, dataset=budget.dataset, data_dir=budget.data_dir, init=budget.init, bits=bits,
              epochs=epochs or row.epochs or budget.epochs, lr=budget.lr, batch_size=budget.batch_size,
              n_synthetic=budget.n_synthetic, train_subset=train_subset or budget.train_subset,
              test_subset=budget.test_subset, out_dir=out_dir, resume=True, seed=seed, defense=row.defense,
              defense_args=dict(row.args), threads=threads, progress=sys.stderr.isatty(), device=device)
    return TrainConfig(**{**kw, **row.train})


def models_of(budget: Budget, row: Row) -> list[tuple[int | None, list[int]]]:
    """(the bit-width a per-bit model serves or None, its trained bit-widths) for each model the row trains."""
    if row.per_bit:
        return [(b, [b]) for b in budget.eval_bits]
    return [(None, list(row.bits))]


def cost_key(row: Row, bits: list[int]) -> str:
    return json.dumps({"defense": row.defense, "args": row.args, "bits": bits, "train": row.train}, sort_keys=True)


def measure_costs(budget: Budget, rows: list[Row], path: Path, threads: int, device: str) -> dict[str, float]:
    """Seconds per epoch of every distinct model the rows train, relative to plain QAT at the rows' first bit set,
    measured interleaved (`interleaved_epoch_seconds`); cached in `path` (made once, reused by every seed)."""
    from qnn.checkpoint import atomic_write_json
    from qnn.train_cost import interleaved_epoch_seconds

    keys, cfgs = [], []
    base = Row("none", "none")
    for row in [base] + rows:
        for _, bits in models_of(budget, row):
            k = cost_key(row, bits)
            if k not in keys:
                keys.append(k)
                cfgs.append(train_config(budget, row, bits, 0, "unused", threads, device))
    old = read_results_json(path, "training-cost file") if path.is_file() else {}
    if isinstance(old.get("ratio_vs_qat"), dict) and set(keys) <= set(old["ratio_vs_qat"]):
        return old["ratio_vs_qat"]
    print(f"== training cost: {budget.cost_steps} interleaved steps of each of {len(cfgs)} models", flush=True)
    secs = interleaved_epoch_seconds(cfgs, budget.cost_steps, warmup=min(3, budget.cost_steps // 4))
    ratios = {k: s / secs[0] for k, s in zip(keys, secs)}
    atomic_write_json(path, {"ratio_vs_qat": ratios, "epoch_seconds": dict(zip(keys, secs)),
                             "steps": budget.cost_steps})
    return ratios


def matched_training(budget: Budget, row: Row, target: Row, ratios: dict[str, float]) -> tuple[int, int | None]:
    """(epochs, training images) that give `row` the target row's total compute (in plain-QAT epochs over the
    budget's images): the fewest epochs that reach it, on a prefix of the budget's images small enough to make it
    equal, so that a matched row never sees more distinct images than the others."""
    n_images = budget.train_subset
    if n_images is None:
        raise QNNError("compute-matched rows need a budget with a train_subset")
    target_total = sum(ratios[cost_key(target, b)] * (target.epochs or budget.epochs) for _, b in models_of(budget, target))
    per_model = sum(ratios[cost_key(row, b)] for _, b in models_of(budget, row))  # one epoch of every model
    epochs = max(1, math.ceil(target_total / per_model - 1e-9))
    subset = min(n_images, max(budget.batch_size, round(n_images * target_total / (per_model * epochs))))
    return epochs, subset


#: TrainConfig keys added after grid runs were first named: left out while unset, so those runs keep their folders
LATER_KEYS = ("image_size", "num_classes")


def settings_hash(cfg) -> str:
    from qnn.train import RESUME_IGNORED

    d = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_IGNORED and not (k in LATER_KEYS and v is None)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class Job:
    """One model to train and score."""

    row: Row
    seed: int
    serves: int | None           # per-bit: the bit-width this model is for
    trained_bits: list[int]
    cfg: object
    compute_qat_epochs: float

    @property
    def checkpoint(self) -> Path:
        return Path(self.cfg.out_dir) / "model.pt"


def jobs_for(budget: Budget, rows: list[Row], seeds: list[int], runs: Path, ratios: dict[str, float], threads: int,
             device: str) -> list[Job]:
    """Every model to train, seed-major (each seed's rows before the next seed: a run cut short covers whole seeds)."""
    by_name = {r.name: r for r in rows}
    out = []
    for seed in seeds:
        for row in rows:
            if row.seeds is not None and seed not in row.seeds:
                continue
            epochs, subset = (matched_training(budget, row, by_name[row.compute], ratios) if row.compute
                              else (None, None))
            for serves, bits in models_of(budget, row):
                cfg = train_config(budget, row, bits, seed, "unused", threads, device, epochs, subset)
                frac = (cfg.train_subset or 0) / budget.train_subset if budget.train_subset else 1.0
                compute = ratios[cost_key(row, bits)] * cfg.epochs * frac
                where = runs / (f"{slug(row.name)}_s{seed}" + (f"_b{serves}" if serves else "") + f"_{settings_hash(cfg)}")
                out.append(Job(row, seed, serves, bits, dataclasses.replace(cfg, out_dir=str(where)), compute))
    return out


def ensure_trained(job: Job) -> None:
    from qnn.train import train

    if job.checkpoint.is_file():
        return
    print(f"== train {job.row.name} seed {job.seed}" + (f" ({job.serves}-bit model)" if job.serves else "")
          + f": {job.cfg.epochs} epoch(s) on {job.cfg.train_subset} images", flush=True)
    train(job.cfg)


# ---------------------------------------------------------------- cells

@dataclass
class Work:
    """One crafted patch and the cells it scores: a member crafted at one bit-width scores that bit-width; an EOT
    member is crafted once per (model, patch configuration) and scores every bit-width of the configuration."""

    job: Job
    config: Config
    member: object               # qnn.attacks.ensemble.Attack
    craft_bits: int | None       # None: EOT over the model's bit-widths
    score_bits: list[int]

    def keys(self) -> list[str]:
        return [cell_key(self.job.row.name, self.job.seed, b, self.config.label, self.member.name)
                for b in self.score_bits]


def cell_key(row: str, seed: int, bits: int, config: str, attack: str) -> str:
    return f"{row} | seed {seed} | {bits} bits | {config} | {attack}"


def eot_bits_of(budget: Budget, job: Job) -> list[int] | None:
    """The bit-widths an EOT attacker draws from: the defender's trained set (a deployed 32-bit model: every
    bit-width it is deployed at); None for a model of one precision."""
    if job.row.deploy:
        return list(budget.eval_bits)
    return list(job.trained_bits) if len(job.trained_bits) > 1 else None


def plan(budget: Budget, jobs: list[Job], configs: list[Config], protocol, only_bits: set[int] | None = None) -> list[Work]:
    work = []
    for job in jobs:
        for c in configs:
            if c.seeds is not None and job.seed not in c.seeds:
                continue
            if c.bits == "left_out":
                if job.row.per_bit or job.row.deploy:
                    continue  # left-out bit-widths: switchable models only
                bits = list(budget.left_out)
            else:
                bits = [job.serves] if job.serves else list(budget.eval_bits)
            bits = [b for b in bits if only_bits is None or b in only_bits]
            if not bits:
                continue
            for m in protocol.members:
                if m.eot_bits:
                    if eot_bits_of(budget, job):
                        work.append(Work(job, c, m, None, bits))
                else:
                    work.extend(Work(job, c, m, b, [b]) for b in bits)
    return work


def check_cell(key: str, c) -> None:
    """A cell read back from a results file: its fields have their types and ranges (one line otherwise)."""
    from qnn.evaluation import decode_scores

    ok = (isinstance(c, dict) and isinstance(c.get("asr_pct"), (int, float)) and not isinstance(c["asr_pct"], bool)
          and 0.0 <= c["asr_pct"] <= 100.0 and isinstance(c.get("clean_acc_pct"), (int, float))
          and 0.0 <= c["clean_acc_pct"] <= 100.0 and isinstance(c.get("scores"), str)
          and isinstance(c.get("checkpoint_sha256"), str) and isinstance(c.get("weights_sha256", ""), str)
          and isinstance(c.get("row_definition"), dict)
          and isinstance(c.get("compute_qat_epochs"), (int, float)) and isinstance(c.get("image_steps"), int)
          and isinstance(c.get("seconds"), (int, float))
          and all(isinstance(c.get(k, 0.0), (int, float, type(None))) for k in ("score_seconds", "train_seconds")))
    if not ok:
        raise QNNError(f"results file: cell '{key}' is malformed (fields missing, of the wrong type or out of range)")
    decode_scores(c["scores"])


def read_results(path: Path, budget: Budget, protocol) -> dict:
    """The cells an earlier run wrote to `path` (empty when there is none); refuses a file of another budget or
    protocol, and validates every cell."""
    if not path.is_file():
        return {}
    old = read_results_json(path)
    if old.get("kind") != "defense-grid":
        raise QNNError(f"{path} is not a defense-grid results file; choose another --out")
    # the protocol's images and scoring must match; its members may grow (each cell records its attack's definition)
    images = lambda p: {k: v for k, v in (p or {}).items() if k != "members"}  # noqa: E731
    want = {"budget": dataclasses.asdict(budget), "protocol": images(protocol.to_dict())}
    have = {"budget": old.get("budget"), "protocol": images(old.get("protocol"))}
    if json.loads(json.dumps(want)) != have:
        diff = [k for k in want if json.loads(json.dumps(want[k])) != have[k]]
        raise QNNError(f"{path} was made with another {' and '.join(diff)}; choose another --out")
    cells = old.get("cells")
    if not isinstance(cells, dict):
        raise QNNError(f"{path}: 'cells' must be a mapping")
    for k, c in cells.items():
        check_cell(k, c)
    return old


def is_finished(cell: dict | None, job: Job, member) -> bool:
    """A finished cell of this row definition, attack definition and protocol version, scored on a model trained with
    this job's settings (its folder's name carries their hash)."""
    from qnn.evaluation import PROTOCOL_VERSION

    return bool(cell) and Path(str(cell.get("checkpoint", ""))).parent.name == job.checkpoint.parent.name \
        and cell.get("row_definition") == job.row.definition() and cell.get("protocol_version") == PROTOCOL_VERSION \
        and cell.get("attack_definition") == dataclasses.asdict(member)


def is_done(cell: dict | None, job: Job, sha: str, member) -> bool:
    """`is_finished`, on this very model (its weights: `weights_sha256`). A cell written before cells recorded their
    weights is done again."""
    return is_finished(cell, job, member) and cell.get("weights_sha256") == sha


def needs_model(job: Job, work: list[Work], cells: dict) -> bool:
    """Whether `job`'s model must be at hand: it is, or some of its cells are not finished. A lost checkpoint whose
    every cell is finished is not retrained only to be checked (CPU training repeats to the bit: were it retrained,
    its cells would be kept)."""
    return job.checkpoint.is_file() or not all(is_finished(cells.get(k), job, w.member) for w in work for k in w.keys())


def training_seconds(checkpoint: Path) -> float | None:
    """The wall time of the training run that wrote `checkpoint`: the sum of its epochs (metrics.json beside it);
    None where that record is missing or unreadable."""
    try:
        history = json.loads((checkpoint.parent / "metrics.json").read_text())["history"]
        return float(sum(h["epoch_seconds"] for h in history))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Scorer:
    """The loaded model of one job, with its clean predictions per bit-width and its re-calibrated bit-widths."""

    def __init__(self, job: Job, budget: Budget, data: dict, device: str):
        from qnn.checkpoint import load_checkpoint, sha256_file, weights_sha256
        from qnn.train import calibrate_

        self.job, self.device = job, device
        self.file_sha = sha256_file(job.checkpoint)
        self.model, obj = load_checkpoint(job.checkpoint)
        self.sha = weights_sha256(obj)
        self.train_seconds = training_seconds(job.checkpoint)
        self.model = self.model.to(device).eval()
        calibrated = [b for b in list(budget.eval_bits) + list(budget.left_out) if b != 32 and b not in job.trained_bits]
        for b in calibrated:  # untrained bit-widths get BatchNorm statistics of their own
            calibrate_(self.model, data["train"], b, device=device)
        self.clean: dict[int, object] = {}
        self.eot: dict[str, tuple] = {}  # EOT patches by (attack, patch settings): crafted once, scored at every bit-width

    def clean_pred(self, bits: int, x):
        from qnn.attacks.patch import predict
        from qnn.layers import precision

        if bits not in self.clean:
            with precision(self.model, bits):
                self.clean[bits] = predict(self.model, x, device=self.device)
        return self.clean[bits]


def run_work(w: Work, scorer: Scorer, budget: Budget, protocol, data: dict, code: dict) -> dict[str, dict]:
    """Craft `w`'s patch and score its cells."""
    import numpy as np

    from qnn.attacks.patch import PatchConfig
    from qnn.evaluation import PROTOCOL_VERSION, asr_pct, craft, encode_scores, score

    xs, ys = data["score"]
    base = PatchConfig(**w.config.patch, seed=w.job.seed, image_size=tuple(xs.shape[-2:]), num_classes=data["classes"])
    key = json.dumps([w.member.name, w.config.patch], sort_keys=True, default=str)
    if w.craft_bits is None and key in scorer.eot:  # the same configuration at other bit-widths (left out)
        patch, secs = scorer.eot[key]
    else:
        t0 = time.perf_counter()
        bits = w.craft_bits if w.craft_bits is not None else w.score_bits[0]
        patch = craft(scorer.model, bits, w.member, base, data["craft"], eot_bits_of(budget, w.job) or [bits],
                      protocol, device=scorer.device)
        secs = time.perf_counter() - t0
        if w.craft_bits is None:
            scorer.eot[key] = (patch, secs)
    out = {}
    for b, key in zip(w.score_bits, w.keys()):
        t0 = time.perf_counter()
        fooled = score(scorer.model, b, patch, base, (xs, ys), protocol.placements, device=scorer.device,
                       clean_pred=scorer.clean_pred(b, xs))
        score_secs = time.perf_counter() - t0
        out[key] = {"row": w.job.row.name, "seed": w.job.seed, "bits": b, "config": w.config.label,
                    "attack": w.member.name, "asr_pct": asr_pct(fooled, protocol.placements),
                    "clean_acc_pct": 100.0 * float((fooled >= 0).mean()), "scores": encode_scores(fooled),
                    "crafted_at": w.craft_bits if w.craft_bits is not None else "EOT", "image_steps": protocol.image_steps(w.member),
                    "seconds": secs, "score_seconds": score_secs, "train_seconds": scorer.train_seconds,
                    "checkpoint": str(w.job.checkpoint), "checkpoint_sha256": scorer.file_sha,
                    "weights_sha256": scorer.sha,
                    "trained_bits": w.job.trained_bits, "compute_qat_epochs": w.job.compute_qat_epochs,
                    "train_epochs": w.job.cfg.epochs, "train_images": w.job.cfg.train_subset,
                    "row_definition": w.job.row.definition(), "protocol_version": PROTOCOL_VERSION, "code": code,
                    "attack_definition": dataclasses.asdict(w.member),
                    "patch_mean": float(np.asarray(patch).mean())}
    return out


def load_data(budget: Budget, protocol) -> dict:
    from qnn.data import load_dataset

    test = load_dataset(budget.dataset, "test", budget.data_dir, n_synthetic=budget.n_synthetic)
    train = load_dataset(budget.dataset, "train", budget.data_dir, n_synthetic=budget.n_synthetic)
    for what, ds, n in (("scored", test, protocol.n_score), ("crafting", train, protocol.n_craft)):
        if len(ds) < n:
            raise QNNError(f"protocol '{protocol.name}' needs {n} {what} images; the {budget.dataset} split has {len(ds)}")
    return {"train": train, "craft": train.subset(protocol.n_craft).tensors(),
            "score": test.subset(protocol.n_score, start=len(test) - protocol.n_score).tensors(),
            "classes": len(test.classes)}


def estimate(work: list[Work], to_train: list[Job], done: set[str], protocol, rate: float, qat_epoch_s: float) -> tuple:
    """(units left, cells left, attack CPU hours, training CPU hours) of what is not finished."""
    left = [w for w in work if not set(w.keys()) <= done]
    attack_h = sum(protocol.image_steps(w.member) for w in left) / rate / 3600
    train_h = sum(j.compute_qat_epochs for j in to_train) * qat_epoch_s / 3600
    return len(left), sum(len(set(w.keys()) - done) for w in left), attack_h, train_h


# ---------------------------------------------------------------- the command

DEFAULT_GRID = Path(__file__).resolve().parent / "configs" / "grid_defense_equal_compute.yaml"


def main(argv: list[str] | None = None, prog: str = "defense_table") -> int:
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description="Train a grid of defenses over seeds and score every (row, "
                                 "seed, bit-width, patch configuration, attack) cell under a named evaluation protocol; "
                                 "resumable cell by cell.")
    ap.add_argument("--budget", default="smoke", choices=list(BUDGETS), help="training budget (default smoke)")
    ap.add_argument("--protocol", default=None, help="evaluation protocol (qnn.evaluation: cpu, full, smoke; "
                    "default: the budget's name)")
    ap.add_argument("--grid", default=str(DEFAULT_GRID), help="the rows (YAML; default the equal-compute table's)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--out", default=None, help="results path without extension (default results/defense_grid_BUDGET)")
    ap.add_argument("--runs-dir", default=None, help="trained models, reused by any run with the same settings "
                    "(default runs/defense_grid_BUDGET)")
    ap.add_argument("--rows", default=None, help="comma-separated row names to run (default all)")
    ap.add_argument("--configs", default=None, help="comma-separated patch configurations (default all)")
    ap.add_argument("--bits", default=None, help="comma-separated bit-widths to score (default all)")
    ap.add_argument("--plan", action="store_true", help="print the cells left and the CPU time they need, then stop")
    ap.add_argument("--train-only", action="store_true", help="train the models (and measure their cost), score nothing")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(a, prog)
    except QNNError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def _ints(s: str | None, what: str) -> list[int] | None:
    if s is None:
        return None
    try:
        v = [int(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise QNNError(f"--{what} must be comma-separated integers, got {s!r}") from None
    if not v or any(x < 0 for x in v) or len(set(v)) != len(v):
        raise QNNError(f"--{what} must list distinct non-negative integers, got {s!r}")
    return v


def _run(a, prog: str) -> int:
    import torch

    from qnn.checkpoint import atomic_write_json
    from qnn.config import check_device
    from qnn.evaluation import get_protocol
    from qnn.outputs import RunLock, check_output
    from qnn.train import versions

    budget = BUDGETS[a.budget]
    protocol = get_protocol(a.protocol or a.budget)
    rows = grid = load_grid(a.grid)
    seeds = _ints(a.seeds, "seeds")
    only_bits = set(_ints(a.bits, "bits")) if a.bits else None
    if a.rows:
        want = [r for r in a.rows.split(",") if r]
        unknown = sorted(set(want) - {r.name for r in rows})
        if unknown:
            raise QNNError(f"--rows: no row {', '.join(unknown)} in {a.grid}")
        rows = [r for r in rows if r.name in want or any(r.name == t.compute for t in rows if t.name in want)]
    configs = table_configs()
    if a.configs:
        want = [c for c in a.configs.split(",") if c]
        unknown = sorted(set(want) - {c.label for c in configs})
        if unknown:
            raise QNNError(f"--configs: unknown {', '.join(unknown)}; the table has {', '.join(dict.fromkeys(c.label for c in configs))}")
        configs = [c for c in configs if c.label in want]
    if a.threads < 1:
        raise QNNError(f"--threads must be >= 1, got {a.threads}")
    check_device(a.device)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    out = Path(a.out or f"results/defense_grid_{budget.name}")
    runs = Path(a.runs_dir or f"runs/{out.name}")
    res_path = out.with_suffix(".json") if out.suffix != ".json" else out
    check_output(res_path, "file")
    check_output(runs, "dir")
    torch.set_num_threads(a.threads)
    with RunLock(res_path):
        old = read_results(res_path, budget, protocol)
        cells: dict = dict(old.get("cells", {}))
        ratios = measure_costs(budget, grid, runs / "cost.json", a.threads, device)
        qat_epoch_s = read_results_json(runs / "cost.json")["epoch_seconds"][cost_key(Row("none", "none"), [2, 4, 8, 32])]
        jobs = jobs_for(budget, rows, seeds, runs, ratios, a.threads, device)
        if a.rows:  # the compute-matched rows' targets were needed for their settings, not to be run
            jobs = [j for j in jobs if j.row.name in a.rows.split(",")]
        work = plan(budget, jobs, configs, protocol, only_bits)
        by_job: dict[int, list[Work]] = {}
        for w in work:
            by_job.setdefault(id(w.job), []).append(w)
        wanted = [j for j in jobs if a.train_only or needs_model(j, by_job.get(id(j), []), cells)]
        to_train = [j for j in wanted if not j.checkpoint.is_file()]
        done_keys = {k for k in cells}
        rate = _rate(cells)
        n_units, n_cells, attack_h, train_h = estimate(work, to_train, done_keys, protocol, rate, qat_epoch_s)
        print(f"{prog}: {n_cells} cells left in {n_units} attacks ({len(work)} in all) and "
              f"{len(to_train)} of {len(jobs)} models to train: about "
              f"{attack_h:.1f} CPU h of attacks (at {rate:.0f} image-steps/s) + {train_h:.1f} CPU h of training "
              f"(finished cells are re-checked against their model's weights; a lost model with no cell left is not "
              f"retrained)", flush=True)
        if a.plan:
            return 0
        code = {k: v for k, v in versions().items() if k in ("git_sha", "git_dirty", "code_hash")}
        data = load_data(budget, protocol) if not a.train_only else None
        command = f"python bench/{prog}.py " + shlex.join(a.argv)
        header = {"kind": "defense-grid", "command": command, "budget": dataclasses.asdict(budget), "protocol": protocol.to_dict(),
                  "grid": [r.definition() for r in grid], "cost_ratio_vs_qat": ratios,
                  "configs": [dataclasses.asdict(c) for c in table_configs()]}
        for seed in seeds:
            seed_jobs = [j for j in wanted if j.seed == seed]
            for j in seed_jobs:  # a seed's trainings back to back, then its attacks
                ensure_trained(j)
            if a.train_only:
                continue
            for j in seed_jobs:
                todo = by_job.get(id(j), [])
                if not todo:
                    continue
                scorer = None
                from qnn.checkpoint import load_torch_file, weights_sha256

                sha = weights_sha256(load_torch_file(j.checkpoint))
                for w in todo:
                    if all(is_done(cells.get(k), j, sha, w.member) for k in w.keys()):
                        continue
                    scorer = scorer or Scorer(j, budget, data, device)
                    new = run_work(w, scorer, budget, protocol, data, code)
                    cells.update(new)
                    atomic_write_json(res_path, {**header, "cells": cells})
                    for k, c in new.items():
                        print(f"  {k}: ASR {c['asr_pct']:.1f}  clean {c['clean_acc_pct']:.1f}  ({c['seconds']:.0f} s)",
                              flush=True)
                if scorer is not None:
                    write_report(res_path, {**header, "cells": cells}, command)
        if cells and not a.train_only:
            write_report(res_path, {**header, "cells": cells}, command)
    return 0


def write_report(res_path: Path, results: dict, command: str) -> None:
    """`<out>.md` and `<out>.png` from the results (also `python bench/render_docs.py`'s source)."""
    from qnn.checkpoint import atomic_write_bytes
    from qnn.defense_report import markdown, plot, summarize

    s = summarize(results)
    atomic_write_bytes(res_path.with_suffix(".md"), markdown(s, results, command).encode())
    plot(s, str(res_path.with_suffix(".png")))


def _rate(cells: dict) -> float:
    """Image-steps per second of the finished attacks (each crafted patch once), or a default for a new file."""
    seen, steps, secs = set(), 0, 0.0
    for c in cells.values():
        k = (c["row"], c["seed"], c["config"], c["attack"], c["crafted_at"])
        if k not in seen:
            seen.add(k)
            steps, secs = steps + c["image_steps"], secs + c["seconds"]
    return steps / secs if secs > 0 else 250.0

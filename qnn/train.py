"""QAT training: fixed precision or DBWT over a bit-width set, plain or with a defense.

Runbook:
  single process:   qnn train --model resnet20 --dataset cifar10 --data-dir ../shared/data/cifar10 \
                        --init ../shared/data/weights/resnet20-12fca82f.th --bits 2,4,8,32 --epochs 3 --out runs/sw
  resume:           the same command plus --resume (continues from the last finished epoch, same final weights)
  data parallel:    torchrun --nproc_per_node 2 -m qnn.cli train ...   (gloo on CPU, nccl on GPU; the bit-width
                    of each step is drawn from (seed, step), so every rank runs the same precision)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn import __version__
from qnn.checkpoint import (atomic_torch_save, atomic_write_json, load_checkpoint, load_float_weights, load_torch_file,
                            save_checkpoint)
from qnn.config import TrainConfig
from qnn.data import ArrayDataset, iterate_batches, model_fit_kwargs, train_test_sets
from qnn.errors import QNNError
from qnn.layers import FLOAT_BITS, precision, remember_init_, set_bit_width_
from qnn.models import create_model
from qnn.outputs import StagedDir


def versions() -> dict:
    import onnxruntime

    try:
        import brevitas

        bv = brevitas.__version__
    except Exception:  # brevitas is optional at run time
        bv = None
    import subprocess

    here = Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=5).stdout.strip() or None
        # tracked files that differ from that commit: the SHA alone then does not name the code that ran
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=here, timeout=10).stdout.strip()) if sha else None
    except Exception:
        sha, dirty = None, None
    return {"qnn": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "brevitas": bv,
            "numpy": np.__version__, "python": platform.python_version(), "git_sha": sha, "git_dirty": dirty,
            "code_hash": code_hash(here.parent)}


def code_hash(root: Path, folders=("qnn", "export", "kernels", "bench")) -> str:
    """sha256 (first 12 hex digits) over the Python sources of the project's folders under `root`, names included:
    names the code that produced a result even where git's record is missing or stale (a copied working tree)."""
    import hashlib

    h = hashlib.sha256()
    for folder in folders:
        for f in sorted((root / folder).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


class BitSchedule:
    """DBWT: which bit-width a step runs at. Draws depend only on (seed, step): identical on every DDP rank."""

    def __init__(self, bits: list[int], kind: str, seed: int, total_steps: int):
        self.bits, self.kind, self.seed, self.total = list(bits), kind, seed, max(total_steps, 1)

    def __call__(self, step: int) -> int:
        if len(self.bits) == 1 or self.kind == "fixed":
            return self.bits[0]
        if self.kind == "round_robin":
            return self.bits[step % len(self.bits)]
        if self.kind == "curriculum":
            # High-to-low: the allowed set grows from the widest to all bit-widths over the first half of training,
            # then uniform over all. Our choice (TriQDef's curriculum has no public schedule).
            order = sorted(self.bits, reverse=True)
            k = 1 + int(min(1.0, step / (0.5 * self.total)) * (len(order) - 1) + 1e-9)
            return random.Random(self.seed * 1_000_003 + step).choice(order[:k])
        return random.Random(self.seed * 1_000_003 + step).choice(self.bits)


def load_teacher(cfg: TrainConfig, num_classes: int, device: str) -> nn.Module | None:
    """The frozen float teacher of --distill (a qnn checkpoint or an akamaster float checkpoint), run at 32 bits."""
    if not cfg.distill:
        return None
    from dataclasses import replace

    path = cfg.init if cfg.distill == "init" else cfg.distill
    teacher = init_model(replace(cfg, init=path, residual_bits=None), num_classes).to(device)
    set_bit_width_(teacher, FLOAT_BITS)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_loss(ce: torch.Tensor, logits: torch.Tensor, t_logits: torch.Tensor, alpha: float, temp: float) -> torch.Tensor:
    """(1-alpha) CE + alpha T^2 KL(softmax(t/T) || softmax(s/T)) (Hinton et al. 2015)."""
    kl = F.kl_div(F.log_softmax(logits / temp, 1), F.log_softmax(t_logits / temp, 1), reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * temp * temp * kl


def init_model(cfg: TrainConfig, num_classes: int | None, in_size: int | None = None) -> nn.Module:
    """The model of `cfg` (num_classes None: a user's model decides, by its head or its factory's default)."""
    kw = {"num_classes": num_classes, "first_last_bits": cfg.first_last_bits, "reduce_range": cfg.reduce_range}
    if cfg.residual_bits is not None:
        kw["residual_bits"] = cfg.residual_bits
    if in_size is not None:  # a user's model does not say what images it takes, nor a 224x224 model at another size
        kw["in_size"] = in_size
    if cfg.init:
        obj = load_torch_file(cfg.init)
        if isinstance(obj, dict) and obj.get("format", "").startswith("qnn-checkpoint"):
            model, _ = load_checkpoint(cfg.init, expect_arch=cfg.model, user_model=cfg.model)
            return model
        model = create_model(cfg.model, **kw)
        return load_float_weights(model, cfg.init)
    return create_model(cfg.model, **kw)


@torch.no_grad()
def evaluate(model: nn.Module, ds: ArrayDataset, bits_list: list[int], batch_size: int = 256,
             device: str = "cpu") -> dict[int, float]:
    """Clean top-1 accuracy (%) at each bit-width."""
    model.eval()
    out = {}
    for b in bits_list:
        correct = 0
        with precision(model, b):
            for xb, yb in iterate_batches(ds, batch_size, shuffle=False, aug=False):
                correct += (model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
        out[b] = 100.0 * correct / len(ds)
    return out


@torch.no_grad()
def calibrate_(model: nn.Module, ds: ArrayDataset, bits: int, n_batches: int = 20, batch_size: int = 128,
               device: str = "cpu") -> None:
    """Give an untrained bit-width its BatchNorm statistics and quantizer scales (cumulative BN average)."""
    with precision(model, bits):
        _calibrate_at_current(model, ds, n_batches, batch_size, device)


def _calibrate_at_current(model: nn.Module, ds: ArrayDataset, n_batches: int, batch_size: int, device: str) -> None:
    model.train()
    bns = [m.bn for m in model.modules() if isinstance(getattr(m, "bns", None), nn.ModuleList)]  # per-bit-width BN
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    # the scale init samples activations with torch's global RNG: seed it here, so that a left-out bit-width's
    # calibration does not depend on what ran before it (the caller's RNG state is restored afterwards)
    with torch.random.fork_rng(devices=[] if str(device).startswith("cpu") else None):
        torch.manual_seed(1234)
        for i, (xb, _) in enumerate(iterate_batches(ds, batch_size, shuffle=True, aug=False, seed=1234)):
            if i >= n_batches:
                break
            model(xb.to(device))
    for bn, m in zip(bns, saved):
        bn.momentum = m
    model.eval()


def _dist_info() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


RESUME_IGNORED = ("out_dir", "resume", "overwrite", "progress", "threads", "device", "compile", "eval_every")


def check_resume_config(saved: dict, now: dict, where: Path, ignored: tuple = RESUME_IGNORED) -> None:
    """A resumed run must have the settings it started with (operational keys aside): name the keys that differ."""
    diff = sorted(k for k in set(saved) | set(now) if k not in ignored and saved.get(k) != now.get(k))
    if diff:
        shown = ", ".join(f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in diff)
        raise QNNError(f"--resume: {where} was started with other settings: {shown}; resume with the same settings "
                       f"or start again with --overwrite")


def run_inputs(cfg: TrainConfig, train_ds: ArrayDataset, test_ds: ArrayDataset) -> dict[str, str]:
    """What a run depends on beyond its settings, as sha256: the images and labels it trains and tests on (a folder
    whose files changed under the same --data-dir), and the files it starts from (the user-model file, --init,
    --distill)."""
    import hashlib

    from qnn.checkpoint import sha256_file
    from qnn.models import is_user_model
    from qnn.models.registry import user_model_parts

    def data_sha(ds: ArrayDataset) -> str:
        h = hashlib.sha256(np.ascontiguousarray(ds.x).tobytes())
        h.update(np.ascontiguousarray(ds.y).tobytes())
        return h.hexdigest()

    out = {"train_data": data_sha(train_ds), "test_data": data_sha(test_ds)}
    if is_user_model(cfg.model):
        out["model_file"] = user_model_parts(cfg.model)[2]
    for key, path in (("init", cfg.init), ("distill", cfg.init if cfg.distill == "init" else cfg.distill)):
        if path:
            out[key] = sha256_file(path)
    return out


def read_run_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QNNError(f"--resume: {path} is not readable ({type(e).__name__}); start anew with --overwrite") from None
    if not isinstance(info, dict):
        raise QNNError(f"--resume: {path} is not a run's record; start anew with --overwrite")
    return info


def check_resume_inputs(saved, now: dict[str, str], where: Path) -> None:
    """A resumed run must read the same data and files it started from: name those that changed."""
    if saved is None:  # states written before inputs were recorded: say so rather than pretend they were checked
        print(f"note: {where} records no fingerprints of its data and files (an earlier version wrote it); "
              f"they are not checked", file=sys.stderr)
        return
    if not isinstance(saved, dict):
        raise QNNError(f"--resume: {where}: its record of inputs is not a mapping; start anew with --overwrite")
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        names = {"train_data": "the training images", "test_data": "the test images", "model_file": "the model file",
                 "init": "--init", "distill": "--distill"}
        raise QNNError(f"--resume: {where} was started on other inputs: {', '.join(names.get(k, k) for k in changed)} "
                       f"changed since; resume with the same ones or start anew with --overwrite")


def check_resume_state(st: dict, cfg: TrainConfig, where: Path) -> None:
    """The epoch and history of a training state must be ones this run can have written."""
    ep, hist = st["epoch"], st["history"]
    if isinstance(ep, bool) or not isinstance(ep, int) or not 1 <= ep <= cfg.epochs:
        raise QNNError(f"--resume: {where} says epoch {ep!r}; a state of this {cfg.epochs}-epoch run is at epoch "
                       f"1..{cfg.epochs}")
    if not isinstance(hist, list) or len(hist) != ep or any(
            not isinstance(r, dict) or r.get("epoch") != i + 1 for i, r in enumerate(hist)):
        raise QNNError(f"--resume: {where}: its history does not record epochs 1..{ep} in order")


def train(cfg: TrainConfig) -> dict:
    """Train per `cfg`; returns the final metrics dict (also written to out_dir/metrics.json)."""
    from qnn.defenses import make_defense

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        set_deterministic()
    rank, world = _dist_info()
    device = _device(cfg)
    inputs = (cfg.init, cfg.distill if cfg.distill != "init" else None, cfg.data_dir)
    stage = StagedDir(cfg.out_dir, cfg.overwrite, cfg.resume, "training run", marker="last.pt", inputs=inputs,
                      lock=rank == 0)
    with contextlib.ExitStack() as held:
        failure = None
        try:  # everything is validated (outputs, data, model, defense, teacher) before any output is touched
            if rank == 0:
                held.enter_context(stage)  # the lock, and the decision what to write into
            torch.manual_seed(cfg.seed)
            model = init_model(cfg, **model_fit_kwargs(cfg)).to(device)  # classes and size known before any image
            train_ds, test_ds = train_test_sets(cfg, model)  # made or read to fit the model; a mismatch is one line
            defense = make_defense(cfg.defense, cfg.defense_args, cfg, model)
            teacher = load_teacher(cfg, len(train_ds.classes), device)
            if rank == 0:
                stage.prepare()
        except QNNError as e:
            failure = e
        if not all_ranks_ok(failure is None, world):  # a rank that failed alone must not leave the others waiting
            raise failure or QNNError("another data-parallel rank could not start (see its message)")
        if rank != 0:
            stage.follow()
        result = _train_in(cfg, stage, model, defense, teacher, train_ds, test_ds, rank, world, device)
        if rank == 0:
            stage.publish()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def set_deterministic() -> None:
    """Deterministic kernels everywhere (an op without one raises instead of running nondeterministically): a GPU run
    then repeats to the last digit, as CPU runs do anyway. cuBLAS needs its workspace setting before CUDA starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def all_ranks_ok(ok: bool, world: int) -> bool:
    """True when `ok` holds on every data-parallel rank (an all-reduce; just `ok` in a single process)."""
    if world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _train_in(cfg: TrainConfig, stage: StagedDir, model: nn.Module, defense, teacher, train_ds: ArrayDataset,
              test_ds: ArrayDataset, rank: int, world: int, device: str) -> dict:
    """The training loop, writing into the staged folder `stage.work`."""
    out = stage.work

    steps_per_epoch = math.ceil(len(train_ds) // world / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched_bits = BitSchedule(cfg.bits, cfg.schedule, cfg.seed, total)
    # No weight decay on quantizer scales (log domain) would be cleaner; decay on them is small, kept for simplicity.
    lr_at = lambda step: cfg.lr * (min(1.0, (step + 1) / (cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs else 1.0) \
        * 0.5 * (1 + math.cos(math.pi * step / total))  # noqa: E731

    start_epoch, history, st = 0, [], None
    inputs = run_inputs(cfg, train_ds, test_ds)
    if stage.resuming:
        st = load_torch_file(out / "last.pt") if (out / "last.pt").is_file() else None
        if st is not None and (not isinstance(st, dict) or not {"state_dict", "optimizer", "epoch", "history"} <= set(st)):
            raise QNNError(f"--resume: {out / 'last.pt'} is not a training state (state_dict, optimizer, epoch)")
        info = st or {}
        if not info.get("config") and (out / "config.json").is_file():  # killed before its first epoch ended
            info = read_run_info(out / "config.json")
        if info.get("config"):
            check_resume_config(info["config"], cfg.to_dict(), out)
            check_resume_inputs(info.get("inputs"), inputs, out)
        if st is not None:
            check_resume_state(st, cfg, out / "last.pt")
    # the optimizer is made after the model's state is loaded: Brevitas re-creates quantizer modules (and so their
    # scale parameters) on load_state_dict, and an optimizer made before would update the discarded ones
    opt = None
    if stage.resuming and st is not None:
        try:
            model.load_state_dict(st["state_dict"])
            opt = make_optimizer(cfg, model, defense)
            opt.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise QNNError(f"--resume: {out / 'last.pt'} does not fit this model: "
                           f"{' '.join(str(e).split())[:200]}") from None
        try:
            defense.load_state_dict(st.get("defense") or {})
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise QNNError(f"--resume: {out / 'last.pt'}: the {cfg.defense} defense state is not one this run wrote "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
        start_epoch, history = st["epoch"], st["history"]
    opt = opt or make_optimizer(cfg, model, defense)

    if start_epoch == 0:
        xb0, _ = next(iterate_batches(train_ds, cfg.batch_size, True, False, cfg.seed, 0, rank, world))
        init_scales_(model, cfg.bits, xb0.to(device))
    if cfg.compile:
        remember_init_(model)  # compiled code that reads a quantizer's init flags breaks its graph there
    train_model: nn.Module = torch.compile(model) if cfg.compile else model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    run_info = {"config": cfg.to_dict(), "inputs": inputs, "versions": versions(), "world_size": world,
                "device": device}
    if rank == 0:
        atomic_write_json(out / "config.json", run_info)
    show = cfg.progress and rank == 0
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 10_007 + epoch)  # scale-init subsampling etc.: same per epoch on resume
        model.train()
        t0 = time.perf_counter()
        loss_sum, n_seen, correct = 0.0, 0, 0
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for i, (xb, yb) in enumerate(iterate_batches(train_ds, cfg.batch_size, True, True, cfg.seed, epoch, rank, world)):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            bits = defense.choose_bits(step, sched_bits(step))
            xb, yb = xb.to(device), yb.to(device)
            loss, logits = train_step(model, train_model, defense, opt, xb, yb, bits, step, teacher, cfg)
            loss_val = loss.item()
            if not all_ranks_ok(math.isfinite(loss_val), world):
                raise QNNError(f"training diverged: loss is {loss_val} at epoch {epoch + 1}, step {i + 1} ({bits} bits, "
                               f"lr {lr_at(step):.3g}); no model.pt written, the last finished epoch stays in {out}")
            loss_sum += loss_val * len(yb)
            n_seen += len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(bits=bits, loss=f"{loss_sum / n_seen:.3f}", acc=f"{100 * correct / n_seen:.1f}")
        if bar is not None:
            bar.close()
        sec = time.perf_counter() - t0
        eval_bits = cfg.eval_bits or cfg.bits
        due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        acc = evaluate(model, test_ds, eval_bits, device=device) if rank == 0 and due else {}
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(n_seen, 1), "train_acc": 100 * correct / max(n_seen, 1),
               "test_acc": {str(k): v for k, v in acc.items()}, "epoch_seconds": sec}
        history.append(rec)
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs} loss {rec['train_loss']:.4f} " +
                  " ".join(f"acc@{k}={v:.2f}" for k, v in acc.items()) + f" ({sec:.1f}s)", flush=True)
            atomic_torch_save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                               "history": history, "defense": defense.state_dict(), "config": cfg.to_dict(),
                               "inputs": inputs},
                              out / "last.pt")
            atomic_write_json(out / "metrics.json", {**run_info, "history": history})
    final = history[-1] if history else {}
    if rank == 0:
        save_checkpoint(out / "model.pt", model, {"trained_bits": cfg.bits, "defense": cfg.defense,
                                                  "dataset": cfg.dataset, "final": final, "config": cfg.to_dict(),
                                                  "inputs": run_info["inputs"]})
    return {**run_info, "history": history, "final": final}


def make_optimizer(cfg: TrainConfig, model: nn.Module, defense) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum over the model's and the defense's parameters."""
    params = list(model.parameters()) + defense.extra_parameters()
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def init_scales_(model: nn.Module, bits: list[int], xb: torch.Tensor) -> None:
    """Initialise every trained bit-width's quantizer scales on one batch, so even a bit-width the schedule has not
    drawn yet is usable (and the draw order does not change the initial scales)."""
    from qnn.layers import ensure_calibrated_

    for b in bits:
        with precision(model, b):
            ensure_calibrated_(model, xb)


def train_step(model: nn.Module, train_model: nn.Module, defense, opt: torch.optim.Optimizer, xb: torch.Tensor,
               yb: torch.Tensor, bits: int, step: int, teacher: nn.Module | None = None,
               cfg: TrainConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step at `bits` with the defense's loss (and distillation when a teacher is given)."""
    with precision(model, bits):
        loss, logits = defense.loss(train_model, xb, yb, bits, step)
        if teacher is not None and bits != FLOAT_BITS:
            with torch.no_grad():
                t_logits = teacher(xb)
            loss = distill_loss(loss, logits, t_logits, cfg.distill_alpha, cfg.distill_temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    defense.after_step()
    return loss, logits


def ce_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(xb)
    return F.cross_entropy(logits, yb), logits


__all__ = ["train", "train_step", "evaluate", "calibrate_", "BitSchedule", "FLOAT_BITS"]

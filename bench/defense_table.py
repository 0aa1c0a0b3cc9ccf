"""The defense table: none / PBAT / DWQ / QADT-R (and ablations) from the same start, same epochs, same data,
evaluated with the attack suite per bit-width.

    python bench/defense_table.py --budget smoke   # minutes on a CPU (CI-sized: small CNN, synthetic data)
    python bench/defense_table.py --budget cpu     # ResNet-20 from the shared pretrained weights on the shared CIFAR-10
    python bench/defense_table.py --budget full    # paper-scale, for a GPU (--device auto picks CUDA when present)

Per defense and bit-width (trained {32,8,4,2}; left out {3,5,6}, BN re-calibrated): clean accuracy, seen-patch ASR
(the training configuration: 6x6 square, random placement), unseen-patch ASR (mean over other sizes / shapes /
placement), adaptive ASR (EOT over the defender's bit-widths), a transfer matrix, and training seconds per epoch
relative to plain QAT. Resumable: finished trainings and evaluations are reused. Writes
results/defense_table_<budget>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.attacks.ensemble import ENSEMBLE, ensemble_asr  # noqa: E402
from qnn.attacks.suites import label, patch_settings  # noqa: E402
from qnn.bench.common import environment, markdown_table, save_figure  # noqa: E402

BUDGETS = {
    "smoke": dict(model="small_cnn", dataset="synthetic", data_dir=None, init=None, epochs=1, n_synthetic=600,
                  train_subset=None, batch_size=64, lr=0.05, n_eval=64, n_attack=64, patch_iters=5, patch_batch=32,
                  attack_iters=3, attacks=("sign 0.05", "adam 0.05"), unseen=("10x10 sq", "6.25% circ", "8x8 sq fixed"),
                  eval_bits=[32, 8, 4, 2], left_out=[3], ablations=False, pbat_iters=3, dwq_steps=2, transfer=False,
                  cost_steps=4),
    "cpu": dict(model="resnet20", dataset="cifar10", data_dir="../shared/data/cifar10",
                init="../shared/data/weights/resnet20-12fca82f.th", epochs=1, n_synthetic=None, train_subset=20000,
                batch_size=128, lr=0.02, n_eval=2000, n_attack=500, patch_iters=40, patch_batch=64,
                attack_iters=500, attacks=None, unseen=None,
                eval_bits=[32, 8, 4, 2], left_out=[3, 5, 6], ablations=True, pbat_iters=5, dwq_steps=3, transfer=True,
                cost_steps=40),
    "full": dict(model="resnet20", dataset="cifar10", data_dir="../shared/data/cifar10",
                 init="../shared/data/weights/resnet20-12fca82f.th", epochs=30, n_synthetic=None, train_subset=None,
                 batch_size=128, lr=0.05, n_eval=10000, n_attack=2000, patch_iters=500, patch_batch=128,
                 attack_iters=1000, attacks=None, unseen=None,
                 eval_bits=[32, 8, 4, 2], left_out=[3, 5, 6], ablations=True, pbat_iters=25, dwq_steps=7, transfer=True,
                 cost_steps=100),
}
# the patch configurations, defined once (qnn/configs/suite_*.yaml, shared with `qnn attack --suite`)
SEEN = patch_settings("seen")[0]
UNSEEN = patch_settings("unseen")


def unseen_of(b: dict) -> list[dict]:
    """The budget's unseen configurations: the whole suite (`unseen` None) or the named ones (smoke: three, because
    the optimised placement alone searches every position of every image)."""
    if b["unseen"] is None:
        return UNSEEN
    by_label = {label(u): u for u in UNSEEN}
    return [by_label[n] for n in b["unseen"]]


def ensemble_of(b: dict) -> tuple:
    """The budget's evaluation attacks: the whole ensemble (`attacks` None) or the named ones (smoke: two, fast)."""
    if b["attacks"] is None:
        return ENSEMBLE
    by_name = {a.name: a for a in ENSEMBLE}
    return tuple(by_name[n] for n in b["attacks"])


def unseen_each(entry: dict, bits: str, i: int) -> str:
    """One defense's ASR on unseen configuration i at `bits`, formatted ('-' where not measured)."""
    each = entry["per_bits"].get(bits, {}).get("unseen_asr_pct_each")
    return f"{each[i]:.1f}" if each else "-"


#: defenses trained as one fixed-precision model per evaluated bit-width (the spec's PBAT: "at one fixed bit-width")
PER_BIT = "per-bit"
#: the table's row of one full-precision PBAT model evaluated (deployed) at every bit-width
PBAT_FP = "pbat-fp (one 32-bit model, every bit-width)"


def defenses(b: dict) -> dict[str, tuple[str, dict, list[int] | str]]:
    bits = [2, 4, 8, 32]
    # every defense trains on the seen configuration (6x6 square, random placement)
    d = {"none": ("none", {}, bits), "qadtr": ("qadtr", {"patch_size": SEEN["patch_shape"][0]}, bits),
         # PBAT as the spec has it: one fixed precision; its row at b bits is a PBAT model trained at b bits
         "pbat": ("pbat", {"iters": b["pbat_iters"], "patch_size": SEEN["patch_shape"][0]}, PER_BIT),
         "dwq": ("dwq", {"pgd_steps": b["dwq_steps"]}, bits)}
    if b["ablations"]:
        # ours, stronger than the spec's baseline: PBAT given DBWT (one switchable model, random bit-width per step)
        d["pbat+dbwt"] = ("pbat", {"iters": b["pbat_iters"], "patch_size": SEEN["patch_shape"][0]}, bits)
        # the spec's other reading of PBAT ("at one fixed bit-width or full precision") and, we think, the abstract's
        # "quantization shift": one full-precision PBAT model deployed at every bit-width (BN re-calibrated at each,
        # as for left-out bit-widths); its adaptive attack is EOT over the bit-widths it is deployed at
        d[PBAT_FP] = ("pbat", {"iters": b["pbat_iters"], "patch_size": SEEN["patch_shape"][0]}, [32], {"deploy": True})
        d["qadtr-no-aqapa"] = ("qadtr", {"no_aqapa": True}, bits)
        d["qadtr-no-gir"] = ("qadtr", {"no_gir": True}, bits)
        d["qadtr-fixed4 (no DBWT)"] = ("qadtr", {}, [4])
        # QADT-R's adversary in PBAT's setting: one fixed-precision model per bit-width (no DBWT, hence no GIR)
        d["qadtr-per-bit (no DBWT)"] = ("qadtr", {}, PER_BIT)
        # PBAT at about QADT-R's training cost (2 inner steps instead of pbat_iters)
        d["pbat-2steps (cost-matched)"] = ("pbat", {"iters": 2, "patch_size": SEEN["patch_shape"][0]}, bits)
        # QADT-R given (less than) the training compute of the spec's PBAT, which needs one model per bit-width:
        # 4 epochs x ~1.5 QAT epochs each, against 4 models x ~2.3 QAT epochs (the table's last column)
        d["qadtr-4epochs (less compute than pbat)"] = ("qadtr", {"patch_size": SEEN["patch_shape"][0]}, bits,
                                                          {"epochs": 4 * b["epochs"]})
    return d


#: training settings a sweep setting may change from the budget's (`train: {lr: 0.05}` in a grid file)
TRAIN_OVERRIDES = ("lr", "schedule", "residual_bits", "warmup_epochs")


def budget_config(b: dict, dname: str, dargs: dict, bits: list[int], epochs: int, threads: int, device: str,
                  seed: int = 0, out_dir: str = "unused", train_over: dict | None = None):
    """The TrainConfig of one defense under the budget's settings (`train_over`: some of TRAIN_OVERRIDES changed)."""
    from qnn.config import TrainConfig

    kw = dict(model=b["model"], dataset=b["dataset"], data_dir=b["data_dir"], init=b["init"], bits=bits,
              epochs=epochs, lr=b["lr"], batch_size=b["batch_size"], n_synthetic=b["n_synthetic"],
              train_subset=b["train_subset"], test_subset=b["n_eval"], out_dir=out_dir, resume=True,
              seed=seed, defense=dname, defense_args=dargs, threads=threads, progress=sys.stderr.isatty(),
              device=device)
    return TrainConfig(**{**kw, **(train_over or {})})


def train_defense(b: dict, rdir, dname: str, dargs: dict, bits: list[int], epochs: int, threads: int, device: str,
                  seed: int = 0, train_over: dict | None = None) -> None:
    """Train one defense model with the budget's settings into rdir (resumable)."""
    from qnn.train import train

    train(budget_config(b, dname, dargs, bits, epochs, threads, device, seed, str(rdir), train_over))


def interleaved_cost(b: dict, names: dict, threads: int, device: str) -> dict[str, float]:
    """Seconds per epoch vs plain QAT of QADT-R and of one PBAT model (at 4 bits), measured interleaved: the same
    `cost_steps` batches, one step of each in turn (bench/defense_cost.py --steps), so machine drift between the
    table's trainings does not enter the ratio."""
    from qnn.bench.defense_cost import interleaved

    rows = {"none": names["none"][:3], "qadtr": names["qadtr"][:3], "pbat (one 4-bit model)": names["pbat"][:2] + ([4],)}
    cfgs = [budget_config(b, d, a, (bits if bits != PER_BIT else [4]), 1, threads, device) for d, a, bits in rows.values()]
    secs = interleaved(cfgs, b["cost_steps"], warmup=min(3, b["cost_steps"] // 4))
    return {n: s / secs[0] for n, s in zip(rows, secs)}


def evaluate_defense(model, trained_bits, b, data, seed=0, left_out=True, eval_bits=None, device="cpu",
                     adaptive_bits=None) -> dict:
    """Clean accuracy, seen / unseen / adaptive ASR per bit-width (BN re-calibrated at bit-widths not trained).
    Seen and unseen ASR are the worst over the budget's attack ensemble (each attack's ASR is kept beside it); the
    ensemble's EOT attack and the adaptive patch are EOT over `adaptive_bits` (default: the trained bit-widths, the
    defender's distribution)."""
    from qnn.attacks.patch import PatchConfig, evaluate_patch, optimize_universal_patch
    from qnn.layers import set_bit_width_
    from qnn.train import calibrate_, evaluate

    xa, ya, xe, ye, test_ds, train_ds = data
    out = {}
    eval_bits = list(eval_bits or b["eval_bits"])
    for bits in eval_bits + (b["left_out"] if left_out else []):
        if bits not in trained_bits and bits != 32:
            calibrate_(model, train_ds, bits, device=device)
        r = {"clean_acc_pct": evaluate(model, test_ds, [bits], device=device)[bits]}

        def asr(pc: dict) -> dict:
            # the worst case over the ensemble: a defense that defeats one optimiser is not robust to the patch
            base = PatchConfig(batch_size=b["patch_batch"], seed=seed, **pc)
            return ensemble_asr(model, bits, (xa, ya), (xe, ye), base, b["attack_iters"],
                                trained_bits=list(adaptive_bits or trained_bits), attacks=ensemble_of(b), device=device)

        seen, unseen = asr(SEEN), [asr(u) for u in unseen_of(b)]
        r["seen_asr_pct"], r["seen_per_attack"] = seen["asr_pct"], seen["per_attack"]
        r["unseen_asr_pct_each"] = [u["asr_pct"] for u in unseen]
        r["unseen_per_attack"] = [u["per_attack"] for u in unseen]
        r["unseen_asr_pct"] = sum(r["unseen_asr_pct_each"]) / len(unseen)
        out[str(bits)] = r
        print(f"  {bits} bits: clean {r['clean_acc_pct']:.1f}  seen {r['seen_asr_pct']:.1f}  unseen {r['unseen_asr_pct']:.1f}", flush=True)
    # adaptive: EOT over the defender's bit-width distribution, evaluated at every trained bit-width
    cfg = PatchConfig(iterations=b["attack_iters"], optimizer="adam", batch_size=b["patch_batch"], seed=seed,
                      eot_bits=list(adaptive_bits or trained_bits), **SEEN)
    patch, _ = optimize_universal_patch(model, xa, ya, cfg, device=device)
    for bits in eval_bits:
        set_bit_width_(model, bits)
        out[str(bits)]["adaptive_asr_pct"] = evaluate_patch(model, xe, ye, patch, cfg, device=device)["asr_pct"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="smoke", help="smoke (small CNN, synthetic data, 1 epoch: CPU minutes), cpu "
                    "(ResNet-20 from the shared pretrained weights, 1 epoch on 20000 CIFAR-10 images) or full "
                    "(ResNet-20, 30 epochs on all of CIFAR-10: for a GPU) (default smoke)")
    ap.add_argument("--runs-dir", default=None, help="folder of the trained models and their evaluations, reused when "
                    "rerun (default runs/defense_table_BUDGET)")
    ap.add_argument("--out", default=None, help="results path without extension (.json, .md and .png are written; "
                    "default results/defense_table_BUDGET)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda: training and attacks")
    ap.add_argument("--only", help="comma-separated defense names to run")
    ap.add_argument("--reuse", metavar="JSON", help="an earlier results JSON of this program: take the rows named by "
                    "--reuse-names from it instead of re-running them (marked in the output with that run's git SHA and CPU)")
    ap.add_argument("--reuse-names", default="", help="comma-separated defense names to take from --reuse")
    a = ap.parse_args(argv)
    if a.budget not in BUDGETS:
        print(f"defense_table: error: unknown budget '{a.budget}'; choose from {', '.join(BUDGETS)}", file=sys.stderr)
        return 2
    import torch

    from qnn.attacks.transfer import transfer_matrix
    from qnn.attacks.patch import PatchConfig
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
    from qnn.data import load_dataset
    from qnn.errors import QNNError

    torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    b = BUDGETS[a.budget]
    runs = Path(a.runs_dir or f"runs/defense_table_{a.budget}")
    out = a.out or f"results/defense_table_{a.budget}"
    try:
        test_ds = load_dataset(b["dataset"], "test", b["data_dir"], n_synthetic=b["n_synthetic"])
        train_ds = load_dataset(b["dataset"], "train", b["data_dir"], n_synthetic=b["n_synthetic"])
    except QNNError as e:
        print(f"defense_table: error: {e}", file=sys.stderr)
        return 2
    ev = test_ds.subset(b["n_eval"])
    xe, ye = ev.tensors()
    xa, ya = train_ds.subset(b["n_attack"], start=len(train_ds) - b["n_attack"]).tensors()
    data = (xa, ya, xe, ye, ev, train_ds)
    table = {}
    names = defenses(b)
    if a.only:
        names = {k: v for k, v in names.items() if k in a.only.split(",")}
    reused: dict[str, dict] = {}
    if a.reuse:
        try:
            old = json.loads(Path(a.reuse).read_text())
        except (OSError, ValueError) as e:
            print(f"defense_table: error: cannot read --reuse file {a.reuse}: {e}", file=sys.stderr)
            return 2
        if old.get("budget") != a.budget:
            print(f"defense_table: error: --reuse file is budget {old.get('budget')!r}, not {a.budget!r}", file=sys.stderr)
            return 2
        old_base = old["table"].get("none", {}).get("epoch_seconds")
        env = old.get("environment", {})
        for n in [v for v in a.reuse_names.split(",") if v]:
            if n not in old["table"] or n not in names:
                print(f"defense_table: error: --reuse-names: no row '{n}' in {a.reuse} or in this budget", file=sys.stderr)
                return 2
            e = dict(old["table"][n])
            if "reused_from" in e:  # already a reused row: keep its provenance and cost
                reused[n] = e
                continue
            e["cost_vs_qat"] = e["epoch_seconds"] / old_base if old_base else None
            e["reused_from"] = {"file": a.reuse, "git_sha": env.get("git_sha"), "cpu_model": env.get("cpu_model"),
                                "isa_flags": env.get("isa_flags")}
            reused[n] = e
        if "none" in reused:
            print("defense_table: error: re-run 'none' (it is the cost and accuracy reference)", file=sys.stderr)
            return 2
    def rdir_of(name: str) -> Path:
        return runs / name.replace(" ", "_").replace("(", "").replace(")", "")

    # training jobs: a per-bit defense is one fixed-precision model per evaluated bit-width ("name@bits")
    jobs: dict[str, tuple[str, dict, list[int], str]] = {}
    epochs_of = {name: (spec[3] if len(spec) > 3 else {}).get("epochs", b["epochs"]) for name, spec in names.items()}
    deploy_of = {name: bool((spec[3] if len(spec) > 3 else {}).get("deploy")) for name, spec in names.items()}
    for name, (dname, dargs, bits, *_) in names.items():
        if name in reused:
            continue
        if bits == PER_BIT:
            for eb in b["eval_bits"]:
                jobs[f"{name}@{eb}"] = (dname, dargs, [eb], name)
        else:
            jobs[name] = (dname, dargs, bits, name)
    # phase 1: every training first, back to back, so that seconds per epoch are measured under the same load
    for job, (dname, dargs, bits, name) in jobs.items():
        rdir = rdir_of(job)
        if not (rdir / "model.pt").is_file():
            print(f"== train {job}", flush=True)
            train_defense(b, rdir, dname, dargs, bits, epochs_of[name], a.threads, device)
    # phase 2: the attack suite (ablations and per-bit models: their trained bit-widths only, no transfer matrix)
    for job, (dname, dargs, bits, name) in jobs.items():
        rdir = rdir_of(job)
        res_file = rdir / "eval.json"
        per_bit = job != name
        if res_file.is_file():
            entry = json.loads(res_file.read_text())
        else:
            print(f"== evaluate {job}", flush=True)
            model, obj = load_checkpoint(rdir / "model.pt")
            model = model.to(device)
            hist = json.loads((rdir / "metrics.json").read_text())["history"]
            ablation = name.startswith("qadtr-") or "cost-matched" in name or name == "pbat+dbwt" or per_bit
            entry = {"defense": dname, "defense_args": dargs, "trained_bits": bits, "epochs": epochs_of[name],
                     "epoch_seconds": sum(h["epoch_seconds"] for h in hist) / len(hist),
                     "per_bits": evaluate_defense(model, bits, b, data, left_out=not ablation,
                                                  eval_bits=bits if per_bit else None, device=device,
                                                  adaptive_bits=b["eval_bits"] if deploy_of[name] else None)}
            if deploy_of[name]:
                entry["deployed_bits"] = b["eval_bits"] + b["left_out"]
            if b["transfer"] and not ablation:
                entry["transfer_6x6"] = transfer_matrix(model, xa, ya, xe, ye, PatchConfig(iterations=b["patch_iters"], **SEEN),
                                                        [32, 8, 4, 2], [32, 8, 4, 2], progress=False, device=device)
            atomic_write_json(res_file, entry)
        if not per_bit:
            table[name] = entry
            continue
        # merge the fixed-precision models into one row per bit-width; cost = one model's seconds per epoch (training
        # every bit-width costs len(eval_bits) times that)
        t = table.setdefault(name, {"defense": dname, "defense_args": dargs, "trained_bits": "one fixed-precision model per bit-width",
                                    "epochs": epochs_of[name], "models": {}, "per_bits": {}})
        t["models"][job] = {"epoch_seconds": entry["epoch_seconds"], "run": str(rdir)}
        t["per_bits"].update(entry["per_bits"])
        t["epoch_seconds"] = sum(m["epoch_seconds"] for m in t["models"].values()) / len(t["models"])
    table = {n: (reused[n] if n in reused else table[n]) for n in names if n in reused or n in table}
    cost_il = None
    if b.get("cost_steps") and {"none", "qadtr", "pbat"} <= set(names):
        cost_file = runs / f"cost_interleaved_{b['cost_steps']}.json"
        if cost_file.is_file():
            cost_il = json.loads(cost_file.read_text())
        else:
            print(f"== cost: {b['cost_steps']} interleaved steps each", flush=True)
            cost_il = interleaved_cost(b, names, a.threads, device)
            atomic_write_json(cost_file, cost_il)
    base = table.get("none", {}).get("epoch_seconds")
    rows = []
    for name, e in table.items():
        per_epoch = e["cost_vs_qat"] if e.get("cost_vs_qat") else ((e["epoch_seconds"] / base) if base else None)
        # total training compute in plain-QAT epochs: per-epoch ratio x epochs x models (per-bit defenses: one each)
        total = per_epoch * e.get("epochs", b["epochs"]) * len(e.get("models") or [None]) if per_epoch else None
        for bits, r in e["per_bits"].items():
            rows.append([name, bits, r["clean_acc_pct"], r["seen_asr_pct"], r["unseen_asr_pct"],
                         r.get("adaptive_asr_pct", "-"), per_epoch if per_epoch else "-", total if total else "-"])
    all_bits = [str(x) for x in b["eval_bits"] + b["left_out"]]
    pivot = [[bt] + [table[n]["per_bits"].get(bt, {}).get("unseen_asr_pct", "-") for n in table] for bt in all_bits]
    # the unseen mean hides which configuration a defense fails on: one row per defense, a column per (bits, config)
    unseen = unseen_of(b)
    by_cfg_head = ["defense"] + [f"{bt}b {label(u)}" for bt in b["eval_bits"] for u in unseen]
    by_cfg = [[n] + [unseen_each(e, str(bt), i) for bt in b["eval_bits"] for i in range(len(unseen))]
              for n, e in table.items()]
    md = (f"Defense table, budget `{a.budget}` ({b['model']} on {b['dataset']}, {b['epochs']} epoch(s), "
          f"eval on {b['n_eval']} test images; ASR: the worst of {len(ensemble_of(b))} attacks, {b['attack_iters']} iterations each). "
          f"Command: `python bench/defense_table.py {' '.join(shlex.quote(v) for v in (argv if argv is not None else sys.argv[1:]))}`\n\n"
          "`pbat` is the spec's baseline, PBAT at one fixed precision: its row at b bits is a separate PBAT model trained "
          "at b bits (its cost column is one such model; covering all bit-widths costs that times "
          f"{len(b['eval_bits'])}). `pbat+dbwt` (ours, a stronger baseline) is PBAT given DBWT: one switchable model. "
          + (f"`{PBAT_FP}` is the spec's other reading of PBAT: one PBAT model trained at full precision and deployed "
             "at every bit-width (BatchNorm re-calibrated at each; adaptive patch: EOT over the bit-widths it is "
             "deployed at). " if PBAT_FP in table else "")
          + "The last column is a defense's whole training compute in plain-QAT epochs (per-epoch ratio x epochs x "
          "models).\n\n"
          + "".join(f"Row `{n}` is taken from an earlier run of this program (`{e['reused_from']['file']}`, git "
                    f"{str(e['reused_from']['git_sha'])[:10]}, {e['reused_from']['cpu_model']} "
                    f"{'/'.join(e['reused_from']['isa_flags'] or [])}), not re-run; its cost column is "
                    "relative to that run's QAT.\n\n" for n, e in table.items() if "reused_from" in e)
          + (f"Training cost measured interleaved ({b['cost_steps']} steps of each on the same batches, one step of "
             "each in turn, so that the machine's drift between the trainings below does not enter the ratio): "
             + ", ".join(f"{n} {v:.2f}x" for n, v in cost_il.items()) + " QAT's seconds per epoch. The "
             "table's cost columns come from each training's own wall time.\n\n" if cost_il else "")
          + "Unseen-patch ASR % (mean of 10x10 square, 8x8 circle, fixed-corner 8x8), lower is better:\n\n"
          + markdown_table(["bits"] + list(table), pivot)
          + "\nUnseen-patch ASR % by configuration, trained bit-widths:\n\n" + markdown_table(by_cfg_head, by_cfg)
          + "\nAll figures:\n\n"
          + markdown_table(["defense", "bits", "clean %", "seen ASR %", "unseen ASR %", "adaptive ASR %",
                            "train s/epoch vs QAT", "total train cost (QAT epochs)"], rows))
    print(md)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out + ".json", {"budget": a.budget, "settings": b, "table": table, "cost_interleaved_vs_qat": cost_il,
                                      "environment": environment(a.threads)})
    atomic_write_bytes(out + ".md", md.encode())
    _plot(table, out + ".png")
    return 0


def _plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(table)
    bits = list(next(iter(table.values()))["per_bits"])
    fig, ax = plt.subplots(figsize=(1.2 * len(bits) * max(1, len(names)) / 2 + 3, 3.5))
    w = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        ax.bar(np.arange(len(bits)) + i * w, [table[n]["per_bits"].get(k, {}).get("unseen_asr_pct", np.nan) for k in bits],
               w, label=n)
    ax.set_xticks(np.arange(len(bits)) + 0.4 - w / 2, [f"{k}b" for k in bits])
    ax.set_ylabel("unseen-patch ASR %")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())

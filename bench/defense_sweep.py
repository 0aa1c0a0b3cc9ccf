"""Defense hyper-parameter sweep: train and evaluate a grid of defense settings over several seeds, with the defense
table's settings and attack suite, and report the mean (and spread) per setting.

    python bench/defense_sweep.py --budget cpu --grid bench/sweeps/qadtr.yaml --seeds 0,1
    python bench/defense_sweep.py ... --shard 0/4      # one of 4 worker processes (e.g. 4 at once on one GPU)
    python bench/defense_sweep.py ... --report-only    # aggregate what the workers have finished

A grid file is a YAML list of {name, defense, args: {...}, bits: [..] | per-bit, epochs (optional: other than the
budget's), train: {lr, schedule, residual_bits, warmup_epochs} (optional: training settings other than the
budget's), deploy: true (optional: evaluate the model at every evaluated bit-width, not only those it was trained
at, BatchNorm re-calibrated at the others; its adaptive patch is EOT over all of them)}; `per-bit` trains one
fixed-precision model per evaluated bit-width (the spec's PBAT). Evaluation is the table's (seen / unseen / adaptive universal patches
on the budget's images, trained bit-widths only, no left-out bit-widths or transfer matrices, to keep it short).
Each (setting, seed) is one job; finished trainings and evaluations are reused (resumable). Cost ratios are
seconds per epoch against the sweep's own `none` setting of the same seed, and only mean something when the jobs did
not share the machine (a sharded run on one GPU skews them). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.attacks.suites import label  # noqa: E402
from qnn.bench.common import environment, markdown_table  # noqa: E402
from qnn.bench.defense_table import (BUDGETS, PER_BIT, TRAIN_OVERRIDES, UNSEEN, ensemble_of, evaluate_defense,  # noqa: E402
                                  train_defense, unseen_each, unseen_of)


def load_grid(path: str) -> list[dict]:
    import yaml

    from qnn.errors import QNNError

    p = Path(path)
    if not p.is_file():
        raise QNNError(f"grid file not found: {p}")
    try:
        grid = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise QNNError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(grid, list) or not grid:
        raise QNNError(f"{p}: expected a non-empty list of settings")
    seen = set()
    for g in grid:
        if not isinstance(g, dict) or "name" not in g or "defense" not in g:
            raise QNNError(f"{p}: every setting needs 'name' and 'defense', got {g!r}")
        if slug(g["name"]) in seen:  # two names with one run folder would overwrite each other's runs
            raise QNNError(f"{p}: setting name '{g['name']}' appears twice (or differs from another only in "
                           f"characters its run folder replaces by '_')")
        seen.add(slug(g["name"]))
        g.setdefault("args", {})
        g.setdefault("train", {})
        bad = sorted(set(g["train"]) - set(TRAIN_OVERRIDES)) if isinstance(g["train"], dict) else ["(not a mapping)"]
        if bad:
            raise QNNError(f"{p}: setting '{g['name']}': train may change only {', '.join(TRAIN_OVERRIDES)}, got {', '.join(bad)}")
        g.setdefault("bits", [2, 4, 8, 32])
        if g["bits"] != PER_BIT and not (isinstance(g["bits"], list) and g["bits"]):
            raise QNNError(f"{p}: setting '{g['name']}': bits must be a non-empty list or '{PER_BIT}'")
        g.setdefault("deploy", False)
        if not isinstance(g["deploy"], bool) or (g["deploy"] and g["bits"] == PER_BIT):
            raise QNNError(f"{p}: setting '{g['name']}': deploy must be true or false (and needs a bits list, not "
                           f"'{PER_BIT}'), got {g['deploy']!r}")
        if "epochs" in g and not (isinstance(g["epochs"], int) and g["epochs"] > 0):
            raise QNNError(f"{p}: setting '{g['name']}': epochs must be a positive integer, got {g['epochs']!r}")
    return grid


def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in s)


def jobs_of(grid: list[dict], seeds: list[int], eval_bits: list[int]) -> list[dict]:
    """Seed-major order (every setting once before any second seed), so a cut-short sweep still covers the grid."""
    out = []
    for seed in seeds:
        for g in grid:
            if g["bits"] == PER_BIT:
                for eb in eval_bits:
                    out.append(dict(g, bits=[eb], key=f"{slug(g['name'])}@{eb}/s{seed}", seed=seed, per_bit=True))
            else:
                out.append(dict(g, key=f"{slug(g['name'])}/s{seed}", seed=seed, per_bit=False))
    return out


def _finished(res: Path, args: dict, train_over: dict | None = None, deploy: bool = False) -> dict:
    """A job's recorded evaluation; refused when it was run with other options (a stale folder)."""
    from qnn.errors import QNNError

    done = json.loads(res.read_text())
    was_deployed = bool(done.get("deployed_bits"))
    if done.get("args") != args or done.get("train", {}) != (train_over or {}) or was_deployed != bool(deploy):
        raise QNNError(f"{res.parent} was run with options {done.get('args')} (training {done.get('train', {})}, "
                       f"deploy {was_deployed}), not {args} (training {train_over or {}}, deploy {bool(deploy)}): "
                       "rename the setting or move that folder away")
    return done


def run_job(job: dict, b: dict, data, runs: Path, device: str, threads: int) -> dict:
    from qnn.checkpoint import atomic_write_json, load_checkpoint

    rdir = runs / job["key"]
    res = rdir / "eval.json"
    if res.is_file():
        return _finished(res, job["args"], job.get("train"), job.get("deploy", False))
    if not (rdir / "model.pt").is_file():
        print(f"== train {job['key']}", flush=True)
        train_defense(b, rdir, job["defense"], job["args"], job["bits"], job.get("epochs", b["epochs"]), threads, device,
                      seed=job["seed"], train_over=job.get("train"))
    print(f"== evaluate {job['key']}", flush=True)
    model, _ = load_checkpoint(rdir / "model.pt")
    model = model.to(device)
    hist = json.loads((rdir / "metrics.json").read_text())["history"]
    deploy = bool(job.get("deploy"))
    bits = list(b["eval_bits"]) if deploy else [x for x in job["bits"] if x in b["eval_bits"]]
    entry = {"name": job["name"], "defense": job["defense"], "args": job["args"], "train": job.get("train", {}),
             "trained_bits": job["bits"], "deployed_bits": bits if deploy else None,
             "epochs": job.get("epochs", b["epochs"]),
             "seed": job["seed"], "per_bit": job["per_bit"], "device": device,
             "epoch_seconds": sum(h["epoch_seconds"] for h in hist) / len(hist),
             "per_bits": evaluate_defense(model, job["bits"], b, data, seed=job["seed"], left_out=False,
                                          eval_bits=bits, device=device, adaptive_bits=bits if deploy else None)}
    atomic_write_json(res, entry)
    return entry


def _seeds_found(runs: Path, g: dict, eval_bits: list[int]) -> list[int]:
    keys = {j["key"].split("/")[0] for j in jobs_of([g], [0], eval_bits)}
    return sorted({int(d.name[1:]) for k in keys for d in (runs / k).glob("s*") if d.name[1:].isdigit()})


def aggregate(grid: list[dict], runs: Path, eval_bits: list[int], cost: bool = True,
              seeds: list[int] | None = None, unseen: list[dict] = UNSEEN) -> tuple[dict, str]:
    """Mean over seeds per setting and bit-width; per-bit settings merge their models' rows per seed first. Reads
    exactly the grid's job folders (for `seeds`, all seeds found when None): a folder of another grid that shares a
    setting's name is the same job; one run with other options is refused (as run_job does)."""
    rows: dict[str, dict] = {}
    for g in grid:
        for job in jobs_of([g], seeds if seeds is not None else _seeds_found(runs, g, eval_bits), eval_bits):
            f = runs / job["key"] / "eval.json"
            if not f.is_file():
                continue
            e = _finished(f, g["args"], g.get("train"), g.get("deploy", False))
            r = rows.setdefault(g["name"], {"per_seed": {}})
            ps = r["per_seed"].setdefault(str(job["seed"]), {"per_bits": {}, "epoch_seconds": []})
            ps["per_bits"].update(e["per_bits"])
            ps["epoch_seconds"].append(e["epoch_seconds"])
    metrics = ["clean_acc_pct", "unseen_asr_pct", "seen_asr_pct", "adaptive_asr_pct"]
    summary = {}
    for g in grid:
        if g["name"] not in rows:
            continue
        seeds = rows[g["name"]]["per_seed"]
        s = {"args": g["args"], "bits": g["bits"], "seeds": sorted(seeds, key=int), "per_bits": {}}
        for bt in map(str, eval_bits):
            vals = {m: [ps["per_bits"][bt][m] for ps in seeds.values() if bt in ps["per_bits"]] for m in metrics}
            if vals["unseen_asr_pct"]:
                s["per_bits"][bt] = {m: statistics.fmean(v) for m, v in vals.items()} | {
                    "unseen_asr_sd": statistics.stdev(vals["unseen_asr_pct"]) if len(vals["unseen_asr_pct"]) > 1 else None,
                    "n_seeds": len(vals["unseen_asr_pct"]),
                    # each seed's own figure, so that a seeds table can be rendered from this file
                    "unseen_asr_pct_by_seed": {sd: seeds[sd]["per_bits"][bt]["unseen_asr_pct"]
                                               for sd in s["seeds"] if bt in seeds[sd]["per_bits"]}}
                each = [ps["per_bits"][bt]["unseen_asr_pct_each"] for ps in seeds.values()
                        if "unseen_asr_pct_each" in ps["per_bits"].get(bt, {})]
                if each:  # the unseen mean split by configuration (mean over seeds of each)
                    s["per_bits"][bt]["unseen_asr_pct_each"] = [statistics.fmean(v) for v in zip(*each)]
        # cost: per seed, this setting's mean seconds per epoch over the none setting's of the same seed
        base = rows.get("none", {}).get("per_seed", {})
        ratios = [statistics.fmean(ps["epoch_seconds"]) / statistics.fmean(base[sd]["epoch_seconds"])
                  for sd, ps in seeds.items() if sd in base]
        s["cost_vs_none"] = statistics.fmean(ratios) if ratios and cost else None
        summary[g["name"]] = s
    bits = list(map(str, eval_bits))
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731

    def cell(s, bt, m):
        r = s["per_bits"].get(bt)
        if r is None:
            return "-"
        sd = r.get("unseen_asr_sd") if m == "unseen_asr_pct" else None
        return f"{r[m]:.2f}" + (f" ±{sd:.1f}" if sd is not None else "") + (f" (n={r['n_seeds']})" if m == "unseen_asr_pct" else "")

    md = ("Unseen-patch ASR % (mean over seeds ± sd; lower is better):\n\n"
          + markdown_table(["setting"] + [f"{bt}b" for bt in bits] + (["cost vs none"] if cost else []),
                           [[n] + [cell(s, bt, "unseen_asr_pct") for bt in bits] + ([fmt(s["cost_vs_none"])] if cost else [])
                            for n, s in summary.items()])
          + "\nClean accuracy % / adaptive ASR % (means):\n\n"
          + markdown_table(["setting"] + [f"{bt}b clean" for bt in bits] + [f"{bt}b adaptive" for bt in bits],
                           [[n] + [cell(s, bt, "clean_acc_pct") for bt in bits] + [cell(s, bt, "adaptive_asr_pct") for bt in bits]
                            for n, s in summary.items()])
          + "\nUnseen-patch ASR % by configuration (means over seeds):\n\n"
          + markdown_table(["setting"] + [f"{bt}b {label(u)}" for bt in bits for u in unseen],
                           [[n] + [unseen_each(s, bt, i) for bt in bits for i in range(len(unseen))]
                            for n, s in summary.items()]))
    return summary, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="smoke", help="defense-table budget: smoke (small CNN, synthetic data, 1 "
                    "epoch: CPU minutes), cpu (ResNet-20 from the shared pretrained weights, 1 epoch on 20000 "
                    "CIFAR-10 images) or full (ResNet-20, 30 epochs on all of CIFAR-10: for a GPU) (default smoke)")
    ap.add_argument("--grid", required=True, help="YAML list of settings (see bench/sweeps/)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds; every setting is trained and attacked once "
                    "per seed (default 0,1)")
    ap.add_argument("--runs-dir", default=None, help="folder of the jobs' models and evaluations (SETTING/sSEED), "
                    "reused when rerun (default runs/defense_sweep_BUDGET)")
    ap.add_argument("--out", default=None, help="results path without extension (.json and .md are written by an "
                    "unsharded or --report-only run; default results/screens/defense_sweep_BUDGET)")
    ap.add_argument("--data-dir", default=None, help="override the budget's dataset folder")
    ap.add_argument("--init", default=None, help="override the budget's pretrained weights")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--shard", default="0/1", help="i/n: run jobs i, i+n, i+2n, ... (n worker processes)")
    ap.add_argument("--report-only", action="store_true", help="aggregate finished jobs, train nothing")
    ap.add_argument("--no-cost", action="store_true", help="leave the cost column out (jobs that shared the machine)")
    a = ap.parse_args(argv)
    from qnn.errors import QNNError

    try:
        if a.budget not in BUDGETS:
            raise QNNError(f"unknown budget '{a.budget}'; choose from {', '.join(BUDGETS)}")
        grid = load_grid(a.grid)
        try:
            seeds = [int(v) for v in a.seeds.split(",") if v.strip()]
            i, n = (int(v) for v in a.shard.split("/"))
        except ValueError:
            raise QNNError(f"bad --seeds {a.seeds!r} or --shard {a.shard!r} (want e.g. 0,1 and 0/4)") from None
        if not seeds or not (0 <= i < n):
            raise QNNError(f"need at least one seed and 0 <= i < n in --shard, got {a.seeds!r}, {a.shard!r}")
        b = dict(BUDGETS[a.budget])
        if a.data_dir:
            b["data_dir"] = a.data_dir
        if a.init:
            b["init"] = a.init
        runs = Path(a.runs_dir or f"runs/defense_sweep_{a.budget}")
        out = a.out or f"results/screens/defense_sweep_{a.budget}"
        jobs = jobs_of(grid, seeds, b["eval_bits"])
        if not a.report_only:
            import torch

            from qnn.data import load_dataset

            torch.set_num_threads(a.threads)
            device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
            test_ds = load_dataset(b["dataset"], "test", b["data_dir"], n_synthetic=b["n_synthetic"])
            train_ds = load_dataset(b["dataset"], "train", b["data_dir"], n_synthetic=b["n_synthetic"])
            ev = test_ds.subset(b["n_eval"])
            xe, ye = ev.tensors()
            xa, ya = train_ds.subset(b["n_attack"], start=len(train_ds) - b["n_attack"]).tensors()
            data = (xa, ya, xe, ye, ev, train_ds)
            failed = []
            for j, job in enumerate(jobs):
                if j % n == i:
                    try:
                        run_job(job, b, data, runs, device, a.threads)
                    except Exception as e:  # one broken setting must not stop the others; reported and exit 1 below
                        import traceback

                        tb = traceback.format_exc().strip().splitlines()
                        print(f"defense_sweep: job {job['key']} failed: {type(e).__name__}: {str(e)[:300]} "
                              f"(at {' | '.join(ln.strip() for ln in tb[-5:-1])})", flush=True)
                        failed.append(job["key"])
        summary, md = aggregate(grid, runs, b["eval_bits"], cost=not a.no_cost, seeds=seeds, unseen=unseen_of(b))
    except QNNError as e:
        print(f"defense_sweep: error: {e}", file=sys.stderr)
        return 2
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json

    own = [f"{g['name']}: {g['epochs']}" for g in grid if g.get("epochs", b["epochs"]) != b["epochs"]]
    epochs = f"{b['epochs']} epoch(s)" + (f" unless a setting says otherwise ({'; '.join(own)})" if own else "")
    head = (f"Defense sweep, budget `{a.budget}` ({b['model']}, {epochs} on {b['train_subset'] or 'all'} "
            f"training images, eval on {b['n_eval']} test images; ASR: the worst of {len(ensemble_of(b))} attacks, "
            f"{b['attack_iters']} iterations each), grid "
            f"`{a.grid}`, seeds {a.seeds}. Command: `python bench/defense_sweep.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
    print(head + md)
    if a.shard == "0/1" or a.report_only:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out + ".json", {"budget": a.budget, "settings": b, "grid": grid, "seeds": seeds,
                                          "summary": summary, "environment": environment(a.threads)})
        atomic_write_bytes(out + ".md", (head + md).encode())
    if not a.report_only and failed:
        print(f"defense_sweep: error: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

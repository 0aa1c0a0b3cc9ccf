"""Clean accuracy at bit-widths left out of training, over seeds, for finished defense runs.

The defense table measures the left-out bit-widths (3, 5, 6; BatchNorm re-calibrated) on seed 0 only, and
`bench/defense_sweep.py` skips them to stay short. This program takes the sweep's finished checkpoints (and any other,
e.g. the table's seed 0), re-calibrates each left-out bit-width exactly as the table does (`qnn.train.calibrate_` on
the budget's training set), and reports clean accuracy per setting: mean over seeds, and the paired difference to a
baseline setting (plain QAT, `none`) of the same seed.

    python bench/left_out_clean.py --budget cpu --runs-dir runs/defense_sweep_cpu --settings none,qadtr --seeds 1,2 \\
        --add none:0=runs/defense_table_cpu/none/model.pt --add qadtr:0=runs/defense_table_cpu/qadtr/model.pt
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import environment, markdown_table  # noqa: E402
from qnn.bench.defense_sweep import slug  # noqa: E402
from qnn.bench.defense_table import BUDGETS  # noqa: E402


def checkpoints_of(a) -> dict[str, dict[int, Path]]:
    """{setting: {seed: checkpoint}} from --runs-dir/--settings/--seeds and the --add entries."""
    from qnn.errors import QNNError

    out: dict[str, dict[int, Path]] = {}
    try:
        seeds = [int(v) for v in a.seeds.split(",") if v.strip()] if a.seeds else []
    except ValueError:
        raise QNNError(f"bad --seeds {a.seeds!r} (want e.g. 1,2)") from None
    settings = [s for s in (a.settings or "").split(",") if s.strip()]
    if settings and not (a.runs_dir and seeds):
        raise QNNError("--settings needs --runs-dir and --seeds")
    for s in settings:
        for sd in seeds:
            out.setdefault(s, {})[sd] = Path(a.runs_dir) / slug(s) / f"s{sd}" / "model.pt"
    for spec in a.add or []:
        m = re.match(r"^(.+?):(\d+)=(.+)$", spec)  # setting names may hold '=' (e.g. 'qadtr adapt_temp=0.3')
        if not m:
            raise QNNError(f"--add {spec!r}: expected SETTING:SEED=PATH")
        out.setdefault(m[1], {})[int(m[2])] = Path(m[3])
    if not out:
        raise QNNError("no checkpoints: give --settings with --runs-dir and --seeds, or --add SETTING:SEED=PATH")
    for name, per in out.items():
        for sd, p in per.items():
            if not p.is_file():
                raise QNNError(f"checkpoint not found: {p} (setting {name!r}, seed {sd})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="cpu", help="data, eval images and left-out bit-widths of this budget")
    ap.add_argument("--runs-dir", default=None, help="a defense_sweep runs folder (SETTING/sSEED/model.pt)")
    ap.add_argument("--settings", default=None, help="comma-separated setting names as in the sweep's grid")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds of the --settings runs to measure, e.g. 1,2 "
                    "(needed with --settings; no default)")
    ap.add_argument("--add", action="append", help="SETTING:SEED=PATH, another checkpoint (repeatable)")
    ap.add_argument("--bits", default=None, help="bit-widths to measure (default: the budget's left-out ones)")
    ap.add_argument("--baseline", default="none", help="setting the differences are taken against")
    ap.add_argument("--data-dir", default=None, help="override the budget's dataset folder (default: the budget's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default="results/left_out_clean", help="results path without extension (.json and .md "
                    "are written; default results/left_out_clean)")
    a = ap.parse_args(argv)
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
    from qnn.config import parse_bits
    from qnn.errors import QNNError

    try:
        if a.budget not in BUDGETS:
            raise QNNError(f"unknown budget '{a.budget}'; choose from {', '.join(BUDGETS)}")
        b = dict(BUDGETS[a.budget])
        if a.data_dir:
            b["data_dir"] = a.data_dir
        bits = parse_bits(a.bits) if a.bits else list(b["left_out"])
        ckpts = checkpoints_of(a)
        import torch

        from qnn.data import load_dataset
        from qnn.train import calibrate_, evaluate

        torch.set_num_threads(a.threads)
        test_ds = load_dataset(b["dataset"], "test", b["data_dir"], n_synthetic=b["n_synthetic"]).subset(b["n_eval"])
        train_ds = load_dataset(b["dataset"], "train", b["data_dir"], n_synthetic=b["n_synthetic"])
        acc: dict[str, dict[int, dict[int, float]]] = {}
        for name, per in ckpts.items():
            for sd, p in sorted(per.items()):
                model, obj = load_checkpoint(p)
                trained = obj.get("trained_bits", [])
                row = {}
                for bt in bits:
                    if bt not in trained and bt != 32:
                        calibrate_(model, train_ds, bt)
                    row[bt] = evaluate(model, test_ds, [bt])[bt]
                acc.setdefault(name, {})[sd] = row
                print(f"{name} seed {sd}: " + "  ".join(f"{bt}b {v:.2f}" for bt, v in row.items()), flush=True)
    except QNNError as e:
        print(f"left_out_clean: error: {e}", file=sys.stderr)
        return 2
    base = acc.get(a.baseline, {})
    summary, rows = {}, []
    for name, per in acc.items():
        s = {}
        for bt in bits:
            vals = [per[sd][bt] for sd in sorted(per)]
            diffs = [per[sd][bt] - base[sd][bt] for sd in sorted(per) if sd in base] if name != a.baseline else []
            s[str(bt)] = {"mean": statistics.fmean(vals), "n_seeds": len(vals), "per_seed": {str(sd): per[sd][bt] for sd in sorted(per)},
                          "diff_vs_baseline": statistics.fmean(diffs) if diffs else None, "n_paired": len(diffs)}
        summary[name] = s
        rows.append([name, ",".join(map(str, sorted(per)))]
                    + [f"{s[str(bt)]['mean']:.2f}" + ("" if s[str(bt)]["diff_vs_baseline"] is None
                                                       else f" ({s[str(bt)]['diff_vs_baseline']:+.2f})") for bt in bits])
    cmd = "python bench/left_out_clean.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    md = (f"Clean accuracy % at bit-widths left out of training (BN re-calibrated), budget `{a.budget}` "
          f"({b['n_eval']} test images), mean over seeds; in brackets the mean paired difference to `{a.baseline}` "
          f"of the same seeds. Command: `{cmd}`\n\n"
          + markdown_table(["setting", "seeds"] + [f"{bt}b clean" for bt in bits], rows))
    print(md)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out + ".json", {"budget": a.budget, "settings": b, "bits": bits, "baseline": a.baseline,
                                        "checkpoints": {n: {str(sd): str(p) for sd, p in per.items()} for n, per in ckpts.items()},
                                        "summary": summary, "command": cmd, "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", md.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ASR against attack iterations, for every attack of the evaluation ensemble (`qnn.attacks.ensemble`), on each given
model: shows whether the evaluation's iteration count is past saturation, and whether a defense reads better under
one optimiser than under another (gradient masking).

    python bench/attack_curve.py --checkpoint qat=runs/a/model.pt --checkpoint qadtr=runs/b/model.pt --bits 4 \
        --dataset cifar10 --data-dir ../shared/data/cifar10 [--iterations 1000] [--patch-size 10]

Patches are crafted on the last --n-craft training images and scored on the last --n-score test images (disjoint).
At each point the restart with the highest ASR on the crafting images is scored. Writes {--out}.{json,md,png} after
every (model, attack) curve, each curve with its provenance (git commit / code hash, the attack's definition). A
re-run into an existing {--out}.json resumes: with the same settings and the same checkpoint files (sha256) it keeps the curves
whose attack is still defined the same and runs the others; with other settings it refuses rather than overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import command_line, environment, markdown_table, pyplot, save_figure, write_results  # noqa: E402
from qnn.errors import QNNError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                    help="a model to attack, as NAME=PATH (repeatable)")
    ap.add_argument("--bits", type=int, default=4, help="bit-width attacked (default 4)")
    ap.add_argument("--dataset", default="cifar10", help="cifar10 | synthetic (default cifar10)")
    ap.add_argument("--data-dir", default="../shared/data/cifar10", help="dataset folder")
    ap.add_argument("--iterations", type=int, default=1000, help="attack iterations (default 1000)")
    ap.add_argument("--points", default="10,25,50,100,200,400,700,1000",
                    help="iterations at which ASR is measured (default 10,25,...,1000; capped at --iterations)")
    ap.add_argument("--attacks", help="comma-separated names of ensemble members to run (default: all of them; "
                                       "e.g. 'sign 0.05,adam 0.05')")
    ap.add_argument("--patch-size", type=int, default=10, help="square patch side in pixels (default 10)")
    ap.add_argument("--n-craft", type=int, default=2000, help="training images the patches are crafted on (default 2000)")
    ap.add_argument("--n-score", type=int, default=2000, help="test images the patches are scored on (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--out", default="results/attack_curve", help="output path without extension")
    a = ap.parse_args(argv)
    import torch

    from qnn.attacks.ensemble import ENSEMBLE, attack_config
    from qnn.attacks.patch import PatchConfig, evaluate_patch, optimize_universal_patch
    from qnn.checkpoint import load_checkpoint, sha256_file, trained_bits
    from qnn.data import load_dataset
    from qnn.layers import precision

    torch.set_num_threads(a.threads)
    try:
        models = {}
        for spec in a.checkpoint:
            name, eq, path = spec.partition("=")
            if not eq or not name:
                raise QNNError(f"--checkpoint expects NAME=PATH, got {spec!r}")
            models[name] = load_checkpoint(path)
        train = load_dataset(a.dataset, "train", a.data_dir, seed=a.seed)
        test = load_dataset(a.dataset, "test", a.data_dir, seed=a.seed)
        if a.n_craft > len(train) or a.n_score > len(test):
            raise QNNError(f"--n-craft / --n-score exceed the {len(train)} / {len(test)} images")
        names = [n.strip() for n in a.attacks.split(",")] if a.attacks else [att.name for att in ENSEMBLE]
        unknown = sorted(set(names) - {att.name for att in ENSEMBLE})
        if unknown:
            raise QNNError(f"--attacks: unknown {unknown}; the ensemble's are {', '.join(att.name for att in ENSEMBLE)}")
        points = sorted({min(int(p), a.iterations) for p in a.points.split(",")})
        settings = {**{k: v for k, v in vars(a).items() if k not in _FREE}, "points": points,
                    "checkpoint_sha256": {spec.partition("=")[0]: sha256_file(spec.partition("=")[2])
                                          for spec in a.checkpoint}}
        curves, provenance = _previous(a.out, settings)
    except QNNError as e:
        print(f"attack_curve: error: {e}", file=sys.stderr)
        return 2
    craft = train.subset(a.n_craft, start=len(train) - a.n_craft).tensors()
    score = test.subset(a.n_score, start=len(test) - a.n_score).tensors()
    command = command_line("bench/attack_curve.py", argv)
    env = environment()
    code = {k: env[k] for k in ("git_sha", "git_dirty", "code_hash")}
    for name, (model, obj) in models.items():
        trained = trained_bits(obj)
        base = PatchConfig(patch_shape=(a.patch_size, a.patch_size), seed=a.seed, image_size=tuple(score[0].shape[-2:]),
                           num_classes=model.num_classes)
        curves.setdefault(name, {})
        provenance.setdefault(name, {})
        for att in (att for att in ENSEMBLE if att.name in names):
            if att.name in curves[name]:
                if provenance[name].get(att.name, {}).get("attack") == dataclasses.asdict(att):
                    print(f"{name} {att.name}: kept from {a.out}.json", flush=True)
                    continue
                print(f"{name} {att.name}: defined differently since {a.out}.json was written: run again", flush=True)
            cfg = attack_config(base, att, a.iterations, trained)
            if att.eot_bits and cfg.eot_bits is None:
                continue
            with precision(model, a.bits):
                _, info = optimize_universal_patch(model, *craft, cfg, snapshots=tuple(points))
                asr = []
                for p in points:
                    cands = info["snapshots"][p]
                    best = max(range(len(cands)), key=lambda r: evaluate_patch(model, craft[0][:512], craft[1][:512], cands[r], cfg)["asr_pct"]) \
                        if len(cands) > 1 else 0
                    asr.append(evaluate_patch(model, *score, cands[best], cfg)["asr_pct"])
                curves[name][att.name] = asr
                provenance[name][att.name] = {"code": code, "command": command, "attack": dataclasses.asdict(att)}
                print(f"{name} {att.name}: " + " ".join(f"{p}:{v:.1f}" for p, v in zip(points, asr)), flush=True)
                _write(a, command, settings, curves, provenance)
    _write(a, command, settings, curves, provenance)
    return 0


#: options that do not change the curves: a resumed run may set them differently
_FREE = ("attacks", "threads", "out")


def _previous(out: str, settings: dict) -> tuple[dict, dict]:
    """(curves, provenance) that {out}.json holds, when it was made with `settings`; ({}, {}) when there is no such
    file. Any other file there is refused: a run must not overwrite curves it cannot resume."""
    import json

    path = Path(out + ".json")
    if not path.exists():
        return {}, {}
    try:
        prev = json.loads(path.read_text())
        old = prev["settings"]
        curves, provenance = prev["curves"], prev["provenance"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QNNError(f"{path} is not a curve file this program can resume ({type(e).__name__}): choose another "
                       f"--out or move it away") from None
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differ:
        raise QNNError(f"{path} was made with other settings ({', '.join(differ)}): choose another --out or move it "
                       f"away")
    _check_curves(path, curves, provenance, len(settings["points"]))
    return curves, provenance


def _check_curves(path: Path, curves, provenance, n_points: int) -> None:
    """What a resumed run would republish: every curve a list of one ASR in [0, 100] per point, with provenance."""
    import math

    ok = isinstance(curves, dict) and isinstance(provenance, dict) and all(
        isinstance(per, dict) and isinstance(provenance.get(name), dict) and all(
            isinstance(c, list) and len(c) == n_points and att in provenance[name] and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 100
                for v in c) for att, c in per.items()) for name, per in curves.items())
    if not ok:
        raise QNNError(f"{path}: its curves are malformed (each needs one ASR in [0, 100] per point and its "
                       "provenance): move it away or choose another --out")


def _write(a, command: str, settings: dict, curves: dict, provenance: dict) -> None:
    from qnn.attacks.ensemble import ENSEMBLE

    points = settings["points"]

    order = {att.name: i for i, att in enumerate(ENSEMBLE)}
    curves = {n: dict(sorted(per.items(), key=lambda kv: order.get(kv[0], len(order)))) for n, per in curves.items()}
    rows = [[n, att] + c for n, per in curves.items() for att, c in per.items()]
    md = (f"ASR % of a {a.patch_size}x{a.patch_size} universal patch at {a.bits} bits against attack iterations, per "
          f"attack of the evaluation ensemble (crafted on {a.n_craft} training images, scored on {a.n_score} other "
          f"test images). Command: `{command}`\n\n" + markdown_table(["model", "attack"] + [str(p) for p in points], rows))
    write_results(a.out, {"command": command, "bits": a.bits, "points": points, "curves": curves,
                          "provenance": provenance, "settings": settings, "config": vars(a), "threads": a.threads}, md)
    _plot(curves, points, a.out + ".png")


def _plot(curves: dict, points: list[int], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, per) in zip(axes[0], curves.items()):
        for att, c in per.items():
            ax.plot(points, c, marker="o", label=att)
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("attack iterations")
        ax.set_ylabel("ASR %")
        ax.legend(fontsize=6)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())

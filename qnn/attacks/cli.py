"""`qnn attack`: patch / pixel attacks, transfer matrices, seen/unseen suites, adaptive attacks, analyses."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from qnn.attacks.patch import PatchConfig, default_patch_side
from qnn.attacks.registry import PixelOptions, get_attack, list_attacks
from qnn.attacks.suites import load_suite
from qnn.cli_options import add_user_model_option
from qnn.errors import QNNError
from qnn.options import add_flags, flag_of, given
from qnn.outputs import StagedDir
from qnn.validate import arg_int, arg_seed

#: PGD steps per image of `--attack per_image` when --iterations is not given (one patch per image: a universal
#: patch's 500 would cost 500 forward-backward passes per image)
PER_IMAGE_ITERATIONS = 100


def add_parser(sub) -> None:
    p = sub.add_parser("attack", help="patch / pixel attacks and their ASR per bit-width")
    p.add_argument("--checkpoint", required=True, help="qnn checkpoint (model.pt written by qnn train)")
    add_user_model_option(p)
    p.add_argument("--dataset", default="synthetic", help="synthetic (embedded, no download) | cifar10 | imagefolder (default synthetic)")
    p.add_argument("--data-dir", help="dataset folder (CIFAR-10 npz or cifar-10-batches-py; ImageFolder root)")
    p.add_argument("--attack", default="universal", help=" | ".join(list_attacks()) + " (qnn list attacks; default "
                   f"universal; per_image: {PER_IMAGE_ITERATIONS} PGD steps per image unless --iterations says)")
    p.add_argument("--protocol", help="a named evaluation protocol (qnn.evaluation: " + " | ".join(_protocols()) +
                   "): its attack members, crafting images (the first of the training set), scored images (the last "
                   "of the test set) and placements, scored as the defense table scores a cell; --bits, --patch-size "
                   "/ --patch-frac and --shape choose the cells")
    p.add_argument("--bits", default="32,8,4,2", help="bit-widths to evaluate on (and craft on, unless --source-bits)")
    p.add_argument("--source-bits", help="craft at these bit-widths and evaluate on every --bits: a transfer matrix")
    p.add_argument("--source-checkpoint", help="craft on this other checkpoint (float) too")
    p.add_argument("--patch-size", type=arg_int(1), help=f"square side in pixels (default {default_patch_side()})")
    add_flags(p, PatchConfig)  # the patch and its optimiser: flags, ranges and defaults are PatchConfig's fields
    p.add_argument("--adaptive", choices=["eot", "ensemble"], help="EOT over the defender's bit-widths / ensemble")
    add_flags(p, PixelOptions)  # fgsm / pgd
    p.add_argument("--n-attack", type=arg_int(1), default=1000, help="training images the universal patch is optimised on")
    p.add_argument("--n-eval", type=arg_int(1), default=1000, help="test images ASR is measured on")
    p.add_argument("--patch", help="evaluate this saved patch (.npz) instead of optimising one")
    p.add_argument("--suite", help="seen | unseen | path to a suite YAML: evaluate every configuration in it")
    p.add_argument("--analysis", action="store_true", help="gradient alignment + feature maps")
    p.add_argument("--seed", type=arg_seed(), default=0, help="seed of patch init, placement and image draws (default 0)")
    p.add_argument("--threads", type=arg_int(1, 1024), help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", required=True, help="output directory (results JSON/MD, patches, PNGs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _protocols() -> list[str]:
    from qnn.evaluation import PROTOCOLS

    return list(PROTOCOLS)


#: what a protocol decides itself (its members' optimisers, its images, batch and placements): giving one of these
#: with --protocol is refused
PROTOCOL_DECIDES = ("iterations", "step", "optimizer", "restarts", "independent_restarts", "batch_size", "eot_samples",
                    "scale_min", "scale_max", "rotation_max", "placement", "targeted", "n_attack", "n_eval", "adaptive",
                    "source_bits", "source_checkpoint", "patch", "suite", "analysis")


def _given_with_protocol(a) -> list[str]:
    """The options of `a` set away from their defaults that a protocol decides (flag names)."""
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_parser(sub)
    flags = {act.dest: act.option_strings[-1] for act in sub.choices["attack"]._actions if act.option_strings}
    defaults = vars(parser.parse_args(["attack", "--checkpoint", "-", "--out", "-"]))
    given = [k for k in PROTOCOL_DECIDES if getattr(a, k) != defaults[k]]
    if a.attack != "universal":
        given.insert(0, "attack")
    return [flags[k] for k in given]


def _check_attack_options(a, kind) -> None:
    """Refuse settings the chosen attack would not read (one line, before any work)."""
    if not kind.universal:
        modes = [f for f, v in (("--suite", a.suite), ("--source-bits", a.source_bits),
                                ("--source-checkpoint", a.source_checkpoint), ("--patch", a.patch)) if v]
        if modes:
            raise QNNError(f"{', '.join(modes)} take(s) a universal patch; --attack {a.attack} makes none "
                           f"(use --attack universal or lavan)")
    unread = [f for f in dataclasses.fields(PixelOptions) if f.name not in kind.reads and getattr(a, f.name) is not None]
    if unread:
        readers = [n for n in list_attacks() if set(get_attack(n).reads) & {f.name for f in unread}]
        unread = [flag_of(f) for f in unread]
        raise QNNError(f"{', '.join(unread)}: read by --attack {' / '.join(readers)} only, not by --attack {a.attack}")


def _patch_cfg(a, num_classes: int, image_size, **over):
    """The PatchConfig the flags describe (what they leave out: PatchConfig's defaults), with `over` on top."""
    kw = given(a, PatchConfig)
    if a.patch_size is not None:
        kw["patch_shape"] = (a.patch_size, a.patch_size)
    if a.attack == "lavan":
        kw["targeted"] = True
    if a.attack == "per_image" and a.iterations is None:
        kw["iterations"] = PER_IMAGE_ITERATIONS
    kw.update(seed=a.seed, num_classes=num_classes, image_size=image_size, **over)
    if kw.get("patch_frac") is not None:
        kw["patch_shape"] = None
    return PatchConfig(**kw)


def cmd_attack(a) -> int:
    from qnn.attacks.patch import load_patch
    from qnn.checkpoint import atomic_write_json, load_checkpoint, trained_bits
    from qnn.data import check_data_fits, load_dataset
    from qnn.layers import parse_bits
    from qnn.train import versions

    kind = get_attack(a.attack)
    _check_attack_options(a, kind)
    if a.protocol is not None:
        from qnn.evaluation import get_protocol

        get_protocol(a.protocol)
        clash = _given_with_protocol(a)
        if clash:
            raise QNNError(f"--protocol {a.protocol} decides {', '.join(clash)} itself: leave them out")
    if a.threads:
        torch.set_num_threads(a.threads)
    inputs = (a.checkpoint, a.source_checkpoint, a.patch, a.data_dir)
    with StagedDir(a.out, overwrite=a.overwrite, what="attack result", inputs=inputs) as stage:
        bits = parse_bits(a.bits)
        model, obj = load_checkpoint(a.checkpoint, user_model=a.model)
        n_cls = model.num_classes
        test = load_dataset(a.dataset, "test", a.data_dir, seed=a.seed, like=model)
        check_data_fits(model, test, "test set")
        if a.protocol is not None:
            res, out = _protocol(a, model, obj, bits, test, stage)
            atomic_write_json(out / "result.json", res)
            stage.publish()
            print(json.dumps({"out": str(stage.out / "result.json")}))
            return 0
        xe, ye = test.subset(a.n_eval).tensors()
        size = tuple(xe.shape[-2:])
        cfg = _patch_cfg(a, n_cls, size)  # validates patch options before any heavy work
        if a.patch:
            load_patch(a.patch)
        if a.suite:
            for pc in load_suite(a.suite)["patches"]:
                _patch_cfg(a, n_cls, size, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in pc.items()})
        source = load_checkpoint(a.source_checkpoint)[0] if a.source_checkpoint else None
        train = load_dataset(a.dataset, "train", a.data_dir, seed=a.seed, like=model)
        xa, ya = train.subset(a.n_attack).tensors()
        res: dict = {"checkpoint": a.checkpoint, "attack": a.attack, "n_eval": len(xe), "versions": versions(),
                     "results": {}}
        trained = trained_bits(obj) or bits
        if a.adaptive == "eot":
            cfg.eot_bits = list(trained)
        elif a.adaptive == "ensemble":
            cfg.ensemble_bits = list(trained)
        out = stage.prepare()
        _attack(a, model, source, cfg, bits, xa, ya, xe, ye, out, res)
        atomic_write_json(out / "result.json", res)
        stage.publish()
    print(json.dumps({"out": str(stage.out / "result.json")}))
    return 0


def _protocol(a, model, obj, bits: list[int], test, stage) -> tuple[dict, Path]:
    """`--protocol`: the protocol's members at every bit-width, on its own images, scored as the defense table scores
    (`qnn.evaluation.run_protocol`); each crafted patch saved beside the result. Returns (result, staging folder)."""
    from qnn.attacks.patch import save_patch
    from qnn.checkpoint import sha256_file, trained_bits
    from qnn.data import load_dataset
    from qnn.evaluation import get_protocol, member_config, run_protocol
    from qnn.train import versions

    proto = get_protocol(a.protocol)
    train = load_dataset(a.dataset, "train", a.data_dir, seed=a.seed, like=model)
    for what, ds, n in (("scored test", test, proto.n_score), ("crafting training", train, proto.n_craft)):
        if len(ds) < n:
            raise QNNError(f"protocol '{proto.name}' needs {n} {what} images; {a.dataset} has {len(ds)}")
    score_set = test.subset(proto.n_score, start=len(test) - proto.n_score).tensors()
    craft_set = train.subset(proto.n_craft).tensors()
    base = _patch_cfg(a, model.num_classes, tuple(score_set[0].shape[-2:]))
    trained = trained_bits(obj) or bits
    out = stage.prepare()

    def keep(member, b, patch):  # saved with the settings it was crafted with
        slug = "".join(c if c.isalnum() else "_" for c in member.name)
        save_patch(out / f"patch_{slug}_{'eot' if b is None else f'{b}b'}", patch,
                   member_config(base, member, proto, trained))

    results = run_protocol(model, proto, bits, base, craft_set, score_set, trained, on_patch=keep,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    for b, r in results.items():
        print(f"{b} bits: ASR {r['asr_pct']:.1f}% (worst of {len(r['per_attack'])}: {r['worst']}), clean "
              f"{r['clean_acc_pct']:.1f}% on {proto.n_score} images x {proto.placements} placements", flush=True)
    return {"checkpoint": a.checkpoint, "checkpoint_sha256": sha256_file(a.checkpoint), "attack": "protocol",
            "protocol": proto.to_dict(), "patch_config": base.to_dict(),
            "trained_bits": trained, "n_score": proto.n_score, "versions": versions(), "results": results}, out


def _print(b: int, r: dict) -> None:
    robust = f", robust {r['robust_acc_pct']:.1f}%" if "robust_acc_pct" in r else ""
    clean = f" (clean {r['clean_acc_pct']:.1f}%{robust}, n={r['n_asr_images']})" if "clean_acc_pct" in r else ""
    print(f"{b} bits: ASR {r['asr_pct']:.1f}%{clean}", flush=True)


def _attack(a, model, source, cfg, bits, xa, ya, xe, ye, out: Path, res: dict) -> None:
    """Run the attack `a` asks for (`source`: the --source-checkpoint model or None), writing patches and figures
    into `out` and figures into `res`."""
    from qnn.attacks.patch import evaluate_patch, load_patch, optimize_universal_patch, save_patch
    from qnn.attacks.registry import Scored
    from qnn.attacks.transfer import heatmap_png, transfer_matrix
    from qnn.layers import parse_bits, precision

    n_cls, size = model.num_classes, tuple(xe.shape[-2:])

    model.eval()
    if a.suite:
        suite = load_suite(a.suite)
        sb = parse_bits(suite.get("bits", bits)) + parse_bits(suite.get("left_out_bits", [])) if suite.get("left_out_bits") else parse_bits(suite.get("bits", bits))
        for i, pc in enumerate(suite["patches"]):
            pcfg = _patch_cfg(a, n_cls, size, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in pc.items()})
            name = f"{pcfg.shape}{pcfg.patch_shape[0]}x{pcfg.patch_shape[1]}_{pcfg.placement}"
            rows = {}
            for src in sb:
                with precision(model, src):
                    patch, info = optimize_universal_patch(model, xa, ya, pcfg, progress=sys.stderr.isatty())
                    save_patch(out / f"patch_{name}_{src}b", patch, pcfg, info)
                    rows[str(src)] = evaluate_patch(model, xe, ye, patch, pcfg)
            res["results"][name] = rows
            print(name, {k: round(v["asr_pct"], 1) for k, v in rows.items()}, flush=True)
    elif a.source_bits or a.source_checkpoint:
        srcs = parse_bits(a.source_bits) if a.source_bits else []
        extra = {}
        if source is not None:
            extra["ckpt"] = source
        m = transfer_matrix(model, xa, ya, xe, ye, cfg, srcs, bits, patch_dir=out, source_models=extra)
        res["results"] = m
        heatmap_png(m, out / "transfer.png", f"{cfg.patch_shape[0]}x{cfg.patch_shape[1]} {cfg.shape} patch ASR")
    elif a.patch:
        patch, pcfg = load_patch(a.patch)
        if pcfg.image_size != size:
            raise QNNError(f"{a.patch}: patch made for {pcfg.image_size} images, data is {size}")
        for b in bits:
            with precision(model, b):
                res["results"][str(b)] = {**evaluate_patch(model, xe, ye, patch, pcfg), "craft": {"loaded": a.patch}}
            _print(b, res["results"][str(b)])
    else:
        kind = get_attack(a.attack)
        attack = kind(cfg, PixelOptions(**given(a, PixelOptions)) if kind.Options is PixelOptions else None)
        data = Scored(xa, ya, xe, ye, out)
        for b in bits:
            with precision(model, b):
                res["results"][str(b)] = attack.run(model, b, data)
            _print(b, res["results"][str(b)])
    if a.analysis:
        from qnn.attacks.analysis import gradient_alignment, save_feature_maps
        from qnn.attacks.patch import apply_patch, make_mask, random_locations

        n = min(256, len(xe))
        res["gradient_alignment_clean"] = gradient_alignment(model, xe[:n], ye[:n], [b for b in bits if b != 32])
        pm = torch.rand(xe.shape[1], *cfg.patch_shape, generator=torch.Generator().manual_seed(a.seed))
        loc = random_locations(n, *size, *cfg.patch_shape, torch.Generator().manual_seed(a.seed))
        xpn = apply_patch(xe[:n], pm, make_mask(cfg.shape, *cfg.patch_shape), loc)
        res["gradient_alignment_patched"] = gradient_alignment(model, xpn, ye[:n], [b for b in bits if b != 32])
        for b in bits:
            save_feature_maps(model, xe[:1], xpn[:1], b, out / f"features_{b}b.png")
    res["patch_config"] = cfg.to_dict()


COMMANDS = {"attack": (add_parser, cmd_attack)}

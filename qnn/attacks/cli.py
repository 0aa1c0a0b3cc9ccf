"""`qnn attack`: patch / pixel attacks, transfer matrices, seen/unseen suites, adaptive attacks, analyses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from qnn.errors import QNNError

ATTACKS = ("universal", "lavan", "per_image", "fgsm", "pgd")


def add_parser(sub) -> None:
    p = sub.add_parser("attack", help="patch / pixel attacks and their ASR per bit-width")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-dir")
    p.add_argument("--attack", default="universal", help="|".join(ATTACKS))
    p.add_argument("--bits", default="32,8,4,2", help="bit-widths to evaluate on (and craft on, unless --source-bits)")
    p.add_argument("--source-bits", help="craft at these bit-widths and evaluate on every --bits: a transfer matrix")
    p.add_argument("--source-checkpoint", help="craft on this other checkpoint (float) too")
    p.add_argument("--patch-size", type=int, help="square side in pixels (e.g. 6)")
    p.add_argument("--patch-frac", type=float, help="patch area as a fraction of the image (0.035 = 6x6 on CIFAR)")
    p.add_argument("--shape", default="square")
    p.add_argument("--placement", default="random")
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--step", type=float, default=0.05)
    p.add_argument("--optimizer", default="sign")
    p.add_argument("--eot-samples", type=int, default=1)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--scale-min", type=float, default=1.0)
    p.add_argument("--scale-max", type=float, default=1.0)
    p.add_argument("--rotation-max", type=float, default=0.0)
    p.add_argument("--targeted", action="store_true")
    p.add_argument("--target-class", type=int, default=0)
    p.add_argument("--adaptive", choices=["eot", "ensemble"], help="EOT over the defender's bit-widths / ensemble")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--n-attack", type=int, default=1000, help="training images the universal patch is optimised on")
    p.add_argument("--n-eval", type=int, default=1000, help="test images ASR is measured on")
    p.add_argument("--patch", help="evaluate this saved patch (.npz) instead of optimising one")
    p.add_argument("--suite", help="seen | unseen | path to a suite YAML: evaluate every configuration in it")
    p.add_argument("--analysis", action="store_true", help="gradient alignment + feature maps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", required=True, help="output directory (results JSON/MD, patches, PNGs)")
    p.add_argument("--overwrite", action="store_true")


def suite_configs(name: str) -> dict:
    from qnn.config import load_yaml

    p = Path(name)
    if not p.is_file():
        p = Path(__file__).resolve().parents[1] / "configs" / f"suite_{name}.yaml"
    if not p.is_file():
        raise QNNError(f"unknown suite '{name}': give seen, unseen or a YAML file")
    return load_yaml(p)


def _patch_cfg(a, num_classes: int, image_size, **over):
    from qnn.attacks.patch import PatchConfig

    kw = dict(patch_frac=a.patch_frac, patch_shape=(a.patch_size, a.patch_size) if a.patch_size else (6, 6),
              shape=a.shape, placement=a.placement, iterations=a.iterations, step=a.step, optimizer=a.optimizer,
              eot_samples=a.eot_samples, restarts=a.restarts, scale_min=a.scale_min, scale_max=a.scale_max,
              rotation_max=a.rotation_max, targeted=a.targeted or a.attack == "lavan", target_class=a.target_class,
              seed=a.seed, num_classes=num_classes, image_size=image_size)
    kw.update(over)
    if kw.get("patch_frac") is not None:
        kw["patch_shape"] = None
    return PatchConfig(**kw)


def cmd_attack(a) -> int:
    from qnn.attacks.patch import (evaluate_patch, load_patch, optimize_universal_patch, per_image_patch_attack,
                                   asr_metrics, predict, save_patch)
    from qnn.attacks.pixel import fgsm, pgd_linf
    from qnn.attacks.transfer import heatmap_png, transfer_matrix
    from qnn.checkpoint import atomic_write_json, load_checkpoint
    from qnn.config import parse_bits
    from qnn.data import load_dataset
    from qnn.layers import set_bit_width_
    from qnn.train import versions

    if a.attack not in ATTACKS:
        raise QNNError(f"unknown attack '{a.attack}'; choose from {', '.join(ATTACKS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        raise QNNError(f"output dir {out} holds earlier results; pass --overwrite")
    bits = parse_bits(a.bits)
    model, obj = load_checkpoint(a.checkpoint)
    n_cls = model.num_classes
    test = load_dataset(a.dataset, "test", a.data_dir, seed=a.seed)
    if a.n_eval <= 0 or a.n_attack <= 0:
        raise QNNError("evaluation set is empty: --n-eval and --n-attack must be > 0")
    xe, ye = test.subset(a.n_eval).tensors()
    size = tuple(xe.shape[-2:])
    cfg = _patch_cfg(a, n_cls, size)  # validates patch options before any heavy work
    train = load_dataset(a.dataset, "train", a.data_dir, seed=a.seed)
    xa, ya = train.subset(a.n_attack).tensors()
    res: dict = {"checkpoint": a.checkpoint, "attack": a.attack, "n_eval": len(xe), "versions": versions(), "results": {}}
    trained = obj.get("trained_bits", bits)
    if a.adaptive == "eot":
        cfg.eot_bits = list(trained)
    elif a.adaptive == "ensemble":
        cfg.ensemble_bits = list(trained)
    out.mkdir(parents=True, exist_ok=True)

    if a.attack in ("fgsm", "pgd"):
        for b in bits:
            set_bit_width_(model, b)
            model.eval()
            xadv = fgsm(model, xe, ye, a.eps) if a.attack == "fgsm" else pgd_linf(model, xe, ye, a.eps, steps=10)
            res["results"][str(b)] = asr_metrics(predict(model, xe).numpy(), predict(model, xadv).numpy(), ye.numpy())
    elif a.attack == "per_image":
        cfg.iterations = min(cfg.iterations, 100)
        for b in bits:
            set_bit_width_(model, b)
            xadv, _, _ = per_image_patch_attack(model, xe, ye, cfg)
            res["results"][str(b)] = asr_metrics(predict(model, xe).numpy(), predict(model, xadv).numpy(), ye.numpy())
    elif a.suite:
        suite = suite_configs(a.suite)
        sb = parse_bits(suite.get("bits", bits)) + parse_bits(suite.get("left_out_bits", [])) if suite.get("left_out_bits") else parse_bits(suite.get("bits", bits))
        for i, pc in enumerate(suite["patches"]):
            pcfg = _patch_cfg(a, n_cls, size, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in pc.items()})
            name = f"{pcfg.shape}{pcfg.patch_shape[0]}x{pcfg.patch_shape[1]}_{pcfg.placement}"
            rows = {}
            for src in sb:
                set_bit_width_(model, src)
                patch, info = optimize_universal_patch(model, xa, ya, pcfg, progress=sys.stderr.isatty())
                save_patch(out / f"patch_{name}_{src}b", patch, pcfg, info)
                rows[str(src)] = evaluate_patch(model, xe, ye, patch, pcfg)
            res["results"][name] = rows
            print(name, {k: round(v["asr_pct"], 1) for k, v in rows.items()}, flush=True)
    elif a.source_bits or a.source_checkpoint:
        srcs = parse_bits(a.source_bits) if a.source_bits else []
        extra = {}
        if a.source_checkpoint:
            extra["ckpt"] = load_checkpoint(a.source_checkpoint)[0]
        m = transfer_matrix(model, xa, ya, xe, ye, cfg, srcs, bits, patch_dir=out, source_models=extra)
        res["results"] = m
        heatmap_png(m, out / "transfer.png", f"{cfg.patch_shape[0]}x{cfg.patch_shape[1]} {cfg.shape} patch ASR")
    else:
        for b in bits:
            set_bit_width_(model, b)
            if a.patch:
                patch, pcfg = load_patch(a.patch)
                if pcfg.image_size != size:
                    raise QNNError(f"{a.patch}: patch made for {pcfg.image_size} images, data is {size}")
                info = {"loaded": a.patch}
            else:
                pcfg = cfg
                patch, info = optimize_universal_patch(model, xa, ya, cfg, progress=sys.stderr.isatty())
                save_patch(out / f"patch_{b}b", patch, cfg, info)
            set_bit_width_(model, b)
            r = evaluate_patch(model, xe, ye, patch, pcfg)
            res["results"][str(b)] = {**r, "craft": info}
            print(f"{b} bits: ASR {r['asr_pct']:.1f}% (clean {r['clean_acc_pct']:.1f}%, robust {r['robust_acc_pct']:.1f}%, "
                  f"n={r['n_asr_images']})", flush=True)
    if a.analysis:
        from qnn.attacks.analysis import gradient_alignment, save_feature_maps
        from qnn.attacks.patch import apply_patch, make_mask, random_locations

        n = min(256, len(xe))
        res["gradient_alignment_clean"] = gradient_alignment(model, xe[:n], ye[:n], [b for b in bits if b != 32])
        pm = torch.rand(3, *cfg.patch_shape, generator=torch.Generator().manual_seed(a.seed))
        loc = random_locations(n, *size, *cfg.patch_shape, torch.Generator().manual_seed(a.seed))
        xpn = apply_patch(xe[:n], pm, make_mask(cfg.shape, *cfg.patch_shape), loc)
        res["gradient_alignment_patched"] = gradient_alignment(model, xpn, ye[:n], [b for b in bits if b != 32])
        for b in bits:
            save_feature_maps(model, xe[:1], xpn[:1], b, out / f"features_{b}b.png")
    res["patch_config"] = cfg.to_dict()
    atomic_write_json(out / "result.json", res)
    print(json.dumps({"out": str(out / "result.json")}))
    return 0


COMMANDS = {"attack": (add_parser, cmd_attack)}

"""`qnn` command line: train, eval, attack, certify, export, verify, bundle, pipeline, list.

Every user error (bad file, bad option) prints one line `qnn: error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from qnn.cli_options import add_user_model_option
from qnn.errors import QNNError
from qnn.validate import arg_float, arg_int, arg_seed


def _add_train(sub) -> None:
    from qnn.config import TrainConfig
    from qnn.options import add_flags

    p = sub.add_parser("train", help="QAT / DBWT training, optionally with a defense")
    p.add_argument("-c", "--config", help="YAML file with TrainConfig keys (flags override it)")
    add_flags(p, TrainConfig)  # every TrainConfig option: its flag, help, range and default are the field's
    _add_defense_options(p)


def _add_defense_options(p) -> None:
    """One flag per defense option (`qnn.defenses.option_table`), with the defenses that take it and their defaults."""
    from qnn.defenses import option_table

    g = p.add_argument_group("defense options (for the --defense chosen; also `defense_args:` in a YAML config)")
    for name, (kind, help, defaults, (lo, hi, lo_open)) in option_table().items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            g.add_argument(flag, dest=name, action="store_true", default=None, help=f"{help} ({', '.join(defaults)})")
            continue
        shown = ", ".join(f"{d} {v:g}" if isinstance(v, float) else f"{d} {v}" for d, v in defaults.items()
                          if v is not None)
        typ = {int: arg_int(lo, hi), float: arg_float(lo, hi, lo_open)}.get(kind, str)  # a list of ints: a string
        g.add_argument(flag, dest=name, type=typ, metavar=name.upper(),
                       help=f"{help} (default: {shown})" if shown else help)
    g.add_argument("--defense-arg", dest="defense_arg", action="append", metavar="KEY=VALUE",
                   help="a defense option as KEY=VALUE (repeatable), e.g. adapt_temp=0.2; same names as the flags")


def cmd_train(a) -> int:
    from qnn.config import TrainConfig, build, load_yaml
    from qnn.train import train

    file_cfg = load_yaml(a.config) if a.config else {}
    over = {k: v for k, v in vars(a).items() if k not in ("cmd", "config", "func")}
    dargs = file_cfg.pop("defense_args", None) or {}
    if not isinstance(dargs, dict):
        raise QNNError(f"defense_args must be a mapping of option: value, got {dargs!r}")
    dargs = dict(dargs)
    from qnn.defenses import option_table

    for k in option_table():
        v = over.pop(k, None)
        if v is not None and v is not False:
            dargs[k] = v
    for kv in over.pop("defense_arg", None) or []:
        key, eq, val = kv.partition("=")
        if not eq or not key.strip():
            raise QNNError(f"--defense-arg expects KEY=VALUE, got {kv!r}")
        import yaml

        dargs[key.strip()] = yaml.safe_load(val) if val.strip() else None
    cfg = build(TrainConfig, file_cfg, over)
    cfg.defense_args = dargs
    from qnn.defenses import make_defense  # validate defense + args before any work
    from qnn.models import create_model

    make_defense(cfg.defense, cfg.defense_args, cfg, create_model(cfg.model)) if cfg.defense != "none" else None
    res = train(cfg)
    print(json.dumps({"out_dir": cfg.out_dir, "final": res["final"]}, indent=2))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="clean accuracy per bit-width (JSON + table)")
    p.add_argument("--checkpoint", required=True, help="qnn checkpoint (model.pt written by qnn train)")
    add_user_model_option(p)
    p.add_argument("--dataset", default="synthetic", help="synthetic (embedded, no download) | cifar10 | imagefolder (default synthetic)")
    p.add_argument("--data-dir", help="dataset folder (CIFAR-10 npz or cifar-10-batches-py; ImageFolder root)")
    p.add_argument("--bits", default="32,8,4,2", help="bit-widths to evaluate (default 32,8,4,2)")
    p.add_argument("--subset", type=arg_int(1), help="evaluate on the first N test images")
    p.add_argument("--calibrate", action="store_true", help="recompute BN/scales for bit-widths never trained")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--seed", type=arg_seed(), default=0, help="seed (default 0)")


def cmd_eval(a) -> int:
    from qnn.checkpoint import atomic_write_json, load_checkpoint, trained_bits
    from qnn.data import check_data_fits, load_dataset
    from qnn.layers import parse_bits
    from qnn.outputs import check_output
    from qnn.train import calibrate_, evaluate, versions

    bits = parse_bits(a.bits)
    if a.json:
        check_output(a.json, "file", (a.checkpoint, a.data_dir), overwrite=a.overwrite)
    model, obj = load_checkpoint(a.checkpoint, user_model=a.model)
    test = load_dataset(a.dataset, "test", a.data_dir, seed=a.seed, like=model).subset(a.subset)
    check_data_fits(model, test, "test set")
    trained = trained_bits(obj)
    missing = [b for b in bits if b not in trained and b != 32]
    if missing and not a.calibrate:
        raise QNNError(f"{a.checkpoint} was not trained at {missing} bits (trained: {trained}); pass --calibrate")
    if missing:
        train_ds = load_dataset(a.dataset, "train", a.data_dir, seed=a.seed, like=model)
        for b in missing:
            calibrate_(model, train_ds, b)
    acc = evaluate(model, test, bits)
    res = {"checkpoint": a.checkpoint, "dataset": a.dataset, "n_images": len(test),
           "accuracy_pct": {str(k): v for k, v in acc.items()}, "versions": versions()}
    print("| bits | top-1 % |\n|---|---|")
    for k, v in acc.items():
        print(f"| {k} | {v:.2f} |")
    if a.json:
        atomic_write_json(a.json, res)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (QNNError), not as a usage block."""

    def error(self, message: str):
        raise QNNError(f"{self.prog.removeprefix('qnn').strip() or 'qnn'}: {message} (see {self.prog} --help)")


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="what the toolkit offers: models, defenses, attacks, export formats or the ops a "
                       "model may contain")
    p.add_argument("what", choices=["models", "defenses", "attacks", "formats", "ops"],
                   help="models | defenses | attacks | formats | ops")


def cmd_list(a) -> int:
    if a.what == "models":
        from qnn.models import list_models

        names = list_models() + ["path/to/file.py:factory (your own float CNN or Brevitas model)"]
    elif a.what == "defenses":
        from qnn.defenses import list_defenses

        names = list_defenses()
    elif a.what == "attacks":
        from qnn.attacks.registry import get_attack, list_attacks
        from qnn.evaluation import PROTOCOLS

        width = max(map(len, list_attacks()))
        names = [f"{n:<{width}}  {get_attack(n).summary}" for n in list_attacks()]
        names += [f"protocols (--protocol): {', '.join(PROTOCOLS)}"]
    elif a.what == "ops":
        from qnn.integer import describe_constructs

        names = describe_constructs()
    else:
        from qnn.export.onnx_export import FORMATS

        names = list(FORMATS)
    print("\n".join(names))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The `qnn` parser and its subcommands' handlers by name."""
    import importlib

    from qnn import __version__

    ap = _Parser(prog="qnn", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"qnn {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_list(sub)
    cmds = {"train": cmd_train, "eval": cmd_eval, "list": cmd_list}
    for mod in ("qnn.attacks.cli", "qnn.export.cli", "qnn.pipeline", "qnn.certify_cli"):  # commands beside their code
        for name, (adder, fn) in importlib.import_module(mod).COMMANDS.items():
            adder(sub)
            cmds[name] = fn
    return ap, cmds


def main(argv: list[str] | None = None) -> int:
    import warnings

    with warnings.catch_warnings(record=True) as seen:  # the filters stay as they are; only the showing waits
        try:
            ap, cmds = build_parser()
            a = ap.parse_args(argv)
            rc = cmds[a.cmd](a)
        except (QNNError, OSError) as e:  # a refusal is one line: warnings the failed attempt raised are dropped
            said = e if isinstance(e, QNNError) else f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
            print(f"qnn: error: {said}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("qnn: interrupted (outputs so far are kept; rerun with --resume where supported)", file=sys.stderr)
            return 130
        except BaseException:  # a bug's traceback: its warnings may explain it
            _replay(seen)
            raise
        pending = list(seen)
    _replay(pending)
    return rc


def _replay(seen) -> None:
    """Show the warnings a command raised, once each and one line each, after it (a failed command shows only its
    error line)."""
    shown = set()
    for w in seen:
        text = " ".join(str(w.message).split())
        if text not in shown:
            shown.add(text)
            print(f"qnn: warning: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

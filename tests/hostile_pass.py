"""A hostile user's pass over every command: bad options, bad files, bad data, outputs aimed at inputs.

    python -m tests.hostile_pass [--out results/hostile_pass.json]

Each case runs the command in this process. It passes when the command exits 2 with one line on stderr
starting with `qnn: error:` / `run_edge: error:` (no traceback), and every file of a protected earlier run, bundle
and checkpoint is unchanged (sha256 before and after). Prints one line per case and the counts; exits 1 if any
case failed. Not part of the default test run (it takes a few minutes); tests/qnn/test_hardening.py holds the
checks per failure class.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tree_hashes(d: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def run_case(fn, argv) -> tuple[int | None, str, str | None]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = fn([str(a) for a in argv])
        return rc, err.getvalue().strip(), None
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1, err.getvalue().strip(), None
    except BaseException as e:  # a traceback reached the user
        return None, err.getvalue().strip(), "".join(traceback.format_exception_only(type(e), e)).strip()


def setup(w: Path) -> dict:
    from qnn.export.bundle import build_bundle
    from qnn.attacks.patch import PatchConfig, save_patch
    from qnn.checkpoint import load_checkpoint
    from qnn.config import TrainConfig
    from qnn.data import load_dataset
    from qnn.train import train

    run = w / "protected" / "run"
    train(TrainConfig(model="small_cnn", bits=[4, 8], epochs=1, n_synthetic=400, batch_size=64, out_dir=str(run),
                      progress=False))
    ck = run / "model.pt"
    m, _ = load_checkpoint(ck)
    ds = load_dataset("synthetic", "test", n_synthetic=400).subset(32)
    patch = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    bundle = build_bundle(m, 4, w / "protected" / "bundle", ds.x, ds.y, [("p6", patch, PatchConfig())])
    save_patch(w / "protected" / "p6", patch, PatchConfig())
    packed = build_bundle(m, 4, w / "protected" / "packed", ds.x, ds.y, [("p6", patch, PatchConfig())],
                          pack_weights=True)
    # finished runs a resume must not trust once tampered: on CIFAR-layout data and a user-model file of their own
    data = w / "protected" / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.savez(data / f"{split}.npz", x=rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, 128))
    src = w / "protected" / "mymodel.py"
    src.write_text((ROOT / "tests" / "qnn" / "user_models.py").read_text())
    resumable = {}
    for name, defense in (("qat", "none"), ("qadtr", "qadtr")):
        resumable[name] = w / "protected" / f"resume_{name}"
        train(TrainConfig(model=f"{src}:tiny_cnn", dataset="cifar10", data_dir=str(data), bits=[4, 8], epochs=2,
                          batch_size=64, defense=defense, out_dir=str(resumable[name]), progress=False))
    return {"run": run, "ck": ck, "bundle": bundle, "packed": packed, "patch": w / "protected" / "p6.npz",
            "data": data, "model_file": src, "resumable": resumable}


def tampered_runs(w: Path, P: dict) -> dict:
    """Copies of the finished runs whose resume state, data or model file was changed after they ran."""
    def variant(name, base, edit):
        d = w / f"resume_{name}"
        shutil.copytree(base, d)
        st = torch.load(d / "last.pt", weights_only=False)
        edit(st)
        torch.save(st, d / "last.pt")
        return d

    qat, qadtr = P["resumable"]["qat"], P["resumable"]["qadtr"]
    out = {"epoch 99": variant("e99", qat, lambda st: st.update(epoch=99)),
           "epoch -1": variant("em1", qat, lambda st: st.update(epoch=-1)),
           "epoch '1'": variant("estr", qat, lambda st: st.update(epoch="1")),
           "history of another length": variant("hist", qat, lambda st: st.update(history=st["history"][:1])),
           "qadtr pool NaN": variant("pool", qadtr, lambda st: st["defense"]["pool"].fill_(float("nan"))),
           "qadtr state a list": variant("dlist", qadtr, lambda st: st.update(defense=[1, 2])),
           "qadtr ema out of range": variant("ema", qadtr, lambda st: st["defense"]["asr_ema"].update({"4": 7.0}))}
    # runs whose data folder, or model file, changed under the same path after they ran
    from qnn.config import TrainConfig
    from qnn.train import train

    data2, model2 = w / "data_changed", w / "model_edited.py"
    shutil.copytree(P["data"], data2)
    model2.write_text(P["model_file"].read_text())
    inputs = {"data_changed": (P["model_file"], data2), "model_edited": (model2, P["data"])}
    for name, (model, data) in inputs.items():
        out[name] = w / f"resume_{name}"
        train(TrainConfig(model=f"{model}:tiny_cnn", dataset="cifar10", data_dir=str(data), bits=[4, 8], epochs=2,
                          batch_size=64, out_dir=str(out[name]), progress=False))
    z = dict(np.load(data2 / "train.npz"))
    z["x"][0, 0, 0, 0] ^= 1  # one pixel
    np.savez(data2 / "train.npz", **z)
    model2.write_text(model2.read_text() + "\n# edited; same parameter shapes\n")
    return {"runs": out, "inputs": inputs}


def files(w: Path, P: dict) -> dict:
    """Bad input files, made once."""
    f = {}
    f["text"] = w / "text.pt"
    f["text"].write_text("hello")
    f["empty"] = w / "empty.pt"
    f["empty"].write_bytes(b"")
    f["tensor"] = w / "tensor.pt"
    torch.save(torch.zeros(3), f["tensor"])
    f["list"] = w / "list.pt"
    torch.save([1, 2, 3], f["list"])
    obj = torch.load(P["ck"], weights_only=True)
    for name, edit in (("noformat", lambda o: o.pop("format")), ("arch_int", lambda o: o.update(arch=3)),
                       ("arch_unknown", lambda o: o.update(arch="vgg99")),
                       ("sd_missing_key", lambda o: o["state_dict"].pop(next(iter(o["state_dict"])))),
                       ("sd_shape", lambda o: o["state_dict"].update(
                           {k: torch.zeros(1) for k in list(o["state_dict"])[:1]})),
                       ("inf", lambda o: o["state_dict"].update(
                           {k: v.clone().fill_(float("inf")) for k, v in list(o["state_dict"].items())[:1]
                            if v.is_floating_point()})),
                       ("bits_bad", lambda o: o.update(trained_bits=[4, 99]))):
        o = {k: (dict(v) if isinstance(v, dict) else v) for k, v in obj.items()}
        edit(o)
        f[name] = w / f"{name}.pt"
        torch.save(o, f[name])
    f["yaml_bad"] = w / "bad.yaml"
    f["yaml_bad"].write_text("epochs: [1\n")
    f["yaml_list"] = w / "list.yaml"
    f["yaml_list"].write_text("- 1\n")
    for name, text in (("unknown", "epochs_: 2"), ("nan_wd", "weight_decay: .nan"), ("str_bits", "bits: four"),
                       ("neg_sub", "train_subset: -3"), ("dargs_nan", "defense: qadtr\ndefense_args: {lambda_gir: .nan}"),
                       ("float_seed", "seed: 0.5"), ("null_lr", "lr: null"), ("huge_lr", "lr: 1.0e+300")):
        f[name] = w / f"{name}.yaml"
        f[name].write_text(text + "\n")
    for name, x, y in (("labels_big", np.zeros((8, 32, 32, 3), np.uint8), np.full(8, 10)),
                       ("labels_2d", np.zeros((8, 32, 32, 3), np.uint8), np.zeros((8, 1), np.int64)),
                       ("x_float", np.zeros((8, 32, 32, 3), np.float32), np.zeros(8, np.int64)),
                       ("x_gray", np.zeros((8, 32, 32), np.uint8), np.zeros(8, np.int64)),
                       ("len_mismatch", np.zeros((8, 32, 32, 3), np.uint8), np.zeros(7, np.int64)),
                       ("empty_set", np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))):
        d = w / f"data_{name}"
        d.mkdir()
        for split in ("train", "test"):
            np.savez(d / f"{split}.npz", x=x, y=y)
        f[name] = d
    f["npz_garbage"] = w / "data_garbage"
    f["npz_garbage"].mkdir()
    for split in ("train", "test"):
        (f["npz_garbage"] / f"{split}.npz").write_bytes(b"PK\x03\x04garbage")
    f["pickle_evil"] = w / "data_pickle" / "cifar-10-batches-py"
    f["pickle_evil"].mkdir(parents=True)
    for n in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        (f["pickle_evil"] / n).write_bytes(pickle.dumps({"data": os.system, "labels": [0]}))
    f["imgdir_bad"] = w / "imgs" / "cls"
    f["imgdir_bad"].mkdir(parents=True)
    (f["imgdir_bad"] / "a.png").write_bytes(b"not a png")
    f["patch_big"] = w / "patch_big.npz"
    from qnn.attacks.patch import PatchConfig

    np.savez(f["patch_big"], patch=np.full((3, 6, 6), 1.5, np.float32), config=json.dumps(PatchConfig().to_dict()))
    f["patch_cfg"] = w / "patch_cfg.npz"
    np.savez(f["patch_cfg"], patch=np.zeros((3, 6, 6), np.float32), config=json.dumps({"bogus": 1}))
    f["patch_size16"] = w / "patch_size16.npz"
    np.savez(f["patch_size16"], patch=np.zeros((3, 6, 6), np.float32),
             config=json.dumps(PatchConfig(image_size=(16, 16)).to_dict()))
    f["suite_bad"] = w / "suite_bad.yaml"
    f["suite_bad"].write_text("patches:\n  - {patch_shape: [0, 0]}\n")
    f["suite_key"] = w / "suite_key.yaml"
    f["suite_key"].write_text("patches:\n  - {bogus: 1}\n")
    f["suite_int"] = w / "suite_int.yaml"
    f["suite_int"].write_text("patches:\n  - {patch_shape: 5}\n")
    f["batch_short"] = w / "data_short" / "cifar-10-batches-py"
    f["batch_short"].mkdir(parents=True)
    for n in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        (f["batch_short"] / n).write_bytes(pickle.dumps({"data": b"\x00" * 100, "labels": [0]}))
    f["suite_nolist"] = w / "suite_nolist.yaml"
    f["suite_nolist"].write_text("patches: 3\n")
    f["afile"] = w / "afile"
    f["afile"].write_text("x")
    return f


def bundle_variants(w: Path, bundle: Path, packed: Path) -> dict:
    """Hostile bundles: contents re-signed so that only the content checks can catch them."""
    def variant(name, edit, resign=True, base=bundle):
        d = w / f"bundle_{name}"
        shutil.copytree(base, d)
        man = json.loads((d / "manifest.json").read_text())
        man = edit(d, man)
        if resign and isinstance(man, dict) and isinstance(man.get("files"), dict):
            for fn in list(man["files"]):
                if (d / fn).is_file() and "/" not in fn:
                    man["files"][fn] = hashlib.sha256((d / fn).read_bytes()).hexdigest()
        (d / "manifest.json").write_text(json.dumps(man) if man is not None else "{not json")
        return d

    def put(name, data):
        def edit(d, man):
            (d / name).write_bytes(data) if isinstance(data, bytes) else np.savez(d / name, **data)
            return man
        return edit

    def expected(change):
        def edit(d, man):
            e = json.loads((d / "expected.json").read_text())
            (d / "expected.json").write_text(json.dumps(change(e)))
            return man
        return edit

    def packed_shape(d, man):
        next(iter(man["packed_weights"]["tensors"].values()))["shape"] = [2 ** 32, 2 ** 32, 4]  # wraps int64
        return man

    return {
        "packed shape overflows int64": variant("pshape", packed_shape, resign=False, base=packed),
        "expected.json says 8-bit for a 4-bit packed model": variant("pbits", expected(lambda e: {**e, "bits": 8}),
                                                                     base=packed),
        "manifest_not_json": variant("notjson", lambda d, m: None),
        "files_values_int": variant("intsha", lambda d, m: {**m, "files": {k: 1 for k in m["files"]}}, resign=False),
        "model_garbage": variant("garbage", put("model.onnx", b"\x08\x01garbage")),
        "eval_float_labels": variant("floaty", put("eval.npz", {"x": np.zeros((32, 32, 32, 3), np.uint8),
                                                                "y": np.zeros(32, np.float32)})),
        "eval_missing_x": variant("nox", put("eval.npz", {"y": np.zeros(32, np.int64)})),
        "eval_npz_garbage": variant("npzg", put("eval.npz", b"PK\x03\x04junk")),
        "expected_list": variant("explist", expected(lambda e: [e])),
        "expected_patches_list": variant("patchlist", expected(lambda e: {**e, "patches": []})),
        "expected_acc_nan": variant("accnan", expected(lambda e: {**e, "clean_acc_pct": float("nan")})),
        "patch_missing_mask": variant("nomask", put("patch_p6.npz", {"patch": np.zeros((3, 6, 6), np.float32),
                                                                    "loc": np.zeros((32, 2), np.int64)})),
        "patch_name_traversal": variant("pname", expected(lambda e: {**e, "patches": {"../../x": e["patches"]["p6"]}})),
        "expected_preds_short": variant("preds", put("expected_predictions.npz", {"clean": np.zeros(3, np.int64)})),
    }


def cases(w: Path, P: dict, F: dict, B: dict, TR: dict) -> list[tuple[str, str, list]]:
    ck, out = P["ck"], w / "out"
    T = ["train", "--no-progress", "--out", out / "t"]
    E = ["eval", "--checkpoint", ck]
    A = ["attack", "--checkpoint", ck, "--iterations", 2, "--n-attack", 16, "--n-eval", 16, "--out", out / "a"]
    X = ["export", "--checkpoint", ck, "--bits", 4, "--out", out / "m.onnx"]
    BU = ["bundle", "--checkpoint", ck, "--bits", 4, "--n", 8, "--out", out / "b"]
    PI = ["pipeline", "--out", out / "p", "--n-synthetic", 200, "--epochs", 1, "--n-attack", 16, "--n-eval", 16]
    R = ["--bundle"]
    c = []
    q = lambda name, argv: c.append((name, "qnn", argv))  # noqa: E731
    r = lambda name, argv: c.append((name, "run_edge", argv))  # noqa: E731
    for v in ("", "4,abc", "1", "33", "-4", "4.0", "4,,4", "9,2"):
        q(f"train --bits {v!r}", T + ["--bits", v])
    for flag, v in (("--schedule", "zigzag"), ("--epochs", "0"), ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "1e308"),
                    ("--weight-decay", "-1"), ("--first-last-bits", "1"), ("--residual-bits", "9"),
                    ("--train-subset", "0"), ("--test-subset", "-1"), ("--eval-bits", "4,4"), ("--device", "cuda:x"),
                    ("--pool-size", "0"), ("--lambda-gir", "-1"), ("--distill-alpha", "nan"),
                    ("--dataset", "mnist"), ("--model", "resnet9000")):
        q(f"train {flag} {v}", T + [flag, v])
    for name in ("text", "empty", "tensor", "list", "noformat", "arch_int", "arch_unknown", "sd_missing_key",
                 "sd_shape", "inf", "bits_bad"):
        q(f"train --init {name}", T + ["--init", F[name]])
        q(f"eval --checkpoint {name}", ["eval", "--checkpoint", F[name]])
    q("train --init /dev/null", T + ["--init", "/dev/null"])
    q("train --init a folder", T + ["--init", w])
    q("train --distill missing", T + ["--distill", w / "nope.pt"])
    for kv in ("x=1", "=3", "pool_size=abc", "pool_size=-1", "pool_size=1.5", "patch_size=0", "patch_size=100",
               "sizes=a,b", "lambda_gir=-1", "frac_patched=2", "gir_every=0"):
        q(f"train qadtr --defense-arg {kv}", T + ["--defense", "qadtr", "--defense-arg", kv])
    q("train --defense foo", T + ["--defense", "foo"])
    q("train pbat iters=0", T + ["--defense", "pbat", "--defense-arg", "iters=0"])
    q("train dwq eps=nan", T + ["--defense", "dwq", "--defense-arg", "eps=.nan"])
    for name in ("yaml_bad", "yaml_list", "unknown", "nan_wd", "str_bits", "neg_sub", "dargs_nan", "float_seed",
                 "null_lr", "huge_lr"):
        q(f"train -c {name}", T + ["-c", F[name]])
    q("train -c missing", T + ["-c", w / "missing.yaml"])
    for name in ("labels_big", "labels_2d", "x_float", "x_gray", "len_mismatch", "empty_set", "npz_garbage",
                 "pickle_evil"):
        q(f"train cifar10 data {name}", T + ["--dataset", "cifar10", "--data-dir", F[name]])
    q("eval cifar10 evil pickle", E + ["--dataset", "cifar10", "--data-dir", F["pickle_evil"].parent])
    q("train imagefolder corrupt image", T + ["--dataset", "imagefolder", "--data-dir", F["imgdir_bad"].parent])
    q("train imagefolder no --data-dir", T + ["--dataset", "imagefolder"])
    q("train --data-dir a file", T + ["--dataset", "cifar10", "--data-dir", F["afile"]])
    q("train --out a file", ["train", "--no-progress", "--out", F["afile"]])
    q("train --out under a file", ["train", "--no-progress", "--out", F["afile"] / "x"])
    q("train --out /proc", ["train", "--no-progress", "--out", "/proc/qnn_run"])
    q("train --out ''", ["train", "--no-progress", "--out", ""])
    q("train --out . --overwrite", ["train", "--no-progress", "--out", ".", "--overwrite"])
    q("train --out the protected run", ["train", "--no-progress", "--out", P["run"]])
    q("train --resume other bits", ["train", "--no-progress", "--out", P["run"], "--resume", "--bits", "2,4",
                                    "--epochs", "1"])
    q("train --overwrite into the init's folder", ["train", "--no-progress", "--out", P["run"], "--overwrite",
                                                    "--init", ck])
    q("eval --bits untrained", E + ["--bits", 3])
    q("eval --subset -5", E + ["--subset", -5])
    q("eval --json is the checkpoint", E + ["--json", ck])
    q("eval --json a folder", E + ["--json", w])
    q("eval --seed -1", E + ["--seed", -1])
    for flag, v in (("--attack", "cw"), ("--shape", "hex"), ("--placement", "above"), ("--optimizer", "lbfgs"),
                    ("--patch-size", "0"), ("--patch-size", "40"), ("--patch-frac", "0"), ("--iterations", "0"),
                    ("--restarts", "0"), ("--eot-samples", "-1"), ("--step", "inf"), ("--eps", "0"),
                    ("--rotation-max", "200"), ("--adaptive", "bogus"), ("--threads", "0"), ("--bits", "4,4"),
                    ("--n-eval", "0"), ("--target-class", "-1")):
        q(f"attack {flag} {v}", A + [flag, v])
    q("attack --targeted --target-class 10", A + ["--targeted", "--target-class", 10])
    q("attack --scale-min 2 --scale-max 1", A + ["--scale-min", 2, "--scale-max", 1])
    for name in ("patch_big", "patch_cfg", "text"):
        q(f"attack --patch {name}", A + ["--patch", F[name]])
    q("attack --patch missing", A + ["--patch", w / "nope.npz"])
    q("attack --patch for 16x16 images", A + ["--patch", F["patch_size16"]])
    for name in ("suite_bad", "suite_key", "suite_nolist", "yaml_bad"):
        q(f"attack --suite {name}", A + ["--suite", F[name]])
    q("attack --suite unknown", A + ["--suite", "nosuchsuite"])
    q("attack --source-checkpoint missing", A + ["--source-bits", 4, "--source-checkpoint", w / "nope.pt"])
    q("attack --out the protected run", A[:-1] + [P["run"]])
    q("attack --out holds the checkpoint", A[:-1] + [P["run"].parent, "--overwrite"])
    for flag, v in (("--format", "tflite"), ("--weight-type", "int4")):
        q(f"export {flag} {v}", X + [flag, v])
    for v in (3, 32, 0):
        q(f"export --bits {v}", ["export", "--checkpoint", ck, "--bits", v, "--out", out / "m.onnx"])
    q("export --out is the checkpoint", X[:-1] + [ck])
    q("export --out a folder", X[:-1] + [w])
    q("export --checkpoint inf weights", ["export", "--checkpoint", F["inf"], "--bits", 4, "--out", out / "m.onnx"])
    q("verify missing", ["verify", w / "nope.onnx"])
    q("verify text", ["verify", F["text"]])
    q("verify --level bogus", ["verify", F["text"], "--level", "bogus"])
    q("bundle --n 0", BU + ["--n", 0])
    q("bundle --patch missing", BU + ["--patch", w / "nope.npz"])
    q("bundle --patch values > 1", BU + ["--patch", F["patch_big"]])
    q("bundle --patch for 16x16 images", BU + ["--patch", F["patch_size16"]])
    q("bundle --out the protected bundle", BU[:-1] + [P["bundle"]])
    q("bundle --out holds the checkpoint --overwrite", BU[:-1] + [P["run"], "--overwrite"])
    q("bundle --bits 3 untrained", ["bundle", "--checkpoint", ck, "--bits", 3, "--n", 8, "--out", out / "b"])
    q("pipeline --export-bits not trained", PI + ["--bits", "2,4", "--export-bits", 8])
    q("pipeline --export-bits 32", PI + ["--export-bits", 32])
    q("pipeline --patch-size 0", PI + ["--patch-size", 0])
    q("pipeline --patch-size 40", PI + ["--patch-size", 40])
    q("pipeline --n-attack >= train set", PI + ["--n-attack", 500])
    q("pipeline --model unknown", PI + ["--model", "nosuch"])
    q("pipeline --threads -1", PI + ["--threads", -1])
    q("pipeline --out the protected run --overwrite --bits 9", PI[:2] + [P["run"], "--overwrite", "--bits", 9])
    q("pipeline --seed 2**64", PI + ["--seed", 2**64])
    q("attack --seed 2**64", A + ["--seed", 2**64])
    q("attack --suite patch_shape 5", A + ["--suite", F["suite_int"]])
    q("eval --json inside the data folder", E + ["--dataset", "cifar10", "--data-dir", F["labels_big"],
                                                 "--json", F["labels_big"] / "test.npz"])
    q("train --out inside the data folder", T[:2] + ["--dataset", "cifar10", "--data-dir", F["labels_big"], "--out",
                                                     F["labels_big"] / "runs"])
    q("train --out X.partial", ["train", "--no-progress", "--out", w / "x.partial"])
    q("train --resume into a folder of other results", ["train", "--no-progress", "--out", P["bundle"], "--resume"])
    q("bundle two patches of one name", BU + ["--patch", P["patch"], "--patch", P["patch"]])
    q("train cifar10 batch of the wrong length", T + ["--dataset", "cifar10", "--data-dir", F["batch_short"]])
    user = ROOT / "tests" / "qnn" / "user_models.py"
    for spec in (f"{w / 'nope.py'}:f", f"{user}:nope", f"{user}:not_a_module", f"{user}:untraceable",
                 f"{user}:with_softplus", f"{user}:1bad", f"{F['afile']}.py:f"):
        q(f"train --model {spec.rpartition('/')[2]}", T + ["--model", spec])
    q("eval --model on a zoo checkpoint with another file", E + ["--model", f"{user}:tiny_cnn"])
    # round three (#36): outputs over what the command did not make, resume trusting its state, nonsense values
    q("eval --json over a run's model.pt", E + ["--json", P["run"] / "model.pt", "--overwrite"])
    q("export --out over a run's last.pt", X[:-1] + [P["run"] / "last.pt", "--overwrite"])
    q("export --out an existing file", X[:-1] + [P["bundle"] / "model.onnx"])
    q("eval --json an existing file", E + ["--json", P["bundle"] / "expected.json"])
    RS = ["train", "--no-progress", "--model", f"{P['model_file']}:tiny_cnn", "--dataset", "cifar10", "--bits", "4,8",
          "--epochs", 2, "--batch-size", 64, "--resume"]
    for name, d in TR["runs"].items():
        model, data = TR["inputs"].get(name, (P["model_file"], P["data"]))
        q(f"train --resume {name}", RS[:2] + ["--model", f"{model}:tiny_cnn"] + RS[4:] + ["--data-dir", data, "--out", d]
          + (["--defense", "qadtr"] if "qadtr" in name else []))
    QT = T + ["--defense", "qadtr"]
    for flag, v in (("--inner-steps", "1000000000"), ("--patch-step", "1e9"), ("--inner-step", "5"),
                    ("--gir-batch", "1000")):
        q(f"train qadtr {flag} {v}", QT + [flag, v])
    q("train qadtr --no-gir --lambda-gir 3", QT + ["--no-gir", "--lambda-gir", 3])
    q("train qadtr --no-aqapa --pool-size 4", QT + ["--no-aqapa", "--pool-size", 4])
    q("train pbat iters 1e6", T + ["--defense", "pbat", "--iters", 10**6])
    q("bundle --n 100000", BU + ["--n", 100000])
    q("eval --subset 100000", E + ["--subset", 100000])
    q("attack --n-eval 100000", A + ["--n-eval", 100000])
    fac = w / "factories.py"
    fac.write_text("import sys\ndef exits():\n    sys.exit(0)\ndef interrupts():\n    raise KeyboardInterrupt\n"
                   "raise_at_import = False\n")
    for f in ("exits", "interrupts"):
        q(f"train --model factory that {f}", T + ["--model", f"{fac}:{f}"])
    (w / "exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    q("train --model file that exits on import", T + ["--model", f"{w / 'exits_at_import.py'}:f"])
    c.append(("eval --json on a full disk", "qnn_full_disk", E + ["--bits", 4, "--json", out / "r.json"]))
    c.append(("train on a full disk", "qnn_full_disk", T + ["--bits", 4, "--epochs", 1]))
    c.append(("export on a full disk", "qnn_full_disk", X))
    C = ["certify", "--checkpoint", ck, "--bits", 4, "--n", 4, "--mask-positions", 2, "--out", out / "c"]
    for flag, v in (("--patch-size", 0), ("--patch-size", 40), ("--patch-size", "4,x"), ("--mask-positions", 0),
                    ("--method", "derandomized"), ("--bits", 3), ("--n", 100000), ("--n", -1), ("--batch-size", 0)):
        q(f"certify {flag} {v}", C + [flag, v])
    q("certify --axis-coverage 0 certmask", C + ["--method", "certmask", "--axis-coverage", 0])
    q("certify --out the protected run", C[:-1] + [P["run"]])
    q("certify --checkpoint text", ["certify", "--checkpoint", F["text"], "--out", out / "c"])
    q("bundle --certify-patch-size 40", BU + ["--certify-patch-size", 40])
    q("bundle --mask-positions without a patch size", BU + ["--mask-positions", 3])
    r("run_edge --certify on a bundle without masks", R + [P["bundle"], "--certify", "--skip-latency"])
    r("run_edge --bundle missing", R + [w / "nope"])
    r("run_edge --bundle a file", R + [F["afile"]])
    r("run_edge --bundle a run folder", R + [P["run"]])
    for name, d in B.items():
        r(f"run_edge {name}", R + [d, "--skip-latency"])
    for flag, v in (("--threads", "2000"), ("--batch", "0"), ("--warmup", "-1"), ("--tolerance", "inf"),
                    ("--json", w / "no" / "r.json"), ("--save-logits", P["bundle"] / "model.onnx")):
        r(f"run_edge {flag} {v}", R + [P["bundle"], flag, v])
    return c


@contextlib.contextmanager
def full_disk():
    """Every write through qnn's atomic writers fails as on a full disk (ENOSPC at the flush)."""
    import errno

    import qnn.checkpoint as C

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    orig, C.os.fsync = C.os.fsync, fsync
    try:
        yield
    finally:
        C.os.fsync = orig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the per-case outcomes here (JSON)")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    from qnn.export.run_edge import main as run_edge_main
    from qnn.cli import main as qnn_main

    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        P = setup(w)
        F = files(w, P)
        B = bundle_variants(w, P["bundle"], P["packed"])
        TR = tampered_runs(w, P)
        protected = tree_hashes(w / "protected")
        outcomes, t0 = [], time.perf_counter()
        cwd = os.getcwd()
        os.chdir(w)  # `--out .` must not be able to reach the repository
        try:
            for name, tool, argv in cases(w, P, F, B, TR):
                with full_disk() if tool == "qnn_full_disk" else contextlib.nullcontext():
                    rc, err, exc = run_case(run_edge_main if tool == "run_edge" else qnn_main, argv)
                prefix = f"{'run_edge' if tool == 'run_edge' else 'qnn'}: error:"
                one_line = bool(err) and "\n" not in err and err.startswith(prefix)
                intact = tree_hashes(w / "protected") == protected
                # a refusal or failure leaves no staging folder, lock or half-written file behind
                left = [str(p.relative_to(w)) for p in w.rglob("*")
                        if p.name.endswith((".partial", ".lock", ".tmp"))]
                for p in left:
                    shutil.rmtree(w / p, ignore_errors=True) if (w / p).is_dir() else (w / p).unlink()
                ok = exc is None and rc == 2 and one_line and intact and not left
                outcomes.append({"case": name, "rc": rc, "ok": ok, "stderr": err[-300:], "exception": exc,
                                 "protected_unchanged": intact, "left_behind": left})
                print(f"{'ok  ' if ok else 'FAIL'} rc={rc} {name}: {(exc or err).splitlines()[-1][:150] if (exc or err) else ''}",
                      flush=True)
        finally:
            os.chdir(cwd)
    n_ok = sum(o["ok"] for o in outcomes)
    print(f"\n{n_ok} passed, {len(outcomes) - n_ok} failed ({len(outcomes)} hostile cases, "
          f"{time.perf_counter() - t0:.0f}s)")
    if a.out:
        from qnn.checkpoint import atomic_write_json
        from qnn.train import versions

        atomic_write_json(a.out, {"cases": outcomes, "passed": n_ok, "failed": len(outcomes) - n_ok,
                                  "versions": versions()})
    return 0 if n_ok == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

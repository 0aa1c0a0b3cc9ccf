import ast
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

RUN_EDGE = ROOT / "export" / "run_edge.py"


def test_run_edge_imports_only_stdlib_numpy_onnxruntime():
    tree = ast.parse(RUN_EDGE.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime"}
    assert mods <= allowed, mods - allowed
    # and it runs in a process where torch/qnn cannot be imported
    code = ("import sys; sys.modules['torch'] = None; sys.modules['qnn'] = None; sys.argv = ['x', '--help'];"
            f"exec(open({str(RUN_EDGE)!r}).read())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "--bundle" in r.stdout, r.stderr


def _build(ckpt, d, bits=4, **kw):
    from qnn.export.bundle import build_bundle
    from qnn.attacks.patch import PatchConfig
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset

    m, _ = load_checkpoint(ckpt)
    ds = load_dataset("synthetic", "test", n_synthetic=2000).subset(64)
    patch = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    return build_bundle(m, bits, d, ds.x, ds.y, [("p6", patch, PatchConfig())], **kw)


@pytest.fixture(scope="module")
def bundle(trained_ckpt, tmp_path_factory):
    return _build(trained_ckpt, tmp_path_factory.mktemp("bundle") / "b")


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_bundle_is_smaller_and_runs_the_same_model(trained_ckpt, tmp_path, bits):
    import onnx
    from onnx import numpy_helper

    from qnn.export.run_edge import Bundle, EdgeError, packed_weights

    plain, packed = _build(trained_ckpt, tmp_path / "plain", bits), _build(trained_ckpt, tmp_path / "packed", bits,
                                                                           pack_weights=True)
    man = json.loads((packed / "manifest.json").read_text())
    assert man["packed_weights"]["file"] in man["files"]
    packed_bits = {t["bits"] for t in man["packed_weights"]["tensors"].values()}
    assert bits in packed_bits and packed_bits <= {2, bits}  # 0/1 shortcut embeddings fit 2 bits at any width
    # the export lifts sub-8-bit weights (qnn.integer.weight_lift); they travel packed unlifted, with their lift
    from qnn.integer import weight_lift
    assert weight_lift(bits) in {t["lift"] for t in man["packed_weights"]["tensors"].values()}
    size = lambda b: (b / "model.onnx").stat().st_size + sum(  # noqa: E731
        (b / f).stat().st_size for f in ("weights.packed.npz",) if (b / f).exists())
    assert size(packed) < size(plain)
    # unpacked, the weights are exactly the plain export's, and nothing else in the graph differs
    m_plain, m_packed = onnx.load(str(plain / "model.onnx")), onnx.load(str(packed / "model.onnx"), load_external_data=False)
    ref = {i.name: numpy_helper.to_array(i) for i in m_plain.graph.initializer}
    unpacked = packed_weights(Bundle(str(packed)))
    assert unpacked and all(np.array_equal(w, ref[n]) and w.dtype == ref[n].dtype for n, w in unpacked.items())
    # a hostile manifest cannot unpack weights that wrap in their container or could saturate an int8 kernel
    changes = [({"lift": 3}, "lift"), ({"lift": True}, "lift"), ({"bits": float(bits)}, "bits")]
    if bits == 4:
        changes.append(({"lift": 64}, "beyond"))
    for change, msg in changes:
        odd = Bundle(str(packed))
        next(t for t in odd.manifest["packed_weights"]["tensors"].values() if t["bits"] == bits).update(change)
        with pytest.raises(EdgeError, match=msg):
            packed_weights(odd)
    for i in m_packed.graph.initializer:
        if i.name not in unpacked:
            assert np.array_equal(numpy_helper.to_array(i), ref[i.name])
    assert [n.SerializeToString() for n in m_packed.graph.node] == [n.SerializeToString() for n in m_plain.graph.node]
    logits = []
    for b in (plain, packed):
        r = _run(["--bundle", b, "--threads", "1", "--skip-latency", "--save-logits", tmp_path / f"{b.name}.npz"])
        assert r.returncode == 0 and "PASS" in r.stdout and "fully integer" in r.stdout, r.stdout + r.stderr
        logits.append(np.load(tmp_path / f"{b.name}.npz"))
    assert all(np.array_equal(logits[0][k], logits[1][k]) for k in logits[0].files)


def _run(args):
    return subprocess.run([sys.executable, str(RUN_EDGE)] + [str(a) for a in args], capture_output=True, text=True, timeout=300)


def test_run_edge_passes_on_good_bundle(bundle, tmp_path):
    r = _run(["--bundle", bundle, "--threads", "1", "--iters", "5", "--warmup", "1", "--batch", "8", "--json", tmp_path / "r.json"])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["graph"]["fully_integer"] and res["pass"]
    assert res["latency"][0]["batch"] == 1 and res["latency"][1]["batch"] == 8
    assert all(c["top1_agreement_pct"] >= 99 for c in res["comparison"])
    assert "p50" in r.stdout and "PASS" in r.stdout
    from qnn.kernels.reference import CPU_FAMILIES, host_cpu_family

    assert res["expected_for_cpu_family"] == host_cpu_family()
    exp = json.loads((bundle / "expected.json").read_text())
    assert sorted(exp["by_cpu_family"]) == sorted(CPU_FAMILIES) and exp["cpu_family"] == host_cpu_family()



def test_the_bundle_carries_the_runner_and_runs_from_its_folder_alone(bundle, tmp_path):
    """The device needs the bundle folder only: its run_edge.py is the runner's (hashed in the manifest) and runs
    from a copy of the folder anywhere; bench/run_edge.py launches the same runner from a checkout."""
    import shutil

    from qnn.export.bundle import RUNNER

    assert (bundle / RUNNER).read_bytes() == RUN_EDGE.read_bytes()
    assert RUNNER in json.loads((bundle / "manifest.json").read_text())["files"]
    alone = shutil.copytree(bundle, tmp_path / "on_device" / "b")
    r = subprocess.run([sys.executable, RUNNER, "--bundle", ".", "--threads", "1", "--skip-latency"],
                       capture_output=True, text=True, timeout=300, cwd=alone)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run_edge.py"), "--bundle", str(alone), "--threads", "1",
                        "--skip-latency"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    (alone / RUNNER).write_text((alone / RUNNER).read_text() + "\n# edited\n")  # a changed runner is refused
    r = subprocess.run([sys.executable, RUNNER, "--bundle", ".", "--skip-latency"], capture_output=True, text=True,
                       timeout=300, cwd=alone)
    assert r.returncode == 2 and "sha256 of run_edge.py" in r.stderr, r.stdout + r.stderr


def test_each_device_checks_against_its_cpu_familys_figures(monkeypatch):
    from qnn.export import run_edge as E

    exp = {"bits": 4, "clean_acc_pct": 50.0, "cpu_family": "x86_64", "patches": {"p": {"asr_pct": 10.0, "targeted": False}},
           "by_cpu_family": {"x86_64": {"clean_acc_pct": 50.0, "asr_pct": {"p": 10.0}},
                             "aarch64": {"clean_acc_pct": 49.0, "asr_pct": {"p": 12.0}}}}
    E._check_expected(exp, "expected.json")
    monkeypatch.setattr(E.platform, "machine", lambda: "aarch64")
    assert E.expectations(exp) == ("aarch64", "aarch64.", 49.0, {"p": 12.0})
    monkeypatch.setattr(E.platform, "machine", lambda: "x86_64")
    assert E.expectations(exp) == ("x86_64", "x86_64.", 50.0, {"p": 10.0})
    older = {k: v for k, v in exp.items() if k != "by_cpu_family"}  # a bundle from before the per-family figures
    monkeypatch.setattr(E.platform, "machine", lambda: "aarch64")
    assert E.expectations(older) == ("x86_64", "", 50.0, {"p": 10.0})
    bad = {**exp, "by_cpu_family": {"aarch64": {"clean_acc_pct": 49.0, "asr_pct": {}}}}
    with pytest.raises(E.EdgeError, match="asr_pct of p on aarch64"):
        E._check_expected(bad, "expected.json")


def _bad(args, msg):
    r = _run(args)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert err.startswith("run_edge: error:") and "\n" not in err and msg in err, err


def test_run_edge_bad_inputs(bundle, tmp_path):
    import shutil

    import numpy as np

    _bad(["--bundle", tmp_path / "nope"], "not found")
    _bad(["--bundle", bundle, "--threads", "zero"], "--threads")
    _bad(["--bundle", bundle, "--threads", "0"], "--threads")
    t = tmp_path / "tampered"
    shutil.copytree(bundle, t)
    with open(t / "model.onnx", "r+b") as f:
        f.seek(50)
        f.write(b"\xff\xfe")
    _bad(["--bundle", t], "does not match")
    # data whose shape disagrees with the model input (manifest re-signed, so only the shape check can catch it)
    s = tmp_path / "shape"
    shutil.copytree(bundle, s)
    np.savez_compressed(s / "eval.npz", x=np.zeros((4, 16, 16, 3), np.uint8), y=np.zeros(4, np.int64))
    import hashlib

    man = json.loads((s / "manifest.json").read_text())
    man["files"]["eval.npz"] = hashlib.sha256((s / "eval.npz").read_bytes()).hexdigest()
    (s / "manifest.json").write_text(json.dumps(man))
    _bad(["--bundle", s], "disagrees")


def test_edge_runner_and_verify_agree_on_what_is_integer():
    """The edge runner stands alone on the device (no qnn import), so it keeps its own copy of the op sets."""
    from qnn.export import run_edge
    from qnn.export.verify import INTEGER_OPS, MOVEMENT_OPS

    assert run_edge.INTEGER_KERNELS == INTEGER_OPS
    assert run_edge.MOVEMENT - {"QuantizeLinear", "DequantizeLinear", "MemcpyFromHost", "MemcpyToHost"} == MOVEMENT_OPS


def test_packed_bundle_benchmark_smoke(trained_ckpt, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import packed_bundle

    assert packed_bundle.main(["--checkpoint", str(trained_ckpt), "--bits", "2", "--n", "32",
                               "--out", str(tmp_path / "pb")]) == 0
    res = json.loads((tmp_path / "pb.json").read_text())
    assert res["logits_identical"] and res["model_bytes_ratio"] > 1.5


def test_run_edge_refuses_int8_weights_that_can_saturate_on_this_cpu():
    """The exporter records the largest int8 |w|; run_edge refuses a model above 64 on x86 without VNNI (ORT's
    u8 x s8 kernels saturate there) and runs it elsewhere. A default model (reduce_range) is safe everywhere."""
    from qnn.export import run_edge as E

    avx2 = {"machine": "x86_64", "isa_flags": ["avx2"]}
    vnni = {"machine": "x86_64", "isa_flags": ["avx2", "avx512f", "avx512_vnni"]}
    arm = {"machine": "aarch64", "isa_flags": ["asimd"]}
    assert "no AVX-VNNI" in E.int8_saturation_risk({"int8_weight_max": "127"}, avx2)
    for plat in (vnni, arm):
        assert E.int8_saturation_risk({"int8_weight_max": "127"}, plat) is None
    assert E.int8_saturation_risk({"int8_weight_max": "64"}, avx2) is None
    assert E.int8_saturation_risk({}, avx2) is None  # a model from before the field: the parity check stands
    with pytest.raises(E.EdgeError, match="not an integer"):
        E.int8_saturation_risk({"int8_weight_max": "x"}, avx2)


@pytest.mark.parametrize("reduce_range,weight_type,top", [(True, "auto", 63), (False, "int8", 127), (False, "auto", 0)])
def test_export_records_the_largest_int8_weight(reduce_range, weight_type, top, tmp_path):
    import onnx

    from qnn.export.onnx_export import export_model
    from qnn.layers import ensure_calibrated_, set_bit_width_
    from qnn.models import create_model

    torch.manual_seed(0)
    m = create_model("small_cnn", reduce_range=reduce_range)
    set_bit_width_(m, 8)
    ensure_calibrated_(m, torch.rand(4, 3, 32, 32))  # MSE-optimal weight scales: some weights at the grid's edge
    p = export_model(m.eval(), 8, "int", tmp_path / "m.onnx", weight_type=weight_type)
    meta = {e.key: e.value for e in onnx.load(str(p)).metadata_props}
    assert int(meta["int8_weight_max"]) <= top and meta["reduce_range"] == str(reduce_range).lower()
    if top:
        assert int(meta["int8_weight_max"]) > top // 2


def _resign(d, *names):
    import hashlib

    man = json.loads((d / "manifest.json").read_text())
    for n in names:
        man["files"][n] = hashlib.sha256((d / n).read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(man))
    return man


def test_run_edge_reports_bit_identical_logits_and_fails_on_one_differing_value(bundle, tmp_path):
    """The bundle carries the fake-quant model's logits per CPU family; the device's integer logits must equal its
    family's bit for bit (#36: report that the logits match, not only accuracy and agreement)."""
    import shutil

    r = _run(["--bundle", bundle, "--threads", "1", "--skip-latency", "--json", tmp_path / "r.json"])
    res = json.loads((tmp_path / "r.json").read_text())
    assert r.returncode == 0 and res["logits_identical"] == {"clean": 64, "patch_p6": 64}, r.stdout
    assert "clean 64/64 bit-identical" in r.stdout
    t = tmp_path / "one_off"
    shutil.copytree(bundle, t)
    ref = dict(np.load(t / "expected_logits.npz"))
    from qnn.kernels.reference import host_cpu_family

    k = f"{host_cpu_family()}.clean"
    ref[k][3, 0] = np.nextafter(ref[k][3, 0], np.float32(np.inf))  # one logit, one float step away
    np.savez_compressed(t / "expected_logits.npz", **ref)
    _resign(t, "expected_logits.npz")
    r = _run(["--bundle", t, "--threads", "1", "--skip-latency"])
    assert r.returncode == 1 and "clean 63/64 bit-identical" in r.stdout and "FAIL" in r.stdout, r.stdout


def test_run_edge_reads_the_bit_width_from_the_weights(trained_ckpt, tmp_path):
    """A 2-bit packed bundle whose expected.json says 8 is refused (its figures are not this model's); an int64
    overflow in a packed shape is one line, not a traceback."""
    import shutil

    b = _build(trained_ckpt, tmp_path / "b2", bits=2, pack_weights=True)
    r = _run(["--bundle", b, "--threads", "1", "--skip-latency"])
    assert r.returncode == 0 and "2-bit weights/activations (int8 kernels, weights packed)" in r.stdout, r.stdout
    lie = tmp_path / "lie"
    shutil.copytree(b, lie)
    exp = json.loads((lie / "expected.json").read_text())
    (lie / "expected.json").write_text(json.dumps({**exp, "bits": 8}))
    _resign(lie, "expected.json")
    _bad(["--bundle", lie], "the model's weights are 2-bit")
    big = tmp_path / "big"
    shutil.copytree(b, big)
    man = json.loads((big / "manifest.json").read_text())
    next(iter(man["packed_weights"]["tensors"].values()))["shape"] = [2 ** 32, 2 ** 32, 2 ** 2]  # 2**66 wraps int64
    (big / "manifest.json").write_text(json.dumps(man))
    _bad(["--bundle", big], "more than any model's")

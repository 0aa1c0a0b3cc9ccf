"""QLinearAdd is the one integer op ONNX Runtime computes differently per CPU family; `qlinear_add` must reproduce
each bit for bit: the host's against ORT itself, aarch64's against a digest of ORT 1.32's output on an emulated
Cortex-A72 (bench/arm_check.sh's environment), recorded once because CI's x86 runners cannot run it."""

import hashlib

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from qnn.kernels import reference as K

# sha256 over the outputs of all cases below, concatenated: ORT 1.32.0 CPU EP on x86-64 (AVX2/AVX-512 host) and on
# aarch64 (qemu cortex-a72, bench/arm_check.sh's rootfs)
ORT_DIGEST = {"x86_64": "0510bd173dc864f41b8dceea7303596d53a0119d5ae5c2b03160b55a0cd77bdd",
              "aarch64": "aecef676e446c75373ee3c696283287a5dbc3963a0914c3fbf170b76ec4f9071"}


def _cases(n_cases: int = 32, n: int = 1 << 16, seed: int = 20261130):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        sa, sb, sy = (float(np.float32(np.exp(rng.uniform(-3, 0)))) for _ in range(3))
        za, zb, zy = (int(v) for v in rng.integers(0, 256, 3))
        a, b = rng.integers(0, 256, (2, n)).astype(np.uint8)
        yield a, sa, za, b, sb, zb, sy, zy


def _ort_qlinear_add(a, sa, za, b, sb, zb, sy, zy) -> np.ndarray:
    inits = [h.make_tensor(k, T.FLOAT, [], [v]) for k, v in (("sa", sa), ("sb", sb), ("sy", sy))]
    inits += [h.make_tensor(k, T.UINT8, [], [v]) for k, v in (("za", za), ("zb", zb), ("zy", zy))]
    node = h.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"], domain="com.microsoft")
    io = [h.make_tensor_value_info(k, T.UINT8, [len(a)]) for k in ("a", "b", "y")]
    g = h.make_graph([node], "qladd", io[:2], io[2:], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": a, "b": b})[0]


def _digest(outputs) -> str:
    d = hashlib.sha256()
    for y in outputs:
        d.update(y.tobytes())
    return d.hexdigest()


def test_host_arithmetic_matches_onnxruntime_bit_for_bit():
    host = K.host_cpu_family()
    for c in _cases(n_cases=8):
        assert np.array_equal(K.qlinear_add(*c, cpu=host), _ort_qlinear_add(*c))


@pytest.mark.parametrize("cpu", K.CPU_FAMILIES)
def test_each_cpu_family_matches_its_recorded_onnxruntime_output(cpu):
    assert _digest(K.qlinear_add(*c, cpu=cpu) for c in _cases()) == ORT_DIGEST[cpu]


def test_the_families_really_differ_and_only_by_one_step():
    """Not a formality: on these cases the two arithmetics disagree, by one step, on a few elements."""
    diffs = [K.qlinear_add(*c, cpu="x86_64").astype(int) - K.qlinear_add(*c, cpu="aarch64") for c in _cases()]
    n_diff = sum(int((d != 0).sum()) for d in diffs)
    assert 0 < n_diff < 100 and max(int(np.abs(d).max()) for d in diffs) == 1


def test_fixed_point_parameters_follow_mlas():
    assert K.qladd_fixed_point(np.float32(1.0), np.float32(0.5)) == (21, 1 << 21, 1 << 20)
    assert K.qladd_fixed_point(np.float32(300.0), np.float32(1.0)) is None      # ratio >= 256: scalar fallback
    assert K.qladd_fixed_point(np.float32(2.0**-12), np.float32(2.0**-12)) is None  # shift 33 > 31


def test_cpu_family_default_and_bad_family():
    other = "aarch64" if K.host_cpu_family() == "x86_64" else "x86_64"
    assert K.cpu_family(None) == K.host_cpu_family() and K.cpu_family(other) == other
    for bad in ("mips", ""):
        with pytest.raises(ValueError, match="unknown CPU family"):
            K.cpu_family(bad)
    with pytest.raises(ValueError, match="unknown CPU family"):
        K.qlinear_add(np.zeros(2, np.uint8), 1.0, 0, np.zeros(2, np.uint8), 1.0, 0, 1.0, 0, cpu="mips")

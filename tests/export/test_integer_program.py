"""The integer program (qnn.integer) of models quantized by qnn.quantize: PyTorch eval == ONNX Runtime == the numpy
interpreter, bit for bit, at 8, 4 and 2 bits; the QONNX export runs in qonnx and matches; what has no integer form
is refused in one line."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.export.onnx_export import build_graph, export_model
from qnn.export.verify import verify
from qnn.kernels.interpreter import IntegerInterpreter
from qnn.errors import QNNError
from qnn.integer import IntegerProgram, program_of
from qnn.layers import set_bit_width_
from qnn.models import create_model
from qnn.models.quantized import QuantizedNet
from tests.qnn.test_quantization import Net
from tests.qnn.user_models import tiny_cnn


def _trained_like(m: nn.Module, bits: int, size: int) -> nn.Module:
    """Scales calibrated and BatchNorm statistics moved at `bits` (two train-mode passes), then eval."""
    torch.manual_seed(bits)
    set_bit_width_(m, bits)
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.rand(8, 3, size, size))
    return m.eval()


def _check_exact(m: nn.Module, bits: int, tmp_path, n: int = 6) -> dict:
    size = m.in_size
    x = torch.rand(n, 3, size, size)
    with torch.no_grad():
        ref = m(x).numpy()
    p = export_model(m, bits, "int", tmp_path / f"m{bits}.onnx")
    xn = ((x - m._mean) / m._std).numpy()
    got = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": xn})[0]
    assert np.array_equal(ref, got), np.abs(ref - got).max()
    assert np.array_equal(ref, IntegerInterpreter(p).run(xn))
    c = verify(p)
    assert c["fully_integer"], c
    return c


def test_the_integer_program_is_built_once_and_rebuilt_when_what_it_folds_changes():
    m = _trained_like(_trained_like(QuantizedNet(tiny_cnn(), 10, 16), 8, 16), 4, 16)
    x = torch.rand(4, 3, 16, 16)

    def check_fresh() -> torch.Tensor:  # the model's (cached) program computes what a fresh lowering computes
        with torch.no_grad():
            y = m(x)
            assert torch.equal(y, IntegerProgram(m.body).run((x - m._mean) / m._std))
        return y

    y4 = check_fresh()
    p = program_of(m.body)
    check_fresh()
    assert program_of(m.body) is p  # nothing changed: reused
    state = {k: v.clone() for k, v in m.state_dict().items()}
    fc = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    changes = {
        "bit switch": lambda: set_bit_width_(m, 8),
        "switch back": lambda: set_bit_width_(m, 4),
        "optimizer step": lambda: _sgd_step(m, x),
        "weight storage swapped": lambda: setattr(fc.weight, "data", fc.weight.data * 2),
        "load_state_dict": lambda: m.load_state_dict(state),
    }
    for what, change in changes.items():
        before = program_of(m.body)
        change()
        assert program_of(m.body) is not before, what
        check_fresh()
    assert torch.equal(check_fresh(), y4)  # the loaded state is the first one


class Functional(nn.Module):
    """Every elementwise function and the new ops written as function calls and methods, with a pass-through branch
    (a max pool of an earlier activation) joining a concatenation and a gate product whose operands share a grid."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c, self.d, self.e = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.hardswish(self.a(x))
        y = torch.cat([F.silu(self.b(h)), F.max_pool2d(h, 3, 1, 1)], 1)
        y = F.avg_pool2d(y, 3, 2, 1, count_include_pad=False)
        g = torch.sigmoid(F.adaptive_avg_pool2d(y, 1))
        y = F.gelu(self.e(y * g), approximate="tanh")
        y = y + torch.cat([torch.tanh(self.c(y[:, :8])), F.leaky_relu(self.d(y[:, 8:]), 0.1)], 1).sigmoid()
        return self.fc(F.hardsigmoid(F.avg_pool2d(F.elu(y), 2, ceil_mode=True)).mean((2, 3)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle, as torchvision writes it."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class Movement(nn.Module):
    """A ShuffleNet-V2 unit (chunk, a branch, concat, channel shuffle), a split by sizes, a permutation, nearest
    upsampling as a module and as a function."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                    nn.Conv2d(8, 8, 1), nn.ReLU())
        self.up, self.mix, self.fc = nn.Upsample(scale_factor=2), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        h = self.stem(x)
        a, b = h.chunk(2, dim=1)
        h = channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)
        p, q = torch.split(h, [6, 10], 1)
        h = torch.cat([q, p], 1).permute(0, 1, 3, 2)
        h = F.relu(self.mix(self.up(h)))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.fc(h.mean((2, 3), keepdim=True).reshape(h.shape[0], -1))


class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.up, self.fc = nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 2, stride=2), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.abs(self.up(self.c(x))).sum((2, 3)))


def _sgd_step(m: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    m(x).square().mean().backward()
    opt.step()
    m.eval()


class Shortcuts(nn.Module):
    """Option-A shortcuts in several forms: a subsample feeding only its channel pad (fused into one embedding conv);
    a subsample that also feeds a conv whose BatchNorm comes after the pad, reached through an alias (kept apart);
    a channel pad alone, uneven; a channel crop (negative pad: a plain Pad)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.side = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.wide = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

    def forward(self, x):
        h = self.stem(x)
        y = self.down(h) + F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))   # fused
        s = h[:, :, ::2, ::2]
        c = self.side[0](s)
        p = F.pad(s.contiguous(), (0, 0, 0, 0, 0, 8))                    # s feeds the conv too: not fused
        y = y + self.side[2](self.side[1](c)) + p
        y = y + F.pad(y, (0, 0, 0, 0, -2, 2))                             # a crop: a plain Pad
        return self.head(self.wide(y) + F.pad(y, (0, 0, 0, 0, 2, 6)))     # a channel pad alone


def _models():
    return {
        "option-A shortcuts, add": lambda: QuantizedNet(Shortcuts(), 10, 16),
        "user tiny_cnn": lambda: QuantizedNet(tiny_cnn(), 10, 16),
        "dilated depthwise, conv bias, ReLU6, add": lambda: QuantizedNet(Net(), 10, 16),
        "dilated depthwise, conv bias, ReLU6, add, residual stream at 8 bits": lambda: QuantizedNet(
            Net(), 10, 16, residual_bits=8),
        "mobilenetv2_cifar": lambda: create_model("mobilenetv2_cifar", width_mult=0.25),
        "mobilenetv2_cifar, residual stream at 8 bits": lambda: create_model("mobilenetv2_cifar", width_mult=0.25,
                                                                            residual_bits=8),
        # today's edge CNNs: Hardswish / SiLU tables, squeeze-excitation products, concatenation, average pooling
        "mobilenetv3_small_cifar": lambda: create_model("mobilenetv3_small_cifar", width_mult=0.25),
        "efficientnet_b0_cifar": lambda: create_model("efficientnet_b0_cifar", width_mult=0.25),
        "efficientnet_lite0_cifar": lambda: create_model("efficientnet_lite0_cifar", width_mult=0.25),
        "squeezenet_cifar": lambda: create_model("squeezenet_cifar", width_mult=0.25),
        "functional elementwise, concat, avg_pool2d": lambda: QuantizedNet(Functional(), 10, 16),
        "shuffle unit, split, permute, upsample": lambda: QuantizedNet(Movement(), 10, 16),
    }


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("name", list(_models()))
def test_pytorch_ort_numpy_identical(name, bits, tmp_path):
    m = _models()[name]()
    m = _trained_like(m, bits, m.in_size)
    c = _check_exact(m, bits, tmp_path)
    assert c["ops"].get("QLinearConv", 0) >= 2 and c["ops"].get("QGemm") == (2 if "mobilenetv3" in name else 1)
    if "mobilenetv3" in name:  # Hardswish and hard-sigmoid only: QLinearAdd + QLinearMul, no table lookup
        assert "Gather" not in c["ops"] and c["ops"].get("QLinearAdd", 0) >= 10, str(c["ops"])
    expect = {"mobilenetv3": ("QLinearAdd", "QLinearMul"), "b0": ("Gather", "QLinearMul"), "squeezenet": ("Concat", "QLinearAveragePool"),
              "functional": ("Gather", "Concat", "QLinearAveragePool", "QLinearMul"),
              "shuffle": ("Concat", "Split", "Reshape", "Transpose", "Resize")}  # ORT merges the parts' Slices
    for key, ops in expect.items():
        if key in name:
            assert all(c["ops"].get(op, 0) >= 1 for op in ops), str(c["ops"])
    if "Net" in name or "add" in name:
        assert c["ops"].get("QLinearAdd", 0) >= 1
    if "residual" in name:  # where a value feeds both a conv and the residual stream, its op runs once per grid
        narrow = name.replace("residual stream at 8 bits", "").rstrip(", ")
        plain = _check_exact(_trained_like(_models()[narrow](), bits, m.in_size), bits, tmp_path)
        fused = lambda ops: ops.get("QLinearConv", 0) + ops.get("QLinearAdd", 0)  # noqa: E731
        assert fused(c["ops"]) > fused(plain["ops"])


def test_option_a_shortcuts_export_as_embedding_convs(tmp_path):
    """In 'int' the shortcut's strided Slice + channel Pad is one QLinearConv (exact: see the test above); the other
    formats keep Slice and Pad."""
    import onnx

    from qnn.integer import ChannelEmbed, Move

    m = _trained_like(QuantizedNet(Shortcuts(), 10, 16), 4, 16)
    prog = IntegerProgram(m.body)
    embeds = [op for op in prog.ops if isinstance(op, ChannelEmbed)]
    assert [(e.stride, e.before, e.after) for e in embeds] == [((2, 2), 4, 4), ((1, 1), 0, 8), ((1, 1), 2, 6)]
    kinds = [op.kind for op in prog.ops if isinstance(op, Move)]
    assert kinds.count("slice") == 1 and kinds.count("pad") == 1  # the slice that also feeds a conv; the crop
    ops = lambda fmt: [n.op_type for n in build_graph(m, 4, fmt).graph.node]  # noqa: E731
    assert ops("int").count("Pad") == 1 and ops("int").count("Slice") == 1
    assert ops("qcdq").count("Pad") == 4 and ops("qcdq").count("Slice") == 2
    r20 = _trained_like(create_model("resnet20"), 8, 32)
    g = onnx.load(str(export_model(r20, 8, "int", tmp_path / "r20.onnx")))
    assert not {"Pad", "Slice"} & {n.op_type for n in g.graph.node}


def test_the_evaluation_follows_the_target_cpu_family(tmp_path):
    """`qnn.precision(model, cpu=...)` and the interpreter's `cpu=` switch QLinearAdd to that family's arithmetic."""
    from qnn.kernels.reference import CPU_FAMILIES
    from qnn.layers import precision

    m = _trained_like(QuantizedNet(Net(), 10, 16, residual_bits=8), 8, 16)
    x = torch.rand(16, 3, 16, 16)
    p = export_model(m, 8, "int", tmp_path / "m.onnx")
    xn = ((x - m._mean) / m._std).numpy()
    for cpu in CPU_FAMILIES:
        with precision(m, cpu=cpu), torch.no_grad():
            assert m.target_cpu == cpu
            assert np.array_equal(m(x).numpy(), IntegerInterpreter(p, cpu=cpu).run(xn)), cpu
        assert m.target_cpu is None


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("net", [Net, Movement, Functional])
def test_qonnx_file_runs_in_qonnx_as_written(tmp_path, bits, net):
    """The file `qnn export --format qonnx` writes runs in qonnx's own executor with no edit (batch 1, concrete).
    QONNX computes in float between its Quant nodes: where an intermediate value lies within float error of a
    rounding boundary it lands one step away, and through the layers after it that reads as tens to hundreds of
    logit LSBs (bench/qonnx_gap.py measures it); the decisions agree."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    m = _trained_like(QuantizedNet(net(), 10, 16), bits, 16)
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        ref = m(x).numpy()
    p = export_model(m, bits, "qonnx", tmp_path / "m.onnx")
    g = onnx.load(str(p))
    assert [d.dim_value for d in g.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 16, 16]
    wrapped = cleanup_model(ModelWrapper(str(p)))
    xn = ((x - m._mean) / m._std).numpy()
    inp, outp = wrapped.graph.input[0].name, wrapped.graph.output[0].name  # cleanup renames them
    out = np.concatenate([execute_onnx(wrapped, {inp: xn[i:i + 1]})[outp] for i in range(len(xn))])
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()  # close in value, not bit-identical


def test_what_has_no_integer_form_is_refused_at_quantize_all_at_once(tmp_path):
    """Before any training: every construct the integer program cannot take, each with the form that works."""
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
            self.b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.b(x).mean((2, 3)) + F.adaptive_avg_pool2d(self.a(x), 1).flatten(1))

    with pytest.raises(QNNError) as e:
        QuantizedNet(Bad(), 10, 16)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("2 constructs have no integer form")
    assert "put each BatchNorm right after its conv" in msg and "only global average pooling" in msg
    # a construct with no registration at all is refused by the conversion itself, with the form that works
    with pytest.raises(QNNError, match="type AdaptiveMaxPool2d \\(use MaxPool2d with a fixed kernel"):
        QuantizedNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                   nn.Linear(4, 10)), 10, 16)
    reflect = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                            nn.Flatten(), nn.Linear(16, 10))
    with pytest.raises(QNNError, match="padding_mode='zeros'"):
        QuantizedNet(reflect, 10, 16)
    with pytest.raises(QNNError, match="3 parts of the model cannot be quantized: .*ConvTranspose2d \\(ONNX Runtime "
                                       "runs ConvTranspose in float only: use nn.Upsample.*'abs'.*'.sum\\(\\)'"):
        QuantizedNet(_Unsupported(), 10, 16)
    for up, why in ((nn.Upsample(scale_factor=2, mode="bilinear"), "use mode='nearest'"),
                    (nn.Upsample(size=(20, 20)), "whole scale factors"), (nn.Upsample(scale_factor=1.5), "whole scale")):
        with pytest.raises(QNNError, match=why):
            QuantizedNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), up, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(4, 10)), 10, 16)
    class MovesTheBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Linear(4, 10)

        def forward(self, x):
            h = self.c(x)
            a, b = h.chunk(2, 0)
            h = torch.cat([a, b], 0) + h.permute(1, 0, 2, 3) + h.view(-1, h.size(0), h.size(2), h.size(3))
            return self.fc(h.mean((2, 3)))

    with pytest.raises(QNNError) as e:
        QuantizedNet(MovesTheBatch(), 10, 16)
    msg = str(e.value)
    assert msg.startswith("3 constructs have no integer form") and "a chunk along the batch dim" in msg
    assert "moves the batch dim" in msg and "keep the batch first" in msg
    with pytest.raises(QNNError, match="not trained at 8 bits"):
        export_model(_trained_like(QuantizedNet(tiny_cnn(), 10, 16), 4, 16), 8, "int", tmp_path / "m.onnx")


def test_hard_sigmoid_saturates_at_one_inside_a_wider_grid():
    """An output grid reaching past 1 (4 bits at scale 0.1: up to 1.5) still clamps hard-sigmoid at 1 (code 10), in
    the PyTorch table and in the graph's Clip alike; and below 0 on a shared shifted grid."""
    import torch.nn.functional as F

    from qnn.integer import Grid, QHardGate

    g_in = Grid(torch.tensor(0.6), 8, -8, 7, 4)             # inputs -4.8 .. 4.2
    for out, lo, hi in ((Grid(torch.tensor(0.1), 0, 0, 15, 4), 0, 10), (Grid(torch.tensor(0.1), 8, -8, 7, 4), 0, 7)):
        op = QHardGate(F.hardsigmoid, "hardsigmoid", {}, 0, g_in, out)
        y = op.run(torch.arange(-8, 8, dtype=torch.float32))
        assert int(y.min()) == lo and int(y.max()) == hi, y


def test_sizes_and_dims_that_would_break_later_are_refused_at_quantize():
    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Linear(4 * 14 * 14, 10)

        def forward(self, x):
            h = self.c(x)
            return self.fc(h.view(h.shape[:1] + (-1,)))

    class BatchSplit(Sliced):
        def forward(self, x):
            a, b = self.c(x).split(1, dim=-4)
            return self.fc(torch.cat([b, a], 0).flatten(1))

    for net, why in ((Sliced(), "sizes are read one at a time"), (BatchSplit(), "along the batch dim")):
        with pytest.raises(QNNError, match=why):
            QuantizedNet(net, 10, 16)


def test_a_permutation_given_with_negative_dims_exports(tmp_path):
    class Perm(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.c(x).permute(0, -1, 1, 2), 1).flatten(1))

    m = _trained_like(QuantizedNet(Perm(), 10, 16), 4, 16)
    assert _check_exact(m, 4, tmp_path)["ops"].get("Transpose") == 1


class _OneElementwise(nn.Module):
    """A registered elementwise function in each of its forms: its module, its function, its tensor method."""

    def __init__(self, e):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.act, self.fn, self.method = e.modules[0](), e.functions[0], e.methods[0] if e.methods else None
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.fn(self.b(self.act(self.a(x))))
        if self.method:
            y = getattr(self.c(y), self.method)()
        return self.fc(y.mean((2, 3)))


def _elementwise_names():
    from qnn.qmodules import ELEMENTWISE

    return list(ELEMENTWISE)


@pytest.mark.parametrize("name", _elementwise_names())
def test_every_registered_elementwise_function_is_exact_in_every_form(name, tmp_path):
    """Adding an elementwise function is its one `qnn.qmodules.elementwise(...)` entry: this test takes every entry
    (Mish was added that way) through qnn.quantize, PyTorch == ORT == the numpy interpreter at 8 and 4 bits, and its
    QONNX form through qonnx."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    from qnn.qmodules import ELEMENTWISE

    e = ELEMENTWISE[name]
    assert e.modules and e.functions, "an entry names its module and its function"
    for bits in (8, 4):
        m = _trained_like(QuantizedNet(_OneElementwise(e), 10, 16), bits, 16)
        forms = [mod.name for mod in m.modules() if type(mod).__name__ == "QuantElementwise"]
        assert forms == [name] * (3 if e.methods else 2)
        c = _check_exact(m, bits, tmp_path)
        assert sum(c["ops"].get(op, 0) for op in ("Gather", "QLinearAdd")) >= len(forms), c["ops"]  # table or hard gate
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        ref = m(x).numpy()
    wrapped = cleanup_model(ModelWrapper(str(export_model(m, 4, "qonnx", tmp_path / "q.onnx"))))
    xn = ((x - m._mean) / m._std).numpy()
    inp, outp = wrapped.graph.input[0].name, wrapped.graph.output[0].name
    out = np.concatenate([execute_onnx(wrapped, {inp: xn[i:i + 1]})[outp] for i in range(len(xn))])
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_the_conversion_and_the_lowering_read_one_registry():
    """Every construct `qnn.quantize` keeps in the graph is one the lowering dispatches on, and every one it swaps
    has the swapped modules' lowering; a tensor method with no registration (squeeze, unsqueeze: they passed the
    conversion's old tables and failed at export) is refused by qnn.quantize, naming what is supported."""
    from qnn import integer as I

    for t, c in I._FLOAT_MODULES.items():
        assert c.lowered, c.name
        if c.role not in I.SWAPPED:
            assert I._LOWERED_MODULES[t] is c, c.name
    assert I.CONSTRUCTS["elementwise"].lowered and I.CONSTRUCTS["relu"].lowered
    listed = I.describe_constructs()  # `qnn list ops`: every construct and every elementwise entry, by its torch names
    assert any(line.startswith("mish") and "nn.Mish, F.mish" in line for line in listed)
    assert any(line.startswith("max pool") and "nn.MaxPool2d, F.max_pool2d" in line for line in listed)

    class Squeezes(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(F.relu(self.c(x)).mean((2, 3), keepdim=True).squeeze(-1).squeeze(-1))

    with pytest.raises(QNNError, match=r"unsupported tensor method '\.squeeze\(\)'.*supported: .*\.view\(\)") as e:
        QuantizedNet(Squeezes(), 10, 16)
    assert "\n" not in str(e.value)


def test_rounding_passes_the_gradient_exactly_where_the_rounded_value_is_on_the_grid():
    """Grid.round's straight-through gradient: 1 where rint(v) lies in [lo, hi] (ties to even included), 0 where it
    saturated or is not a number; its values are those of the gradient-free path."""
    from qnn.integer import Grid

    g = Grid(torch.tensor(0.5), 0, -8, 7, 4)
    v = torch.tensor([-9.0, -8.5, -8.49, 0.3, 6.5, 7.49, 7.5, 8.0, float("inf"), float("-inf"), float("nan")],
                     requires_grad=True)
    out = g.round(v)
    out.sum().backward()
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert torch.equal(out.detach()[:-1], g.round(v.detach())[:-1]) and torch.isnan(out[-1])

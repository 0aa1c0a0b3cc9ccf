"""qnn: switchable-precision quantized networks, patch attacks, QADT-R defense and true-integer export."""

__version__ = "0.1.0"

from qnn.errors import QNNError  # noqa: E402

__all__ = ["QNNError", "QuantizeConfig", "precision", "quantize", "__version__"]


def __getattr__(name: str):
    # qnn.quantize / qnn.QuantizeConfig without importing Brevitas for every `import qnn`
    if name in ("quantize", "QuantizeConfig"):
        from qnn import quantization

        return getattr(quantization, name)
    if name == "precision":
        from qnn.layers import precision

        return precision
    raise AttributeError(f"module 'qnn' has no attribute {name!r}")

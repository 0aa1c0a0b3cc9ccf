"""qnn: switchable-precision quantized networks, patch attacks, QADT-R defense and true-integer export."""

__version__ = "0.1.0"

from qnn.errors import QNNError  # noqa: E402

__all__ = ["QNNError", "__version__"]

"""Python side of the C++ CPU ops (placeholder until the library is built; see kernels/csrc)."""

_ERR = "not built yet"


def available() -> bool:
    return False


def load_error() -> str:
    return _ERR

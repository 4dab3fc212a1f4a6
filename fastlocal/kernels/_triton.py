"""The one guarded triton import of the kernel files: `triton` and `tl` are None where triton is not
installed, so the references (``*_ref``) and the ``reference`` backend still work. Imported only by the
kernel modules, which `fastlocal.kernels` imports only for the ``triton`` backend."""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

__all__ = ["tl", "triton"]

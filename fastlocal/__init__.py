"""fastlocal: supervised local learning (BP, DGL, InfoPro, MLAAN) for PyTorch."""

__version__ = "0.1.0"

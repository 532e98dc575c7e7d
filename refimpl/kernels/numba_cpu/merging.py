"""``refimpl.merging`` names for the numba kernels (the registry looks ops up by module name)."""

from refimpl.kernels.numba_cpu.ties import ties

__all__ = ["ties"]

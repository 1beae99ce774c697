"""What lets unmodified Megatron-Core run on CPU over gloo; a no-op on GPU (see `cpu`)."""

from dft_megatron.compat.cpu import cpu_bridge_active, device, install_cpu_bridge

__all__ = ["cpu_bridge_active", "device", "install_cpu_bridge"]

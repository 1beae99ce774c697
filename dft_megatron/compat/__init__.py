"""What lets unmodified Megatron-Core run on CPU over gloo (a no-op on GPU, see `cpu`), and
fixes for its distributed optimizer on torch's AdamW (no TE/apex, any device, see
`distrib_optimizer`)."""

from dft_megatron.compat.cpu import cpu_bridge_active, device, install_cpu_bridge
from dft_megatron.compat.distrib_optimizer import install_distributed_optimizer_fixes

__all__ = [
    "cpu_bridge_active",
    "device",
    "install_cpu_bridge",
    "install_distributed_optimizer_fixes",
]

"""Platform glue: device selection and the CPU compatibility layer (``platform.cpu``)."""

from __future__ import annotations


def initialize_distributed(*args, **kwargs):
    """See :func:`megatron_syne.training.distributed.initialize_distributed`."""
    from megatron_syne.training.distributed import initialize_distributed as _initialize

    return _initialize(*args, **kwargs)


__all__ = ["initialize_distributed"]

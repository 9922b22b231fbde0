"""Defaults that come from a Slurm job array's environment."""

from __future__ import annotations

import os


def slurm_shard_defaults(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(num_shards, shard_index) of a Slurm array task, or (1, 0) outside one.

    Uses SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_ID (offset by SLURM_ARRAY_TASK_MIN, so
    ``--array=1-16`` and ``--array=0-15`` both give indices 0..15). A value that is not an
    integer is a ValueError naming the variable and the fix.
    """
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return 1, 0
    values = {}
    for name, default in (
        ("SLURM_ARRAY_TASK_COUNT", None),
        ("SLURM_ARRAY_TASK_ID", None),
        ("SLURM_ARRAY_TASK_MIN", "0"),
    ):
        try:
            values[name] = int(env.get(name, default))
        except ValueError:
            raise ValueError(
                f"environment variable {name}={env[name]!r} is not an integer; unset it or "
                "pass --num-shards and --shard-index"
            ) from None
    return values["SLURM_ARRAY_TASK_COUNT"], values["SLURM_ARRAY_TASK_ID"] - values[
        "SLURM_ARRAY_TASK_MIN"
    ]

"""Training hooks: the seam through which features (e.g. the online data mixer) join the loop.

A hook is called on every rank, at the same points, with the same :class:`TrainingState`.
Collectives inside a hook are therefore allowed (and ``state.evaluate`` is one: every rank must
call it together). A hook's ``state_dict()`` is stored in every checkpoint as common
(non-sharded) state under ``hooks/<hook.name>`` and handed back to ``load_state_dict`` on
resume, before ``on_train_start``; anything that decides which sample is trained when must live
there so a resumed run trains on exactly the samples an uninterrupted one would.

Order of calls in one run::

    load_state_dict(saved)        # only when resuming from a checkpoint that has this hook
    on_train_start(state)
    for each step: ... optimizer step ...; on_step_end(state)   # state.iteration = step done
    (checkpoint saves call state_dict() on every rank; rank 0's copy is written)
    on_train_end(state)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingState:
    """What the loop exposes to hooks. Counters are totals since the start of training
    (across resumes), not since this process started.

    Attributes:
        iteration: optimizer steps completed (skipped steps included).
        consumed_samples: sequences consumed by all data-parallel ranks together.
        consumed_tokens: ``consumed_samples * seq_length``.
        model_chunks: this rank's model chunks (DDP-wrapped), for forward-only use.
        args: the :class:`~megatron_syne.training.arguments.TrainArgs` of the run.
        evaluate: ``evaluate(dataset, num_samples) -> float``: mean per-token loss of the model
            on samples ``0..num_samples-1`` of ``dataset`` (forward only, DP/TP/PP aware; every
            rank must call it with the same arguments and gets the same value).
        train_dataset: the dataset the loop samples from (``dataset[i]`` for global sample i).
        last_loss: mean training loss of the last step (nan when the step was skipped).
        learning_rate: learning rate used by the last step.
        skipped_steps: total steps skipped for non-finite loss or gradient.
        metrics: extra scalars a hook wants logged (name -> float), cleared after each log.
    """

    iteration: int
    consumed_samples: int
    consumed_tokens: int
    model_chunks: list
    args: Any
    evaluate: Callable[[Any, int], float]
    train_dataset: Any = None
    last_loss: float = float("nan")
    learning_rate: float = 0.0
    skipped_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingHook:
    """Base class; override what you need. ``name`` keys the hook's state in checkpoints."""

    name: str = "hook"

    def on_train_start(self, state: TrainingState) -> None:
        """Called once after model, optimizer, data and checkpoint are ready."""

    def on_step_end(self, state: TrainingState) -> None:
        """Called after every optimizer step (also skipped ones), before logging and saving."""

    def on_train_end(self, state: TrainingState) -> None:
        """Called once after the last step (not when the run dies)."""

    def state_dict(self) -> dict:
        """Picklable state saved in each checkpoint (same on every rank)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def check_unique_names(hooks: list[TrainingHook]) -> None:
    """Hook names key checkpoint state; two hooks with one name would overwrite each other."""
    seen: set[str] = set()
    for hook in hooks:
        if hook.name in seen:
            raise ValueError(
                f"two training hooks are named {hook.name!r}; give each a unique .name"
            )
        seen.add(hook.name)

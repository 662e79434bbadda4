"""orbax checkpoints of the training state, with fallback past a corrupt latest checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Saves and restores (pure-dict state, metadata) under `<workdir>/checkpoints/<step>`."""

    def __init__(self, directory: str | Path, *, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, step: int, state, meta: dict) -> None:
        """Saves synchronously: the checkpoint is complete on disk when this returns."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """Restores the newest readable checkpoint into the structure of `abstract_state`.

        A checkpoint that fails to restore (truncated or corrupt files) gives a warning and the
        previous one is tried; returns None when no checkpoint can be read.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                return step, restored["state"], dict(restored["meta"])
            except Exception as error:  # noqa: BLE001 - any failure means "unreadable"
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                warnings.warn(
                    f"checkpoint {self.directory / str(step)} is unreadable "
                    f"({type(error).__name__}: {first_line[:200]}); "
                    "falling back to the previous one",
                    stacklevel=2,
                )
        return None

    def close(self) -> None:
        self.manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs (with shardings) describing `state`, for restoring into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )

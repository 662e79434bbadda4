"""orbax checkpoints of the training state; unusable checkpoints are skipped and set aside."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


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

    def restore_latest(
        self,
        abstract_state,
        *,
        check: Callable[[object], str | None] | None = None,
        set_aside: bool = False,
        partial: bool = False,
    ) -> tuple[int, object, dict] | None:
        """Restores the newest usable checkpoint into the structure of `abstract_state`.

        A checkpoint that fails to restore (truncated or corrupt files), or whose state `check`
        rejects (it returns the reason, e.g. non-finite parameters), gives one warning and the
        previous one is tried; returns None when none is usable. With `set_aside` (training,
        which must be able to save that step again) an unusable checkpoint is renamed to
        `<step>.unusable` (never deleted); read-only callers leave the directory as it is.
        With `partial`, `abstract_state` may name a part of the saved tree (e.g. the model
        without the optimizer) and only that part is read.
        """
        steps = self.steps()
        for i, step in reversed(list(enumerate(steps))):
            try:
                restored = self._restore(step, abstract_state, partial)
                reason = check(restored["state"]) if check is not None else None
            except Exception as error:  # noqa: BLE001 - any failure means "unreadable"
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                reason = f"unreadable ({type(error).__name__}: {first_line[:200]})"
            if reason is None:
                self._sync_set_aside(set_aside)
                return step, restored["state"], dict(restored["meta"])
            path = self.directory / str(step)
            moved = f"moved to {self._set_aside(path).name}, " if set_aside else ""
            previous = f"step {steps[i - 1]}" if i else "no earlier checkpoint, starting afresh"
            warnings.warn(
                f"checkpoint {path} is {reason}; {moved}falling back to {previous}",
                stacklevel=2,
            )
        self._sync_set_aside(set_aside)
        return None

    def _restore(self, step: int, abstract_state, partial: bool) -> dict:
        if not partial:
            return self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        with ocp.PyTreeCheckpointer() as checkpointer:
            state = checkpointer.restore(
                self.directory / str(step) / "state",
                args=ocp.args.PyTreeRestore(
                    item=abstract_state,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                    partial_restore=True,
                ),
            )
        return {"state": state, "meta": meta["meta"]}

    def _set_aside(self, path: Path) -> Path:
        """Renames `path` to the first free `<step>.unusable[.<n>]` (process 0 only: the
        checkpoint directory is shared by every process)."""
        target, n = path.with_name(f"{path.name}.unusable"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.unusable.{n}")
        if jax.process_index() == 0:
            path.rename(target)
        return target

    def _sync_set_aside(self, set_aside: bool) -> None:
        """Every process sees the renames before any of them saves a step again."""
        if set_aside and jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints set aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs (with shardings) describing `state`, for restoring into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )

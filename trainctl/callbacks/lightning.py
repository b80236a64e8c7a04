"""PyTorch Lightning integration: `Trainer(callbacks=[TrainctlCallback()])` gives a Lightning
script what `trainctl.init()` gives a plain one.

The callback joins (or creates) the session, records the Trainer's settings, reports what the
LightningModule logs, writes the trainctl entry into every Lightning checkpoint and registers each
file (manifest + digest + checkpoint event), resumes from the checkpoint the launcher asks for,
and turns SIGTERM/SIGUSR1 into an emergency checkpoint and exit code 75 (EXIT_PREEMPTED) so that
`trainctl local --max-restarts` continues the run.

Registration wraps the strategy's CheckpointIO rather than watching ModelCheckpoint's paths:
every file Lightning writes (ModelCheckpoint, `trainer.save_checkpoint`, the emergency
checkpoint) passes through it on rank 0, so the file is written to a temporary name, made
durable, renamed into place and registered at once, and a file ModelCheckpoint deletes loses
its manifest first. This is the only module that imports lightning.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .. import checkpoint as checkpoint_mod
from .. import config as config_mod
from .. import resume as resume_mod
from ..errors import (
    EXIT_PREEMPTED,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    TrainctlWarning,
)
from ..fsutil import fsync_dir, temp_name
from ..redact import redact_mapping
from ..run import Run, current_run, init, plain_data, requested_resume
from ..session import State
from ..values import scalar

__all__ = ["TrainctlCallback", "TrainctlLogger"]


# --- helpers ---------------------------------------------------------------------------------

def _numbers(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    out = {}
    for key, value in metrics.items():
        number = scalar(value)
        if number is not None:
            out[str(key)] = number
    return out


def _logged_now(trainer: pl.Trainer) -> dict[str, int | float]:
    """What Lightning would hand its loggers at this point (step values during a batch,
    epoch aggregates at epoch end); falls back to callback_metrics."""
    try:
        metrics = trainer._logger_connector.metrics["log"]
    except Exception:  # the private API moved: report everything Lightning knows
        metrics = trainer.callback_metrics
    return _numbers(metrics)


def _plain_hparams(pl_module: pl.LightningModule) -> dict[str, Any]:

    try:
        return plain_data(dict(pl_module.hparams))
    except Exception:
        return {}


def _trainer_config(trainer: pl.Trainer) -> dict[str, Any]:
    def _safe(getter: Any) -> Any:
        try:
            value = getter()
        except Exception:
            return None
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    return {
        "max_epochs": _safe(lambda: trainer.max_epochs),
        "max_steps": _safe(lambda: trainer.max_steps),
        "precision": _safe(lambda: trainer.precision),
        "strategy": type(trainer.strategy).__name__,
        "accelerator": type(trainer.accelerator).__name__,
        "devices": _safe(lambda: trainer.num_devices),
        "num_nodes": _safe(lambda: trainer.num_nodes),
        "world_size": _safe(lambda: trainer.world_size),
        "accumulate_grad_batches": _safe(lambda: trainer.accumulate_grad_batches),
        "gradient_clip_val": _safe(lambda: trainer.gradient_clip_val),
        "log_every_n_steps": _safe(lambda: trainer.log_every_n_steps),
        "check_val_every_n_epoch": _safe(lambda: trainer.check_val_every_n_epoch),
        "lightning_version": lightning.__version__,
    }


def _join_run(trainer: pl.Trainer | None, **init_kwargs: Any) -> Run:
    """The process's Run, created on first use with the Trainer's ranks.

    Lightning's own DDP launcher sets LOCAL_RANK and WORLD_SIZE for the processes it starts but
    not RANK, which is what the runtime reads to decide who writes; fill it in from the Trainer.
    """
    if trainer is not None and trainer.world_size > 1 and "RANK" not in os.environ:
        os.environ["RANK"] = str(trainer.global_rank)
        os.environ.setdefault("WORLD_SIZE", str(trainer.world_size))
    return current_run() or init(**init_kwargs)


def _writes(run: Run | None) -> bool:
    return bool(run is not None and run.is_main and run.session is not None and not run.finished)


def _requested_resume() -> str | None:
    """run.resume_path() for a process that has no Run yet (--resume PATH, TRAIN_OPS_RESUME, auto)."""
    run = current_run()
    if run is not None:
        return run.resume_path()
    cfg = config_mod.load()
    ref = requested_resume(cfg.resume_flag)
    if ref != resume_mod.AUTO:
        return ref or None
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else None
    found = resume_mod.resolve_auto(cfg.checkpoint_dir, cfg.state_dir, script=script, args=sys.argv[1:],
                                    resume_flag=cfg.resume_flag)
    for path, why in found.skipped:
        warnings.warn(f"skipping checkpoint {path}: {why}", TrainctlWarning, stacklevel=3)
    refusal = found.refusal(in_message=True)
    if refusal is not None:
        raise refusal
    for line in found.lines():
        print(f"[trainctl] {line}", file=sys.stderr, flush=True)
    return str(found.path) if found.path else None


# --- checkpoint IO -----------------------------------------------------------------------------

class _RegisteringCheckpointIO(CheckpointIO):
    """Wraps the strategy's CheckpointIO: atomic durable writes, then registration (rank 0)."""

    def __init__(self, base: CheckpointIO, callback: TrainctlCallback) -> None:
        self.base = base
        self.callback = callback

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        target = os.fspath(path)
        if "://" in target:  # remote storage: written as Lightning writes it, not registered
            self.base.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        final = Path(target).absolute()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(final, self.callback.run.id if self.callback.run is not None else None)
        meta = self.callback._meta_for(final, checkpoint)
        manifest = None
        try:
            self.base.save_checkpoint(checkpoint, tmp, storage_options=storage_options)
            if meta is not None:
                try:
                    # ModelCheckpoint rewrites last.ckpt in place: the manifest names the old and
                    # the new version while the file is swapped, as checkpoint.save() does
                    manifest = checkpoint_mod.place(tmp, final, meta)
                except Exception as e:
                    warnings.warn(f"trainctl could not register checkpoint {final}: {e}", TrainctlWarning,
                                  stacklevel=2)
            if manifest is None and tmp.exists():
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # no manifest for the new bytes: an older one must not vouch for them
                checkpoint_mod.manifest_path(final).unlink(missing_ok=True)
                os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)
        if manifest is not None:
            self.callback._recorded(final, manifest)

    def load_checkpoint(self, path: Any, map_location: Any = None, **kwargs: Any) -> dict[str, Any]:
        return self.base.load_checkpoint(path, map_location=map_location, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        target = os.fspath(path)
        if "://" not in target:
            checkpoint_mod.manifest_path(target).unlink(missing_ok=True)
        self.base.remove_checkpoint(path)
        run = self.callback.run
        if "://" not in target and _writes(run):
            run.session.event("retention", removed=[str(Path(target).absolute())], source="lightning")

    def teardown(self) -> None:
        self.base.teardown()


# --- the callback ------------------------------------------------------------------------------

class TrainctlCallback(Callback):
    """Session, metrics, registered checkpoints, resume and preemption for a Lightning Trainer.

    `name`, `project` and `config` are passed to `trainctl.init()`; `capture_rng` stores the
    python/numpy/torch RNG states in each checkpoint and puts them back on resume, so a resumed
    fit draws the same shuffles and dropout masks as an uninterrupted one.
    """

    def __init__(self, *, name: str | None = None, project: str | None = None,
                 config: Mapping[str, Any] | None = None, capture_rng: bool = True) -> None:
        self.name = name
        self.project = project
        self.user_config = dict(config or {})
        self.capture_rng = capture_rng
        self.run: Run | None = None
        self._preempted = False
        self._last_logged_step: int | None = None

    # ----------------------------------------------------------------- resume
    def resume_path(self) -> str | None:
        """The checkpoint the launcher asked to resume from (--resume, TRAIN_OPS_RESUME, auto), verified.

        Use it as `trainer.fit(model, ckpt_path=cb.resume_path())`; None starts from scratch.
        """
        path = _requested_resume()
        if path is None:
            return None
        if not os.path.exists(path):
            raise CheckpointNotFoundError(f"resume checkpoint {path} does not exist.",
                                          "List checkpoints with: trainctl checkpoint list")
        result = checkpoint_mod.verify(path)
        if result.status == "corrupt":
            found, _ = checkpoint_mod.newest_valid(Path(path).parent)
            raise CorruptCheckpointError(
                f"resume checkpoint {path} failed verification: {result.reason}.",
                f"Resume from the newest valid one instead: {found}" if found
                else "No valid checkpoint is left beside it; start without resuming.")
        return path

    # ----------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer_config = _trainer_config(trainer)
        hparams = _plain_hparams(pl_module)
        config = {**self.user_config, "hparams": hparams, "trainer": trainer_config}
        total_epochs = trainer.max_epochs if isinstance(trainer.max_epochs, int) and trainer.max_epochs > 0 else None
        total_steps = trainer.max_steps if isinstance(trainer.max_steps, int) and trainer.max_steps > 0 else None
        existing = current_run()
        run = _join_run(trainer, config=config, name=self.name, project=self.project,
                        total_steps=total_steps, total_epochs=total_epochs, capture_rng=self.capture_rng)
        if existing is run and _writes(run):
            # the script called trainctl.init() itself: add what the Trainer knows to its config
            run.config.update(_plain_config(config))
            run.session.update(config=redact_mapping(run.config))
        self.run = run
        if stage == "fit":
            self._point_checkpoints_at_session(trainer, run)
        strategy = trainer.strategy
        io = strategy.checkpoint_io
        if isinstance(io, AsyncCheckpointIO):
            # its writes finish later on another thread: nothing to make durable or digest yet
            if run.is_main:
                warnings.warn("AsyncCheckpointIO in use: trainctl does not register Lightning's checkpoints "
                              "(no manifests, no automatic resume from them)", TrainctlWarning, stacklevel=2)
        elif not isinstance(io, _RegisteringCheckpointIO):
            strategy.checkpoint_io = _RegisteringCheckpointIO(io, self)

    def _point_checkpoints_at_session(self, trainer: pl.Trainer, run: Run) -> None:
        """ModelCheckpoints without a dirpath write into the session's checkpoint folder, where
        `trainctl local --max-restarts` and `checkpoint list` look."""
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint):
                continue
            if cb.dirpath is None:
                cb.dirpath = str(run.checkpoint_dir)
            elif run.is_main and Path(cb.dirpath).resolve() != Path(run.checkpoint_dir).resolve():
                message = (f"ModelCheckpoint writes to {cb.dirpath}, outside the session's checkpoint folder "
                           f"{run.checkpoint_dir}: automatic restarts will not resume from those checkpoints "
                           "(leave dirpath unset to use the session's folder)")
                warnings.warn(message, TrainctlWarning, stacklevel=2)
                if _writes(run):
                    run.session.event("warning", message=message)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.run
        if not _writes(run) or (isinstance(trainer.max_steps, int) and trainer.max_steps > 0):
            return
        try:
            steps = trainer.estimated_stepping_batches
        except Exception:
            return
        if isinstance(steps, (int, float)) and steps == steps and steps != float("inf"):
            epochs = trainer.max_epochs if isinstance(trainer.max_epochs, int) and trainer.max_epochs > 0 else None
            run.session.update(totals={"steps": int(steps), "epochs": epochs})
            run.session.event("totals", steps=int(steps), epochs=epochs)

    # ----------------------------------------------------------------- metrics
    def _reports_metrics(self, trainer: pl.Trainer) -> bool:
        # a TrainctlLogger on the same Trainer reports them already
        return self.run is not None and not any(isinstance(lg, TrainctlLogger) for lg in trainer.loggers)

    def _report(self, trainer: pl.Trainer) -> None:
        values = _logged_now(trainer)
        if values:
            self.run.log(values, step=trainer.global_step, epoch=trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._check_preemption(trainer)
        if not self._reports_metrics(trainer):
            return
        step = trainer.global_step
        every = max(1, int(trainer.log_every_n_steps or 1))
        if step != self._last_logged_step and step % every == 0:
            self._last_logged_step = step
            self._report(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._reports_metrics(trainer):
            self._report(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reports_metrics(trainer):
            self._report(trainer)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[checkpoint_mod.META_KEY] = self._metadata(trainer, checkpoint)

    def _metadata(self, trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """The trainctl entry: plain data (RNG states as tensors) that loads under weights_only=True."""
        epoch, step = checkpoint.get("epoch"), checkpoint.get("global_step")
        metrics = _numbers(trainer.callback_metrics)
        run = self.run
        if run is not None:
            meta = run.checkpoint_metadata(epoch, step, metrics)
        else:
            meta = {"epoch": epoch, "step": step, "metrics": metrics}
            if self.capture_rng:
                meta["rng"] = checkpoint_mod.capture_rng()
        if not self.capture_rng:
            meta.pop("rng", None)
        meta["framework"] = "lightning"
        meta["lightning_version"] = lightning.__version__
        meta["monitor"] = [{"metric": cb.monitor, "mode": cb.mode} for cb in trainer.checkpoint_callbacks
                           if isinstance(cb, ModelCheckpoint) and cb.monitor]
        meta["format_version"] = checkpoint_mod.FORMAT_VERSION
        meta["saved_at"] = time.time()
        return meta

    def _meta_for(self, path: Path, checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
        """The manifest's metadata for a file Lightning is writing; None off rank 0 (not registered)."""
        run = self.run
        if run is None or not run.is_main:
            return None
        meta = checkpoint.get(checkpoint_mod.META_KEY)
        if not isinstance(meta, dict):  # save_weights_only=True skips on_save_checkpoint
            meta = {"epoch": checkpoint.get("epoch"), "step": checkpoint.get("global_step"),
                    "session_id": run.id, "script": run.script, "framework": "lightning"}
        return {**meta, "name": path.name}

    def _recorded(self, path: Path, manifest: dict[str, Any]) -> None:
        """The checkpoint event for a file Lightning wrote and trainctl registered."""
        run = self.run
        if run is not None and _writes(run):
            run.record_checkpoint(path, manifest)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(checkpoint_mod.META_KEY)
        if self.capture_rng and isinstance(meta, dict) and meta.get("rng"):
            checkpoint_mod.restore_rng(meta["rng"])
        run = self.run
        step = checkpoint.get("global_step")
        if isinstance(step, int) and run is not None:
            # metrics the interrupted attempt logged after this checkpoint are void
            run.mark_resumed(str(trainer.ckpt_path) if trainer.ckpt_path else None, step)

    # ----------------------------------------------------------------- preemption
    def _check_preemption(self, trainer: pl.Trainer) -> None:
        run = self.run
        # reading run.should_stop tells the runtime the callback handles the stop itself
        local = bool(run is not None and run.should_stop) or bool(getattr(trainer, "received_sigterm", False))
        stop = local
        if trainer.world_size > 1:
            # every rank must take the same decision: saving has a barrier
            stop = trainer.strategy.reduce_boolean_decision(local, all=False)
        if stop and not self._preempted:
            self._emergency_stop(trainer)
            trainer.should_stop = True
            # ends the fit the way Lightning's own SIGTERM handling does (a SystemExit through
            # its interrupt path: on_exception, logger finalize, teardown), with our exit code
            raise SystemExit(EXIT_PREEMPTED)

    def _emergency_stop(self, trainer: pl.Trainer) -> None:
        self._preempted = True
        run = self.run
        if run is None:
            return
        signal_name = run.stop_signal or ("SIGTERM" if getattr(trainer, "received_sigterm", False) else None)
        if run.stop_signal is None and signal_name:
            run.stop_signal = signal_name
            run.preempted = True
        path = Path(run.checkpoint_dir) / f"emergency-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        try:
            trainer.save_checkpoint(path, weights_only=False)
            message = f"{signal_name or 'preemption'}: emergency checkpoint {path}"
        except Exception as e:
            message = f"emergency checkpoint failed: {type(e).__name__}: {e}"
        if _writes(run):
            run.session.event("warning", message=message)
        run.finish(status=State.PREEMPTED)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        run = self.run
        if run is None or run.finished:
            return
        if isinstance(exception, SIGTERMException) or (isinstance(exception, SystemExit) and run.preempted):
            # Lightning stopped on SIGTERM before a batch end: between batches the state is whole
            if not self._preempted and trainer.state.stage == RunningStage.TRAINING:
                self._emergency_stop(trainer)
            else:
                run.finish(status=State.PREEMPTED)
        elif isinstance(exception, KeyboardInterrupt):
            run.finish(status=State.KILLED)
        elif isinstance(exception, SystemExit):
            run.finish(status=State.COMPLETED if not exception.code else State.FAILED)
        else:
            run.finish(status=State.FAILED, error=f"{type(exception).__name__}: {exception}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the session's final status is recorded when the process exits (or on_exception), so a
        # trainer.test() after fit still reports into the same session
        run = self.run
        if run is not None and not run.finished:
            run.flush()


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:

    return plain_data(dict(config))


# --- the logger ----------------------------------------------------------------------------------

class TrainctlLogger(Logger):
    """A Lightning Logger writing to the trainctl session (for people who prefer loggers).

    Works alone or beside TrainctlCallback (which then leaves metric reporting to the logger).
    Steps are the ones Lightning hands its loggers, as TensorBoardLogger records them.
    """

    def __init__(self, *, name: str | None = None, project: str | None = None) -> None:
        super().__init__()
        self._name = name
        self._project = project

    def _run(self) -> Run:
        return current_run() or init(name=self._name, project=self._project)

    @property
    def name(self) -> str:
        return "trainctl"

    @property
    def version(self) -> str:
        run = current_run()
        return str(run.id) if run is not None and run.id else ""

    @property
    def experiment(self) -> Run:
        return self._run()

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if params is None:
            return

        values = plain_data(vars(params) if hasattr(params, "__dict__") and not isinstance(params, Mapping)
                        else dict(params))
        run = self._run()
        hparams = dict(run.config.get("hparams") or {})
        hparams.update(values)
        run.config["hparams"] = hparams
        if _writes(run):
            run.session.update(config=redact_mapping(run.config))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        values = dict(metrics)
        epoch = scalar(values.pop("epoch", None))
        numbers = _numbers(values)
        if numbers:
            self._run().log(numbers, step=step, epoch=epoch)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        run = current_run()
        if run is not None:
            run.flush()

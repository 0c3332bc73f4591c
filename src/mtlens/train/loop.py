"""The training loop of one run whose single-task baseline is already resolved (or absent).

:class:`TrainingLoop` trains, validates, selects, tests and records one run; the parts with a job
of their own live beside it: :mod:`~mtlens.train.build` (device, model, optimiser, schedule from
their config sections), :mod:`~mtlens.train.forward` (the model's forward for the tasks),
:mod:`~mtlens.train.evaluator` (metrics, Δ, selection score), :mod:`~mtlens.train.checkpoint`
(checkpoint and best files), :mod:`~mtlens.train.records` (log.jsonl, TensorBoard, the live
display, results.json) and :mod:`~mtlens.train.capabilities` (the hooks methods declare).
:class:`mtlens.train.Trainer` resolves the baseline (training STL runs with this loop) and then
runs it.

Every step goes through :func:`mtlens.engine.mtl_backward` (features = the model's ``encode``
output, shared parameters = the encoder's), so the loop never special-cases a method by name: it
calls the method's explicit hooks — ``parameters()`` (added to the optimiser),
``on_epoch_end(epoch-mean losses)`` for every method, and, when ``needs_extra_forward`` is set
(FAMO), ``after_step(new losses)`` with the updated model's losses on the same batch computed
under ``no_grad`` right after ``optimizer.step()``. Methods whose constructor accepts
``num_tasks``/``device``/``seed`` receive them (unless the config sets them): learnable per-task
scalars (UW, IMTL-L) exist before the optimiser is built and random methods are seeded by
``train.seed`` (:func:`~mtlens.train.config.method_kwargs`).

Model selection uses the validation split only; the test split is evaluated once, at the end,
with the best epoch's weights. The best epoch maximises a score computed every epoch:

* ``delta_p_task`` — Δp_task (higher is better) of the validation metrics against the
  baseline's validation metrics (``selection: auto`` picks it whenever a baseline is given);
* ``val_loss`` — minus the sum over tasks of the mean validation loss (``auto`` without a
  baseline; single-task baselines use it);
* ``last`` — the last epoch.
Ties keep the earlier epoch.

Run directory: ``config.yaml``, ``log.jsonl``, ``tb/`` (TensorBoard), ``checkpoint.pt`` (latest,
atomic), ``best-eNNNN.pt`` while training / ``best.pt`` at the end, ``baseline.json`` when a
baseline is used, ``results.json``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from ..diagnose import SaliencyMonitor
from ..engine import DecisionCache, Regularizer, StepRecord, mtl_backward
from ..errors import CheckpointError, ConfigurationError, DataError, NonFiniteError
from ..methods import create
from ..storage import read_json, write_json
from ..tasks.spec import get_benchmark
from . import interrupt
from .build import (
    build_model,
    build_optimizer,
    build_scheduler,
    compile_encoder,
    config_differences,
    default_out_dir,
    first_dim,
    init_distributed,
    is_main_process,
    resolve_device,
    run_label,
    shard,
)
from .capabilities import feed_cross_gramian, feed_losses_after_step, run_lookahead
from .checkpoint import (
    BEST_NAME,
    FORMAT,
    VERSION,
    RunFiles,
    atomic_write_text,
    capture_rng_state,
    locked_run_directory,
    restore_rng_state,
    seed_everything,
    weights_payload,
)
from .config import RunConfig, method_kwargs, validate_config
from .evaluator import BaselineComparison, TaskEvaluator, evaluate
from .forward import TaskForward
from .loaders import ExtraBatches, TrainStream, eval_loaders, to_device
from .records import (
    LOG_NAME,
    RESULTS_NAME,
    Display,
    RunLog,
    default_console,
    environment,
    epoch_record,
    step_record,
)

__all__ = ["Callback", "TrainingLoop"]


class Callback:
    """Hooks called by :class:`TrainingLoop` (override what you need). They must not change training."""

    def on_step_end(self, trainer: TrainingLoop, log: dict[str, Any]) -> None:
        """After every optimisation step (and after a step checkpoint was written)."""

    def on_epoch_end(self, trainer: TrainingLoop, log: dict[str, Any]) -> None:
        """After validation and the epoch checkpoint."""


def _fresh_timing() -> dict[str, Any]:
    return {"train_s": 0.0, "eval_s": 0.0, "steps_timed": 0, "warmup_s": 0.0, "warmup_steps": 0}


def mean_step_time(timing: dict[str, Any]) -> float:
    """``results.json``'s ``timings.mean_step_s`` (seconds): the mean wall-clock time of a training step, the first
    step of each session (``warmup_s``/``warmup_steps``: the process's lazy initialisation and allocator growth,
    ≈ 1.5× a step on the quick suite, and many times a step on small models) left out when later steps were
    timed, so that the bench's cost columns do not charge it to whichever configuration a worker ran first.
    Steps that cost more on purpose (monitored ones, a cached decision's refresh) stay in: a mean, not a median."""
    n = int(timing["steps_timed"]) - int(timing.get("warmup_steps", 0))
    if n >= 1:
        return (float(timing["train_s"]) - float(timing.get("warmup_s", 0.0))) / n
    return float(timing["train_s"]) / max(int(timing["steps_timed"]), 1)


def _fresh_accum() -> dict[str, Any]:
    return {"loss_sum": None, "count": 0}


class TrainingLoop:
    """Train, validate, select, test and record one run (multi-task, or single-task with ``stl_task``).

    Args:
        config: a :class:`RunConfig` (or its dictionary).
        baseline: the resolved baseline ``{"source", "metrics": {"val": ..., "test": ...}}``; required
            when ``config.baseline`` is set (:class:`mtlens.train.Trainer` resolves it).
        quiet: no progress bar and no per-epoch lines.
        callbacks: :class:`Callback` objects.
        console: a ``rich.console.Console`` for progress output (default: stderr).
        tensorboard: write TensorBoard scalars under ``tb/``.

    Raises:
        ConfigurationError: ``stl_task: all`` (one loop per task: :func:`mtlens.train.run`), an
            unresolved ``config.baseline``, a method that needs a baseline without one.
        DataError: the benchmark's data lacks a split.
    """

    def __init__(
        self,
        config: RunConfig | Mapping[str, Any],
        *,
        baseline: dict[str, Any] | None = None,
        quiet: bool = False,
        callbacks: Sequence[Callback] = (),
        console: Any = None,
        tensorboard: bool = True,
    ):
        cfg = validate_config(config if isinstance(config, RunConfig) else dict(config))
        if cfg.stl_task == "all":
            raise ConfigurationError(
                "stl_task='all' trains one model per task; call mtlens.train.run(config) (or `mtlens train`)"
            )
        if cfg.baseline is not None and baseline is None and is_main_process(cfg):
            raise ConfigurationError(
                f"baseline={cfg.baseline!r} is not resolved: use mtlens.train.Trainer (it trains or reads the "
                "baseline first) or pass baseline=mtlens.train.resolve_baseline(config)"
            )
        self.cfg = cfg
        self.quiet, self.callbacks, self.tensorboard = quiet, list(callbacks), tensorboard
        self.console = console
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
        self.spec = get_benchmark(cfg.data.benchmark)
        self.tasks: list[str] = [cfg.stl_task] if cfg.stl_task else list(self.spec.task_names)
        self.multi_input = self.spec.multi_input
        self.device = resolve_device(cfg.train.device)

        self.rank, self.world = 0, 1
        self._main_out: Path | None = None
        self._local_batch: int | None = None
        if cfg.train.distributed:
            self.rank, self.world, self.device = init_distributed(cfg, self.device)
            if self.rank != 0:  # rank 0 writes the run directory; the others a scratch copy, removed at the end
                self._main_out = self.out_dir
                self.out_dir = Path(tempfile.mkdtemp(prefix=f"mtlens-rank{self.rank}-"))
                self.quiet, self.tensorboard = True, False

        # The data first: a wrong data.root fails here, before anything slow (model weights, baselines).
        # Building the datasets draws nothing from the global RNG, which is seeded right after.
        datasets = self.spec.datasets(root=cfg.data.root, seed=cfg.train.seed, **cfg.data.options)
        for split in ("train", "val", "test"):
            if split not in datasets:
                raise DataError(
                    f"benchmark '{self.spec.name}' returned splits {sorted(datasets)}; it must return "
                    "train, val "
                    "and test (val carved from train with a fixed seed when the data has none)"
                )
        self.datasets = datasets
        self.spec = self.spec.bound(datasets)  # tasks whose metrics depend on the data (QM9's target std)
        self.train_stream = TrainStream(
            datasets["train"], self.tasks, self.multi_input, cfg.train.batch_size, cfg.train.seed,
            cfg.data.num_workers, self.device.type == "cuda", cfg.train.max_steps_per_epoch,
        )

        seed_everything(cfg.train.seed)
        self.model = build_model(cfg.model, self.spec, self.tasks).to(self.device)
        compile_encoder(self.model, cfg.train.compile, self.device)
        self.forward = TaskForward(self.model, self.spec, self.tasks, self.multi_input, self.device, cfg.train.amp)
        T, dev, seed = len(self.tasks), str(self.device), cfg.train.seed
        spe = self.train_stream.steps_per_epoch
        self.method = create(cfg.method.name, **method_kwargs(cfg.method.name, cfg.method.hparams, T, dev, seed, spe))
        # the config's validation checked that each is a regulariser (family "regularizer")
        self.regularizers = [cast(Regularizer, create(r.name, **method_kwargs(r.name, r.hparams, T, dev, seed, spe)))
                             for r in cfg.regularizers]
        self.optimizer = build_optimizer(cfg.optim, self.model, self.method.parameters())
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, cfg.train.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.amp == "fp16" else None
        self.decision_cache = DecisionCache(cfg.train.update_every) if cfg.train.update_every > 1 else None
        self.monitor = None
        if cfg.monitor.every > 0:
            self.monitor = SaliencyMonitor(
                every=cfg.monitor.every,
                level=cfg.monitor.level,
                metrics=tuple(cfg.monitor.diagnostics),
                fd_temperature=cfg.monitor.fd_temperature,
                prefix="diag/",
            )
        self._extra: ExtraBatches | None = None  # built on first use (needs_second_batch, needs_lookahead)
        self._eval_loaders: dict[str, Any] = {}
        self.evaluator = TaskEvaluator(self.spec, self.tasks)

        self.baseline = baseline if self.rank == 0 else None  # baselines only change what rank 0 reports
        self.comparison = BaselineComparison(self.spec, self.tasks, self.baseline, cfg.train.selection)
        if self.method.needs_task_scores and baseline is None and cfg.baseline is None:
            raise ConfigurationError(
                f"'{self.method.name}' weights the tasks by their performance against single-task baselines "
                "(needs_task_scores): set baseline=auto (or a baseline file with validation metrics)"
            )
        self.files = RunFiles(self.out_dir)
        self.log: RunLog | None = None
        # -- progress state (all of it goes into checkpoints) --------------------------------
        self.epoch = 0  # index of the epoch in progress (0-based)
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: dict[str, Any] | None = None  # {"epoch": 1-based, "score": float, "file": name}
        self.history: list[dict[str, Any]] = []
        self._accum = _fresh_accum()
        self._timing = _fresh_timing()
        self.skipped_steps = 0
        self._diag_last: dict[str, float] | None = None
        self._peak_memory: dict[str, Any] | None = None
        self._finished = False

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, split: str = "val") -> dict[str, Any]:
        """Metrics and mean losses of every task on ``split``.

        Returns ``{"metrics": {task: {metric: value}}, "losses": {task: mean loss}}``."""
        t0 = time.perf_counter()
        if split not in self._eval_loaders:
            if split not in self.datasets:
                raise ConfigurationError(f"split '{split}' does not exist; choose one of {sorted(self.datasets)}")
            bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
            self._eval_loaders[split] = eval_loaders(self.datasets[split], self.tasks, self.multi_input, bs,
                                                     self.cfg.data.num_workers, self.device.type == "cuda", split)
        res = evaluate(self.forward, self._eval_loaders[split], self.evaluator)
        self._timing["eval_s"] += time.perf_counter() - t0
        return res

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (model, optimiser, schedule, scaler, method, RNG, progress)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": self.cfg.model_dump(mode="json"),
            "tasks": list(self.tasks),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "finished": self._finished,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "method": self.method.state_dict(),
            "decision_cache": self.decision_cache.state_dict() if self.decision_cache is not None else None,
            "regularizers": [r.state_dict() for r in self.regularizers],
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
            "rng": capture_rng_state(),
            "accum": self._accum,
            "history": self.history,
            "best": self.best,
            "timing": dict(self._timing),
            "skipped_steps": self.skipped_steps,
            "diag_last": self._diag_last,
            "jsonl_offset": self.log.offset() if self.log is not None else 0,
        }

    def save_checkpoint(self) -> Path:
        with interrupt.deferred():  # a Ctrl-C during the write lands after it (train/interrupt.py)
            return self.files.save(self.state_dict())

    def load_state(self, ckpt: dict[str, Any], path: Path) -> None:
        """Restore everything a checkpoint holds (raises CheckpointError on mismatch)."""
        diffs = config_differences(ckpt.get("config", {}), self.cfg.model_dump(mode="json"))
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 4 else "")
            raise CheckpointError(
                f"checkpoint '{path}' was written by a different configuration ({shown}); resume with the "
                "run's "
                f"own config ({self.out_dir / 'config.yaml'}, or `mtlens train --resume --out "
                f"{self.out_dir}` without "
                "--preset/--config/--set), or start a new run in another --out directory"
            )
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            self.method.load_state_dict(ckpt["method"])
            if self.decision_cache is not None and ckpt.get("decision_cache") is not None:
                self.decision_cache.load_state_dict(ckpt["decision_cache"])
            for r, s in zip(self.regularizers, ckpt["regularizers"], strict=True):
                r.load_state_dict(s)
            if self.monitor is not None and ckpt.get("monitor") is not None:
                self.monitor.load_state_dict(ckpt["monitor"])
            restore_rng_state(ckpt["rng"])
            self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
            self.global_step = int(ckpt["global_step"])
            self.history, self.best, self._accum = ckpt["history"], ckpt["best"], ckpt["accum"]
            self._timing = {**_fresh_timing(), **ckpt["timing"]}  # a checkpoint before warmup_s: none excluded
            self.skipped_steps = int(ckpt["skipped_steps"])
            self._diag_last = ckpt.get("diag_last")
            self._finished = bool(ckpt.get("finished", False))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint '{path}' does not fit this run ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); "
                "it was written by another model/method or mtlens version. Start a new run in another "
                "--out directory"
            ) from None

    # =========================================================================================
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (or continue a killed run with ``resume=True``), test the best epoch, write results.json.

        The run directory is locked for the whole call (:class:`mtlens.storage.DirectoryLock`): a
        second writer gets :class:`~mtlens.errors.LockHeldError` naming this process. Resuming a
        finished run returns its verified ``results.json`` unchanged. Output path problems (a file
        in the way, read-only, disk full) raise :class:`~mtlens.errors.OutputPathError`."""
        out = self.out_dir
        label = run_label(self.cfg)
        with locked_run_directory(out, f"mtlens train {label}", scratch_of=self._main_out, resume=resume):
            if resume:
                ckpt = self.files.load()
                self.load_state(ckpt, self.files.checkpoint)
                jsonl_offset = int(ckpt.get("jsonl_offset", 0))
                if self._finished and (out / RESULTS_NAME).exists():
                    results = read_json(out / RESULTS_NAME)  # IntegrityError when corrupt: never rewritten here
                    if not self.quiet:
                        default_console(self.console).print(
                            f"[bold]{label}[/]: {out} is a finished run; its results.json is intact and kept"
                        )
                    return results
                if not self.quiet:
                    where = (
                        "finished run: re-testing the best epoch"
                        if self._finished
                        else f"epoch {self.epoch + 1}, step {self.step_in_epoch}/{self.train_stream.steps_per_epoch} "
                        f"(global step {self.global_step})"
                    )
                    default_console(self.console).print(f"[bold]{label}[/]: resuming {out} from {where}")
                if not (out / LOG_NAME).exists() and jsonl_offset > 0:
                    # the checkpoint holds the state; only the log lines before it are gone
                    default_console(self.console).print(
                        f"[yellow]warning:[/] '{out / LOG_NAME}' is missing; continuing with a new log "
                        f"(the records before global step {self.global_step} are lost)"
                    )
                    jsonl_offset = -1
            else:
                if self.files.checkpoint.exists() or (out / RESULTS_NAME).exists():
                    raise ConfigurationError(
                        f"output directory '{out}' already holds a run; continue it with --resume or choose "
                        "another --out"
                    )
                jsonl_offset = 0
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.yaml", self.cfg.to_yaml())
            if self.baseline is not None:
                write_json(out / "baseline.json", self.baseline)
            self.log = RunLog(out, tensorboard=self.tensorboard, global_step=self.global_step,
                              jsonl_offset=jsonl_offset, resume=resume)
            if resume:
                self.files.cleanup_best(self.best["file"] if self.best else None)
            t_start = time.perf_counter()
            try:
                if not self._finished:
                    from .memory import PeakMemory

                    memory = PeakMemory(self.device)
                    memory.start()
                    self._train_loop()
                    self._peak_memory = memory.stop()
                return self._finalize(time.perf_counter() - t_start)
            finally:
                self.log.close()
                self.log = None

    def _train_loop(self) -> None:
        cfg = self.cfg
        E = cfg.train.epochs
        steps = self.train_stream.steps_per_epoch
        console = None if self.quiet else default_console(self.console)
        first_of_session = True
        with Display(run_label(cfg), console, E, steps, epoch=self.epoch, global_step=self.global_step) as display:
            while self.epoch < E:
                epoch = self.epoch
                display.start_epoch(epoch, self.step_in_epoch)
                for step, batch in self.train_stream.epoch(epoch, self.step_in_epoch):
                    interrupt.check()  # a Ctrl-C whose KeyboardInterrupt Python dropped (train/interrupt.py)
                    monitored = self.monitor is not None and self.monitor.due(self.global_step)
                    t0 = time.perf_counter()
                    record = self._train_step(batch, monitored)
                    dt = time.perf_counter() - t0
                    self._timing["train_s"] += dt
                    self._timing["steps_timed"] += 1
                    if first_of_session:  # lazy initialisation, allocator growth: not the method's cost
                        self._timing["warmup_s"] += dt
                        self._timing["warmup_steps"] += 1
                        first_of_session = False
                    log = self._step_log(record, epoch, step, dt, monitored)
                    self.step_in_epoch = step + 1
                    self.global_step += 1
                    if log is not None:
                        assert self.log is not None  # open for the whole of fit()
                        self.log.write(log, self.global_step)
                    display.advance(record)
                    every = cfg.checkpoint.every_steps
                    if every and self.global_step % every == 0 and self.step_in_epoch < steps:
                        self.save_checkpoint()
                    for cb in self.callbacks:
                        cb.on_step_end(self, log or {})
                self._end_epoch(epoch, display)

    def _train_step(self, batch: Any, monitored: bool) -> StepRecord:
        cfg = self.cfg
        self.model.train()
        batch = to_device(batch, self.device, non_blocking=self.device.type == "cuda")
        if self.world > 1:
            batch = shard(batch, self.rank, self.world)
            self._local_batch = first_dim(batch)
        if self.method.needs_second_batch:
            a, b = (to_device(x, self.device, non_blocking=self.device.type == "cuda") for x in self._aux_batches())
            feed_cross_gramian(self.forward, self.method, a, b)
        if self.method.needs_lookahead:
            self._meta_step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses, feats = self.forward.losses(batch)
        kwargs: dict[str, Any] = {"level": cfg.method.level}
        if monitored:
            assert self.monitor is not None  # monitored steps exist only with a monitor
            kwargs.update(self.monitor.engine_kwargs(self.global_step, self.method))
        record = mtl_backward(
            losses,
            method=self.method,
            features=feats,
            shared_params=self.model.shared_parameters(),
            # data parallelism: every rank reduces the heads in the model's order, whatever its share's graph reaches
            task_params=self.model.task_parameters() if self.world > 1 else None,
            regularizers=self.regularizers,
            loss_transform=cfg.loss_transform,
            jacobian=cfg.train.jacobian,
            nonfinite=cfg.train.nonfinite,
            grad_scaler=self.scaler,
            distributed=self.world > 1,
            cache=self.decision_cache,
            **kwargs,
        )
        if record.skipped:
            self.skipped_steps += 1
            if self.scaler is None or not record.reason.startswith("grad_scaler overflow"):
                return record
            # fp16 overflow: the engine wrote the scaler's inf signal; scaler.step skips the
            # optimiser step and scaler.update backs the scale off (the documented loop)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return record
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.method.needs_extra_forward:
            feed_losses_after_step(self.forward, self.method, batch, self.world)
        return record

    def _aux_batches(self) -> list[Any]:
        """Two extra training batches for this step (:class:`~mtlens.train.loaders.ExtraBatches`)."""
        if self._extra is None:
            self._extra = ExtraBatches(self.datasets["train"], self.tasks, self.multi_input,
                                       self.cfg.train.batch_size, self.cfg.train.seed)
        return self._extra.draw(self.epoch, self.step_in_epoch)

    def _meta_step(self, batch: Any) -> None:
        """Bilevel methods (``needs_lookahead``): a look-ahead over the step's batch and one
        independent batch (the first extra stream) → ``method.meta_step``
        (:func:`~mtlens.train.capabilities.run_lookahead`)."""
        val = to_device(self._aux_batches()[0], self.device, non_blocking=self.device.type == "cuda")
        if self.world > 1:  # every rank drew the same global batch: take this rank's share
            val = shard(val, self.rank, self.world)
        run_lookahead(self.forward, self.optimizer, self.method, batch, val, distributed=self.world > 1)

    def _step_log(self, record: StepRecord, epoch: int, step: int, dt: float,
                  monitored: bool) -> dict[str, Any] | None:
        acc = self._accum
        if not record.skipped:
            losses = [float(v) for v in record.losses]
            acc["loss_sum"] = losses if acc["loss_sum"] is None else [a + b for a, b in zip(acc["loss_sum"], losses)]
            acc["count"] += 1
        diag = None
        if monitored and not record.skipped:
            assert self.monitor is not None
            diag = self.monitor(record, self.global_step)
            if diag:
                self._diag_last = {"global_step": self.global_step + 1, **diag}
        if not monitored and (self.global_step + 1) % self.cfg.train.log_every != 0:
            return None
        return step_record(
            record, epoch=epoch + 1, step=step + 1, global_step=self.global_step + 1,
            lr=float(self.optimizer.param_groups[0]["lr"]), step_s=dt,
            grad_scale=float(self.scaler.get_scale()) if self.scaler is not None else None,
            world=self.world, local_batch=self._local_batch, diagnostics=diag,
        )

    def _end_epoch(self, epoch: int, display: Display) -> None:
        acc = self._accum
        if acc["count"] == 0:
            # NonFiniteError, not DataError: the run diverged (one method, one learning rate), which says nothing
            # of the benchmark's data; `mtlens bench` stops every run of a benchmark after a DataError
            raise NonFiniteError(
                f"epoch {epoch + 1}: every step was skipped (non-finite losses); nothing was trained. "
                "Check the data "
                "and lower optim.lr"
            )
        mean_losses = [s / acc["count"] for s in acc["loss_sum"]]
        self.method.on_epoch_end(torch.tensor(mean_losses, dtype=torch.float32, device=self.device))
        for r in self.regularizers:
            r.on_epoch_end(torch.tensor(mean_losses, dtype=torch.float32, device=self.device))
        lr = float(self.optimizer.param_groups[0]["lr"])
        plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.scheduler is not None and not plateau:
            self.scheduler.step()
        val = self.evaluate("val")
        if self.method.needs_task_scores:
            self.method.on_task_scores(self.comparison.task_scores(val, self.method.name))
        score = self.comparison.score(val, epoch + 1)
        if plateau:
            self.scheduler.step(score)
        improved = self.best is None or (math.isfinite(score) and not (score <= self.best["score"]))
        if self.best is not None and not math.isfinite(self.best["score"]) and math.isfinite(score):
            improved = True
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": dict(zip(self.tasks, mean_losses)),
            "val": val,
            "score": score,
            "lr": lr,
        }
        self.history.append(entry)
        if improved:
            path = self.files.best_file(epoch + 1)
            config = self.cfg.model_dump(mode="json")
            self.files.save_weights(weights_payload(config, self.tasks, self.model, epoch=epoch + 1, val=val), path)
            self.best = {"epoch": epoch + 1, "score": score, "file": path.name}
        best = self.best
        assert best is not None and self.log is not None  # the first epoch always improves; fit() opened the log
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        self._accum = _fresh_accum()
        log = epoch_record(epoch=epoch + 1, global_step=self.global_step, lr=lr,
                           criterion=self.comparison.criterion(), score=score, best_epoch=best["epoch"],
                           train_loss=entry["train_loss"], val=val,
                           deltas=self.comparison.deltas(val["metrics"], "val"))
        self.log.write(log, self.global_step)
        self.save_checkpoint()
        self.files.cleanup_best(best["file"])
        display.end_epoch(log, val)
        for cb in self.callbacks:
            cb.on_epoch_end(self, log)

    # -- the end --------------------------------------------------------------------------------
    def _finalize(self, session_s: float) -> dict[str, Any]:
        out = self.out_dir
        if self.best is None:
            raise CheckpointError(f"run '{out}' finished no epoch; nothing to test")
        weights = self.files.load_weights(self.best["file"] if not self._finished else BEST_NAME)
        self.model.load_state_dict(weights["model"])
        test = self.evaluate("test")
        best_entry = next(h for h in self.history if h["epoch"] == self.best["epoch"])
        if not self._finished:
            config = self.cfg.model_dump(mode="json")
            payload = weights_payload(config, self.tasks, self.model, epoch=self.best["epoch"],
                                      val=best_entry["val"], test=test)
            self.files.save_weights(payload, self.files.best_file())
            self._finished = True
            self.best = {**self.best, "file": BEST_NAME}
            self.save_checkpoint()
            self.files.cleanup_best(self.best["file"])
        results = self._results(best_entry, test, session_s)
        write_json(out / RESULTS_NAME, results)
        return results

    def _results(self, best_entry: dict[str, Any], test: dict[str, Any], session_s: float) -> dict[str, Any]:
        cfg = self.cfg
        best = self.best
        assert best is not None  # _finalize checked it
        val_metrics = best_entry["val"]["metrics"]
        diag = None
        if self._diag_last is not None:
            diag = {
                "final": {k: v for k, v in self._diag_last.items() if k != "global_step"},
                "final_step": self._diag_last["global_step"],
                "mean": self.monitor.summary() if self.monitor is not None else None,
                "every": cfg.monitor.every,
            }
        baseline = self.baseline
        return {
            "format": "mtlens-results",
            "version": 1,
            "name": cfg.name,
            "kind": "stl" if cfg.stl_task else "mtl",
            "benchmark": self.spec.name,
            "tasks": list(self.tasks),
            "method": cfg.method.name,
            "level": cfg.method.level,
            "regularizers": [r.name for r in cfg.regularizers],
            "metric_directions": self.comparison.directions,
            "metric_units": {t: dict(self.spec.tasks[t].units) for t in self.tasks if self.spec.tasks[t].units},
            "best_epoch": best["epoch"],
            "selection": {"criterion": self.comparison.criterion(), "score": best["score"]},
            "metrics": {"val": val_metrics, "test": test["metrics"]},
            "losses": {"val": best_entry["val"]["losses"], "test": test["losses"]},
            "baseline": baseline,
            "delta": (
                {"val": self.comparison.deltas(val_metrics, "val"),
                 "test": self.comparison.deltas(test["metrics"], "test")}
                if baseline is not None
                else None
            ),
            "diagnostics": diag,
            "history": [
                {
                    "epoch": h["epoch"],
                    "train_loss": h["train_loss"],
                    "val": h["val"],
                    "score": h["score"],
                    "lr": h["lr"],
                }
                for h in self.history
            ],
            "steps": self.global_step,
            "steps_per_epoch": self.train_stream.steps_per_epoch,
            "skipped_steps": self.skipped_steps,
            "timings": {
                "train_s": self._timing["train_s"],
                "eval_s": self._timing["eval_s"],
                "mean_step_s": mean_step_time(self._timing),
                "warmup_s": self._timing["warmup_s"],
                "warmup_steps": self._timing["warmup_steps"],
                "this_session_s": session_s,
                # this session's training only (None when a finished run was re-tested): train/memory.py
                "peak_memory": self._peak_memory,
            },
            "device": str(self.device),
            "environment": environment(),
            "config": cfg.model_dump(mode="json"),
            "out_dir": str(self.out_dir),
        }

"""The training loop: one validated :class:`RunConfig` in, a results dictionary (and a run directory) out.

Every step goes through :func:`mtlens.engine.mtl_backward` (features = the model's ``encode``
output, shared parameters = the encoder's), so the trainer never special-cases a method by
name: it calls the method's explicit hooks — ``parameters()`` (added to the optimiser),
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
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..engine import DecisionCache, LookAhead, StepRecord, cross_gramian, mtl_backward
from ..errors import CheckpointError, ConfigurationError, DataError, OutputPathError
from ..storage import DirectoryLock, is_under, output_path_error, read_json, write_json
from .checkpoint import (
    FORMAT,
    VERSION,
    WEIGHTS_FORMAT,
    atomic_torch_save,
    atomic_write_text,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    seed_everything,
)
from .config import RunConfig, method_kwargs, validate_config
from .data import TrainStream, eval_loaders, stream_seed, to_device
from .records import JsonlWriter, Scalars, environment

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
RESULTS_NAME = "results.json"
LOG_NAME = "log.jsonl"


class Callback:
    """Hooks called by :class:`Trainer` (override what you need). They must not change training."""

    def on_step_end(self, trainer: Trainer, log: dict[str, Any]) -> None:
        """After every optimisation step (and after a step checkpoint was written)."""

    def on_epoch_end(self, trainer: Trainer, log: dict[str, Any]) -> None:
        """After validation and the epoch checkpoint."""


def _shard(batch: Any, rank: int, world: int) -> Any:
    """This rank's equal share (along dim 0) of every tensor in a batch."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            return batch
        n = batch.shape[0] // world
        return batch[rank * n:(rank + 1) * n]
    if isinstance(batch, dict):
        return {k: _shard(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_shard(v, rank, world) for v in batch)
    return batch


def _first_dim(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return _first_dim(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _first_dim(batch[0])
    return 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("train.device='cuda' but torch.cuda.is_available() is False; use cpu or auto")
    return torch.device(name)


def build_model(cfg: RunConfig, spec, tasks: Sequence[str]):
    """The :class:`HPSModel` of ``cfg.model`` with one head per task in ``tasks``."""
    from .. import models

    preset = cfg.model.preset or spec.default_model
    return models.create(
        preset,
        {t: spec.tasks[t] for t in tasks},
        in_channels=spec.in_channels,
        pretrained=cfg.model.pretrained or cfg.model.weights is not None,
        weights=cfg.model.weights,
        **cfg.model.kwargs,
    )


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, method_params: Sequence[torch.Tensor]):
    """Adam/AdamW/SGD over the model, plus a weight-decay-free group for the method's parameters."""
    o = cfg.optim
    groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    mp = [p for p in method_params if p.requires_grad]
    if mp:
        groups.append({"params": mp, "weight_decay": 0.0})
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    return torch.optim.SGD(groups, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, nesterov=o.nesterov)


def build_scheduler(cfg: RunConfig, optimizer):
    s = cfg.schedule
    if s.name == "none":
        return None
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if s.name == "plateau":
        # ReduceLROnPlateau on the epoch's validation selection score (higher is better), stepped
        # after validation: Nash-MTL's QM9 schedule (factor 0.7, patience 5, min_lr 1e-5) on val Δm.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=s.gamma, patience=s.patience, min_lr=s.min_lr
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs, eta_min=s.eta_min)


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    what = f"stl-{cfg.stl_task}" if cfg.stl_task else cfg.method.name
    return Path("runs") / f"{cfg.name or cfg.data.benchmark}-{what}-{stamp}"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], ignore=("out_dir", "name")) -> list[str]:
    fa = {k: v for k, v in _flatten(a).items() if k.split(".")[0] not in ignore}
    fb = {k: v for k, v in _flatten(b).items() if k.split(".")[0] not in ignore}
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


class Trainer:
    """Train, validate, select, test and record one run (multi-task, or single-task with ``stl_task``).

    >>> from mtlens.train import Trainer, load_config
    >>> cfg = load_config("quick-multimnist", overrides=["train.epochs=1"])
    >>> results = Trainer(cfg).fit()  # trains the run and its single-task baselines  # doctest: +SKIP
    >>> results["metrics"]["test"]  # test metrics of the selected epoch, per task  # doctest: +SKIP
    {'left': {'acc': 94.1}, 'right': {'acc': 87.3}}

    Args:
        config: a :class:`RunConfig` (or its dictionary).
        baseline: resolved baseline ``{"source", "metrics": {"val": ..., "test": ...}}``; by
            default it comes from ``config.baseline`` (``auto`` trains or reuses STL baselines).
        quiet: no progress bar and no per-epoch lines.
        callbacks: :class:`Callback` objects.
        console: a ``rich.console.Console`` for progress output (default: stderr).
        tensorboard: write TensorBoard scalars under ``tb/``.
    """

    def __init__(
        self,
        config: RunConfig | Mapping[str, Any],
        *,
        baseline: dict[str, Any] | None = None,
        quiet: bool = False,
        callbacks: Sequence[Callback] = (),
        console=None,
        tensorboard: bool = True,
    ):
        from ..methods import create
        from ..tasks.spec import get_benchmark

        cfg = validate_config(config if isinstance(config, RunConfig) else dict(config))
        if cfg.stl_task == "all":
            raise ConfigurationError(
                "stl_task='all' trains one model per task; call mtlens.train.run(config) (or `mtlens train`)"
            )
        self.cfg = cfg
        self.quiet, self.callbacks, self.tensorboard = quiet, list(callbacks), tensorboard
        self.console = console
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
        self.spec = get_benchmark(cfg.data.benchmark)
        self.tasks: list[str] = [cfg.stl_task] if cfg.stl_task else list(self.spec.task_names)
        self.multi_input = self.spec.multi_input
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp]

        self.rank, self.world = 0, 1
        self._main_out: Path | None = None
        if cfg.train.distributed:
            self._init_distributed()

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
        pin = self.device.type == "cuda"
        self.train_stream = TrainStream(
            datasets["train"],
            self.tasks,
            self.multi_input,
            cfg.train.batch_size,
            cfg.train.seed,
            cfg.data.num_workers,
            pin,
            cfg.train.max_steps_per_epoch,
        )

        seed_everything(cfg.train.seed)
        self.model = build_model(cfg, self.spec, self.tasks).to(self.device)
        T, dev, seed = len(self.tasks), str(self.device), cfg.train.seed
        spe = self.train_stream.steps_per_epoch
        self.method = create(cfg.method.name, **method_kwargs(cfg.method.name, cfg.method.hparams, T, dev, seed, spe))
        self.regularizers = [create(r.name, **method_kwargs(r.name, r.hparams, T, dev, seed, spe))
                             for r in cfg.regularizers]
        self.optimizer = build_optimizer(cfg, self.model, self.method.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.amp == "fp16" else None
        self.decision_cache = DecisionCache(cfg.train.update_every) if cfg.train.update_every > 1 else None
        self.monitor = None
        if cfg.monitor.every > 0:
            from ..diagnose import SaliencyMonitor

            self.monitor = SaliencyMonitor(
                every=cfg.monitor.every,
                level=cfg.monitor.level,
                metrics=tuple(cfg.monitor.diagnostics),
                fd_temperature=cfg.monitor.fd_temperature,
                prefix="diag/",
            )

        self._eval_loaders: dict[str, Any] = {}

        self._baseline = baseline
        if self.method.needs_task_scores and baseline is None and cfg.baseline is None:
            raise ConfigurationError(
                f"'{self.method.name}' weights the tasks by their performance against single-task baselines "
                "(needs_task_scores): set baseline=auto (or a baseline file with validation metrics)"
            )
        # -- progress state (all of it goes into checkpoints) --------------------------------
        self.epoch = 0  # index of the epoch in progress (0-based)
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: dict[str, Any] | None = None  # {"epoch": 1-based, "score": float, "file": name}
        self.history: list[dict[str, Any]] = []
        self._accum = self._fresh_accum()
        self._timing = {"train_s": 0.0, "eval_s": 0.0, "steps_timed": 0}
        self.skipped_steps = 0
        self._diag_last: dict[str, float] | None = None
        self._peak_memory: dict[str, Any] | None = None
        self._finished = False

    # -- data parallelism (torchrun) ----------------------------------------------------------
    def _init_distributed(self) -> None:
        """Join the torchrun process group; every rank trains on its share of each global batch.

        Rank 0 writes the run directory; the other ranks write into a temporary directory that is
        removed when they finish (their results are identical by construction)."""
        import os
        import tempfile

        cfg = self.cfg
        if not torch.distributed.is_initialized():
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise ConfigurationError(
                    "train.distributed=true needs the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR): launch "
                    "with `torchrun --standalone --nproc_per_node=N -m mtlens.cli.main train ... --set "
                    "train.distributed=true`"
                )
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        if cfg.train.batch_size % self.world:
            raise ConfigurationError(
                f"train.batch_size={cfg.train.batch_size} (the global batch) must be divisible by the "
                f"{self.world} processes; each takes an equal share"
            )
        if self.method_needs_second_batch():
            raise ConfigurationError(
                f"'{cfg.method.name}' draws two extra batches for its cross-Gramian (needs_second_batch); that is not "
                "data-parallel yet: train it in one process"
            )
        if self.rank != 0:
            self._main_out = self.out_dir
            self.out_dir = Path(tempfile.mkdtemp(prefix=f"mtlens-rank{self.rank}-"))
            self.quiet, self.tensorboard = True, False

    def method_needs_second_batch(self) -> bool:
        from ..methods import get

        return get(self.cfg.method.name).needs_second_batch

    # =========================================================================================
    @property
    def baseline(self) -> dict[str, Any] | None:
        """The resolved baseline (``auto`` resolved on first use)."""
        if self.rank != 0:  # baselines only change what rank 0 reports (and are trained there)
            return None
        if self._baseline is None and self.cfg.baseline is not None:
            from .baseline import resolve_baseline

            rng = capture_rng_state()  # training baselines now or reusing them must not change this run
            try:
                self._baseline = resolve_baseline(self.cfg, quiet=self.quiet, console=self._console())
            finally:
                restore_rng_state(rng)
        return self._baseline

    def _console(self):
        if self.console is None:
            from rich.console import Console

            self.console = Console(stderr=True)
        return self.console

    def label(self) -> str:
        """Short name of what is trained ("STL left", "ew + rep_mtl", "mgda (feature)")."""
        cfg = self.cfg
        if cfg.stl_task:
            return f"STL {cfg.stl_task}"
        s = cfg.method.name + (f" ({cfg.method.level})" if cfg.method.level else "")
        return s + "".join(f" + {r.name}" for r in cfg.regularizers)

    @staticmethod
    def _fresh_accum() -> dict[str, Any]:
        return {"loss_sum": None, "count": 0}

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _out_size(self, x: torch.Tensor):
        return tuple(x.shape[-2:]) if self.spec.dense else None

    # -- forward ----------------------------------------------------------------------------
    def _forward_losses(self, batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """Per-task losses and the shared representation(s) the heads consumed."""
        losses: dict[str, torch.Tensor] = {}
        if self.multi_input:
            feats = {}  # {task: Z_task}: one input batch per task (explicit multi-input for the engine)
            for t in self.tasks:
                x, y = batch[t]["input"], batch[t]["target"]
                with self._autocast():
                    z = self.model.encode(x)
                    pred = self.model.decode(z, tasks=[t], out_size=self._out_size(x))[t]
                losses[t] = self.spec.tasks[t].loss(pred.float(), y)
                feats[t] = z
            return losses, feats
        x = batch["input"]
        with self._autocast():
            z = self.model.encode(x)
            preds = self.model.decode(z, tasks=self.tasks, out_size=self._out_size(x))
        for t in self.tasks:
            losses[t] = self.spec.tasks[t].loss(preds[t].float(), batch["targets"][t])
        return losses, z

    def _train_step(self, batch: Any, monitored: bool) -> StepRecord:
        cfg = self.cfg
        self.model.train()
        batch = to_device(batch, self.device, non_blocking=self.device.type == "cuda")
        if self.world > 1:
            batch = _shard(batch, self.rank, self.world)
            self._local_batch = _first_dim(batch)
        if self.method.needs_second_batch:
            self._observe_cross_gramian()
        if self.method.needs_lookahead:
            self._meta_step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses, feats = self._forward_losses(batch)
        kwargs: dict[str, Any] = {"level": cfg.method.level}
        if monitored:
            kwargs.update(self.monitor.engine_kwargs(self.global_step, self.method))
        record = mtl_backward(
            losses,
            method=self.method,
            features=feats,
            shared_params=self.model.shared_parameters(),
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
            self._extra_forward(batch)
        return record

    def _aux_batches(self) -> list[Any]:
        """Two extra training batches for ``needs_second_batch`` methods (SDMGrad, MoDo).

        They come from two more seeded streams over the training set (seeds derived from
        ``train.seed``), independent of the step's batch; the extra batches of step k of epoch e
        are a pure function of (seed, e, k), so a resumed run draws the same ones."""
        cfg = self.cfg
        if getattr(self, "_aux_streams", None) is None:
            self._aux_streams = [
                TrainStream(self.datasets["train"], self.tasks, self.multi_input, cfg.train.batch_size,
                            stream_seed(cfg.train.seed, f"second-batch/{k}", 0), 0, False)
                for k in range(2)
            ]
            self._aux = None
        if self._aux is None or self._aux[0] != (self.epoch, self.step_in_epoch):
            self._aux = [(self.epoch, self.step_in_epoch),
                         [st.epoch(self.epoch, self.step_in_epoch) for st in self._aux_streams]]
        out = [next(it)[1] for it in self._aux[1]]
        self._aux[0] = (self.epoch, self.step_in_epoch + 1)
        return out

    def _observe_cross_gramian(self) -> None:
        """``A = J_ξ J_ξ'ᵀ`` on two extra batches → ``method.observe_cross_gramian(A)``."""
        a, b = (to_device(x, self.device, non_blocking=self.device.type == "cuda") for x in self._aux_batches())
        la, _ = self._forward_losses(a)
        lb, _ = self._forward_losses(b)
        A = cross_gramian([la[t] for t in self.tasks], [lb[t] for t in self.tasks], self.model.shared_parameters())
        self.method.observe_cross_gramian(A)

    def _meta_step(self, batch: Any) -> None:
        """Bilevel methods (``needs_lookahead``): a :class:`LookAhead` over the step's batch and one
        independent batch (the first extra stream of :meth:`_aux_batches`) → ``method.meta_step``.
        The look-ahead's forwards run in train mode; BatchNorm running statistics are restored
        afterwards so that they do not change the model [choice]."""
        val = to_device(self._aux_batches()[0], self.device, non_blocking=self.device.type == "cuda")
        if self.world > 1:  # every rank drew the same global batch: take this rank's share
            val = _shard(val, self.rank, self.world)
        params = [p for p in self.model.parameters() if p.requires_grad]
        group = self.optimizer.param_groups[0]
        momentum = float(group.get("momentum", 0.0) or 0.0)
        bufs = [self.optimizer.state.get(p, {}).get("momentum_buffer") if momentum else None for p in params]
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}

        def losses_of(b):
            def closure():
                losses, _ = self._forward_losses(b)
                return [losses[t] for t in self.tasks]
            return closure

        la = LookAhead(params, losses_of(batch), losses_of(val), lr=float(group["lr"]), momentum=momentum,
                       momentum_buffers=bufs, weight_decay=float(group.get("weight_decay", 0.0) or 0.0),
                       distributed=self.world > 1)
        try:
            self.method.meta_step(la)
        finally:
            with torch.no_grad():
                for k, v in self.model.named_buffers():
                    v.copy_(buffers[k])

    def _extra_forward(self, batch: Any) -> None:
        """Losses of the updated model on the same batch, for methods that need them (FAMO).

        Train mode (as in the step's forward); BatchNorm running statistics are restored
        afterwards so that this measurement does not change the model [choice]."""
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        with torch.no_grad():
            new_losses, _ = self._forward_losses(batch)
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(buffers[k])
        new = torch.stack([new_losses[t].detach().float() for t in self.tasks])
        if self.world > 1:  # the global batch's losses, so that the method's state stays equal on every rank
            torch.distributed.all_reduce(new)
            new /= self.world
        self.method.after_step(new)

    # -- evaluation ---------------------------------------------------------------------------
    def _loaders(self, split: str):
        if split not in self._eval_loaders:
            if split not in self.datasets:
                raise ConfigurationError(f"split '{split}' does not exist; choose one of {sorted(self.datasets)}")
            bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
            self._eval_loaders[split] = eval_loaders(
                self.datasets[split],
                self.tasks,
                self.multi_input,
                bs,
                self.cfg.data.num_workers,
                self.device.type == "cuda",
                split,
            )
        return self._eval_loaders[split]

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, Any]:
        """Metrics and mean losses of every task on ``split``.

        Returns ``{"metrics": {task: {metric: value}}, "losses": {task: mean loss}}``."""
        t0 = time.perf_counter()
        self.model.eval()
        meters = {t: self.spec.tasks[t].make_metrics() for t in self.tasks}
        for m in meters.values():
            m.reset()
        loss_sum = dict.fromkeys(self.tasks, 0.0)
        count = dict.fromkeys(self.tasks, 0)

        def account(t, pred, y):
            pred = pred.float()
            meters[t].update(pred, y)
            n = int(y.shape[0])
            loss_sum[t] += float(self.spec.tasks[t].loss(pred, y)) * n
            count[t] += n

        for key, loader in self._loaders(split).items():
            for batch in loader:
                batch = to_device(batch, self.device)
                if self.multi_input:
                    x = batch["input"]
                    with self._autocast():
                        pred = self.model.decode(self.model.encode(x), tasks=[key], out_size=self._out_size(x))[key]
                    account(key, pred, batch["target"])
                else:
                    x = batch["input"]
                    with self._autocast():
                        preds = self.model.decode(self.model.encode(x), tasks=self.tasks, out_size=self._out_size(x))
                    for t in self.tasks:
                        account(t, preds[t], batch["targets"][t])
        metrics = {}
        for t in self.tasks:
            values = {k: float(v) for k, v in meters[t].compute().items()}
            missing = [k for k in self.spec.tasks[t].metrics if k not in values]
            if missing:
                raise DataError(f"metrics of task '{t}' returned {sorted(values)}, missing declared {missing}")
            metrics[t] = {k: values[k] for k in self.spec.tasks[t].metrics}
        self._timing["eval_s"] += time.perf_counter() - t0
        return {"metrics": metrics, "losses": {t: loss_sum[t] / max(count[t], 1) for t in self.tasks}}

    # -- selection ----------------------------------------------------------------------------
    def selection_criterion(self) -> str:
        crit = self.cfg.train.selection
        if crit == "auto":
            b = self.baseline
            return "delta_p_task" if b is not None and b["metrics"].get("val") else "val_loss"
        if crit == "delta_p_task" and not (self.baseline and self.baseline["metrics"].get("val")):
            raise ConfigurationError(
                "train.selection='delta_p_task' needs the baseline's validation metrics; the baseline "
                "file has "
                "only test metrics. Use selection=val_loss, or baseline=auto"
            )
        return crit

    def _score(self, val: dict[str, Any], epoch: int) -> float:
        crit = self.selection_criterion()
        if crit == "last":
            return float(epoch)
        if crit == "val_loss":
            return -float(sum(val["losses"].values()))
        from ..tasks.delta import delta_p_task

        return float(delta_p_task(val["metrics"], self.baseline["metrics"]["val"], self._directions()))

    def _report_task_scores(self, val: dict[str, Any]) -> None:
        """Each task's relative drop (%, higher = worse) against the baseline's validation metrics,
        ``-mean_m r_m``, reported to methods with ``needs_task_scores`` (PIVRG)."""
        from ..tasks.delta import relative_improvements

        b = self.baseline
        if b is None or not b["metrics"].get("val"):
            raise ConfigurationError(
                f"'{self.method.name}' weights the tasks by their performance against single-task baselines "
                "(needs_task_scores); it needs the baseline's validation metrics: set baseline=auto"
            )
        r = relative_improvements(val["metrics"], b["metrics"]["val"], self._directions())
        scores = [-sum(r[t].values()) / len(r[t]) for t in self.tasks]
        self.method.on_task_scores(torch.tensor(scores, dtype=torch.float64))

    def _directions(self) -> dict[str, dict[str, bool]]:
        return {t: dict(self.spec.tasks[t].metrics) for t in self.tasks}

    def deltas(self, metrics: dict[str, dict[str, float]], split: str) -> dict[str, float] | None:
        """Δ in the three named conventions against the baseline's ``split`` metrics (None without one)."""
        b = self.baseline
        if b is None or not b["metrics"].get(split):
            return None
        from ..tasks.delta import delta_m, delta_p_metric, delta_p_task

        base, spec = b["metrics"][split], self._directions()
        return {
            "delta_p_task": float(delta_p_task(metrics, base, spec)),
            "delta_p_metric": float(delta_p_metric(metrics, base, spec)),
            "delta_m": float(delta_m(metrics, base, spec)),
        }

    # -- checkpoints --------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def state_dict(self) -> dict[str, Any]:
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
            "jsonl_offset": self._jsonl.offset() if getattr(self, "_jsonl", None) is not None else 0,
        }

    def save_checkpoint(self) -> Path:
        path = self._checkpoint_path()
        atomic_torch_save(self.state_dict(), path)
        return path

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
            self._timing, self.skipped_steps = dict(ckpt["timing"]), int(ckpt["skipped_steps"])
            self._diag_last = ckpt.get("diag_last")
            self._finished = bool(ckpt.get("finished", False))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint '{path}' does not fit this run ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); "
                "it was written by another model/method or mtlens version. Start a new run in another "
                "--out directory"
            ) from None

    def _best_file(self, epoch: int) -> Path:
        return self.out_dir / f"best-e{epoch:04d}.pt"

    def _weights_payload(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": WEIGHTS_FORMAT,
            "version": VERSION,
            "config": self.cfg.model_dump(mode="json"),
            "tasks": list(self.tasks),
            "model": self.model.state_dict(),
            **extra,
        }

    def _cleanup_best_files(self) -> None:
        keep = self.best["file"] if self.best else None
        for p in self.out_dir.glob("best-e*.pt"):
            if p.name != keep:
                p.unlink(missing_ok=True)

    # =========================================================================================
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (or continue a killed run with ``resume=True``), test the best epoch, write results.json.

        The run directory is locked for the whole call (:class:`mtlens.storage.DirectoryLock`): a
        second writer gets :class:`~mtlens.errors.LockHeldError` naming this process. Resuming a
        finished run returns its verified ``results.json`` unchanged. Output path problems (a file
        in the way, read-only, disk full) raise :class:`~mtlens.errors.OutputPathError`."""
        out = self.out_dir
        if self._main_out is not None:  # a non-main rank: its own scratch copy of the run directory
            import shutil

            try:
                if resume:
                    shutil.copytree(self._main_out, out, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("*.lock", ".lock*", "tb"))
                return self._fit_locked(resume)
            finally:
                shutil.rmtree(out, ignore_errors=True)
        try:
            lock = DirectoryLock(out, purpose=f"mtlens train {self.label()}").acquire()
        except OSError as exc:
            raise output_path_error(exc) from None
        try:
            return self._fit_locked(resume)
        except OSError as exc:
            if isinstance(exc, OutputPathError) or not is_under(exc.filename, out):
                raise
            raise output_path_error(exc) from None
        finally:
            lock.release()

    def _fit_locked(self, resume: bool) -> dict[str, Any]:
        out = self.out_dir
        ckpt_path = self._checkpoint_path()
        if resume:
            ckpt = load_checkpoint(ckpt_path)
            self.load_state(ckpt, ckpt_path)
            jsonl_offset = int(ckpt.get("jsonl_offset", 0))
            if self._finished and (out / RESULTS_NAME).exists():
                results = read_json(out / RESULTS_NAME)  # IntegrityError when corrupt: never rewritten here
                if not self.quiet:
                    self._console().print(
                        f"[bold]{self.label()}[/]: {out} is a finished run; its results.json is intact and kept"
                    )
                return results
            if not self.quiet:
                where = (
                    "finished run: re-testing the best epoch"
                    if self._finished
                    else f"epoch {self.epoch + 1}, step {self.step_in_epoch}/{self.train_stream.steps_per_epoch} "
                    f"(global step {self.global_step})"
                )
                self._console().print(f"[bold]{self.label()}[/]: resuming {out} from {where}")
            if not (out / LOG_NAME).exists() and jsonl_offset > 0:
                # the checkpoint holds the state; only the log lines before it are gone
                self._console().print(
                    f"[yellow]warning:[/] '{out / LOG_NAME}' is missing; continuing with a new log "
                    f"(the records before global step {self.global_step} are lost)"
                )
                jsonl_offset = -1
        else:
            if ckpt_path.exists() or (out / RESULTS_NAME).exists():
                raise ConfigurationError(
                    f"output directory '{out}' already holds a run; continue it with --resume or choose another --out"
                )
            jsonl_offset = 0
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", self.cfg.to_yaml())
        if self.baseline is not None:
            write_json(out / "baseline.json", self.baseline)
        self._jsonl = JsonlWriter(out / LOG_NAME)
        if jsonl_offset >= 0:
            self._jsonl.truncate(jsonl_offset)
        else:
            self._jsonl.write(
                {
                    "type": "note",
                    "global_step": self.global_step,
                    "note": "log.jsonl was missing at resume; the records before this step are lost",
                }
            )
        self._tb = Scalars(
            out / "tb" if self.tensorboard else None, purge_step=self.global_step + 1 if resume else None
        )
        if resume:
            self._cleanup_best_files()
        t_start = time.perf_counter()
        try:
            if not self._finished:
                from .memory import PeakMemory

                memory = PeakMemory(self.device)
                memory.start()
                self._train_loop()
                self._peak_memory = memory.stop()
            results = self._finalize(time.perf_counter() - t_start)
        finally:
            self._jsonl.close()
            self._tb.close()
            self._jsonl = None
        return results

    def _train_loop(self) -> None:
        cfg = self.cfg
        E = cfg.train.epochs
        steps = self.train_stream.steps_per_epoch
        display = _Display(self, E, steps)
        with display:
            while self.epoch < E:
                epoch = self.epoch
                display.start_epoch(epoch, self.step_in_epoch)
                for step, batch in self.train_stream.epoch(epoch, self.step_in_epoch):
                    monitored = self.monitor is not None and self.monitor.due(self.global_step)
                    t0 = time.perf_counter()
                    record = self._train_step(batch, monitored)
                    dt = time.perf_counter() - t0
                    self._timing["train_s"] += dt
                    self._timing["steps_timed"] += 1
                    log = self._step_log(record, epoch, step, dt, monitored)
                    self.step_in_epoch = step + 1
                    self.global_step += 1
                    if log is not None:
                        self._jsonl.write(log)
                        self._tb.add({k: v for k, v in log.items() if "/" in k}, self.global_step)
                    display.advance(record)
                    every = cfg.checkpoint.every_steps
                    if every and self.global_step % every == 0 and self.step_in_epoch < steps:
                        self.save_checkpoint()
                    for cb in self.callbacks:
                        cb.on_step_end(self, log or {})
                self._end_epoch(epoch, display)

    def _step_log(self, record: StepRecord, epoch: int, step: int, dt: float, monitored: bool):
        acc = self._accum
        if not record.skipped:
            losses = [float(v) for v in record.losses]
            acc["loss_sum"] = losses if acc["loss_sum"] is None else [a + b for a, b in zip(acc["loss_sum"], losses)]
            acc["count"] += 1
        diag = None
        if monitored and not record.skipped:
            diag = self.monitor(record, self.global_step)
            if diag:
                self._diag_last = {"global_step": self.global_step + 1, **diag}
        if not monitored and (self.global_step + 1) % self.cfg.train.log_every != 0:
            return None
        log: dict[str, Any] = {
            "type": "step",
            "epoch": epoch + 1,
            "step": step + 1,
            "global_step": self.global_step + 1,
        }
        log.update(record.to_dict(prefix="train/"))
        log["train/lr"] = float(self.optimizer.param_groups[0]["lr"])
        log["time/step_s"] = dt
        if self.scaler is not None:
            log["train/grad_scale"] = float(self.scaler.get_scale())
        if self.world > 1:
            log["train/world_size"] = float(self.world)
            log["train/local_batch"] = float(self._local_batch)
        if record.skipped:
            log["reason"] = record.reason
        if diag:
            log.update(diag)
        return log

    def _end_epoch(self, epoch: int, display: _Display) -> None:
        acc = self._accum
        if acc["count"] == 0:
            raise DataError(
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
            self._report_task_scores(val)
        score = self._score(val, epoch + 1)
        if plateau:
            self.scheduler.step(score)
        improved = self.best is None or (math.isfinite(score) and not (score <= self.best["score"]))
        if self.best is not None and not math.isfinite(self.best["score"]) and math.isfinite(score):
            improved = True
        entry = {
            "epoch": epoch + 1,
            "train_loss": dict(zip(self.tasks, mean_losses)),
            "val": val,
            "score": score,
            "lr": lr,
        }
        self.history.append(entry)
        if improved:
            name = self._best_file(epoch + 1).name
            atomic_torch_save(self._weights_payload({"epoch": epoch + 1, "val": val}), self.out_dir / name)
            self.best = {"epoch": epoch + 1, "score": score, "file": name}
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        self._accum = self._fresh_accum()
        log = {
            "type": "epoch",
            "epoch": epoch + 1,
            "global_step": self.global_step,
            "lr": lr,
            "selection/criterion": self.selection_criterion(),
            "selection/score": score,
            "best_epoch": self.best["epoch"],
        }
        log.update({f"train/epoch_loss/{t}": v for t, v in entry["train_loss"].items()})
        log.update({f"val/loss/{t}": v for t, v in val["losses"].items()})
        for t, ms in val["metrics"].items():
            log.update({f"val/{t}/{m}": v for m, v in ms.items()})
        d = self.deltas(val["metrics"], "val")
        if d:
            log.update({f"val/{k}": v for k, v in d.items()})
        self._jsonl.write(log)
        self._tb.add(
            {k: v for k, v in log.items() if "/" in k and not k.startswith("selection/criterion")},
            self.global_step,
        )
        self.save_checkpoint()
        self._cleanup_best_files()
        display.end_epoch(log, val)
        for cb in self.callbacks:
            cb.on_epoch_end(self, log)

    # -- the end --------------------------------------------------------------------------------
    def _finalize(self, session_s: float) -> dict[str, Any]:
        out = self.out_dir
        if self.best is None:
            raise CheckpointError(f"run '{out}' finished no epoch; nothing to test")
        best_path = out / (self.best["file"] if not self._finished else BEST_NAME)
        weights = load_checkpoint(best_path, expect=WEIGHTS_FORMAT)
        self.model.load_state_dict(weights["model"])
        test = self.evaluate("test")
        best_entry = next(h for h in self.history if h["epoch"] == self.best["epoch"])
        if not self._finished:
            atomic_torch_save(
                self._weights_payload({"epoch": self.best["epoch"], "val": best_entry["val"], "test": test}),
                out / BEST_NAME,
            )
            self._finished = True
            self.best = {**self.best, "file": BEST_NAME}
            self.save_checkpoint()
            self._cleanup_best_files()
        results = self._results(best_entry, test, session_s)
        write_json(out / RESULTS_NAME, results)
        return results

    def _results(self, best_entry: dict[str, Any], test: dict[str, Any], session_s: float) -> dict[str, Any]:
        cfg = self.cfg
        val_metrics = best_entry["val"]["metrics"]
        diag = None
        if self._diag_last is not None:
            diag = {
                "final": {k: v for k, v in self._diag_last.items() if k != "global_step"},
                "final_step": self._diag_last["global_step"],
                "mean": self.monitor.summary() if self.monitor is not None else None,
                "every": cfg.monitor.every,
            }
        timed = max(self._timing["steps_timed"], 1)
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
            "metric_directions": self._directions(),
            "metric_units": {t: dict(self.spec.tasks[t].units) for t in self.tasks if self.spec.tasks[t].units},
            "best_epoch": self.best["epoch"],
            "selection": {"criterion": self.selection_criterion(), "score": self.best["score"]},
            "metrics": {"val": val_metrics, "test": test["metrics"]},
            "losses": {"val": best_entry["val"]["losses"], "test": test["losses"]},
            "baseline": baseline,
            "delta": (
                {"val": self.deltas(val_metrics, "val"), "test": self.deltas(test["metrics"], "test")}
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
                "mean_step_s": self._timing["train_s"] / timed,
                "this_session_s": session_s,
                # this session's training only (None when a finished run was re-tested): train/memory.py
                "peak_memory": self._peak_memory,
            },
            "device": str(self.device),
            "environment": environment(),
            "config": cfg.model_dump(mode="json"),
            "out_dir": str(self.out_dir),
        }


# ---------------------------------------------------------------------------------------------
class _Display:
    """Rich progress bar (epoch, step, losses, ETA) and one line per epoch; silent when quiet."""

    def __init__(self, trainer: Trainer, epochs: int, steps: int):
        self.t, self.epochs, self.steps = trainer, epochs, steps
        self.progress = None
        self.task_id = None
        if not trainer.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.fields[what]}[/] epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[losses]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=trainer._console(),
                transient=True,
            )

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
            what = self.t.label()
            total = self.epochs * self.steps
            self.task_id = self.progress.add_task(
                "train",
                total=total,
                completed=self.t.global_step,
                what=what,
                epoch=self.t.epoch + 1,
                epochs=self.epochs,
                losses="",
            )
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, start_step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, epoch=epoch + 1, completed=epoch * self.steps + start_step)

    def advance(self, record: StepRecord) -> None:
        if self.progress is not None:
            losses = " ".join(f"{t}={float(v):.4g}" for t, v in zip(record.task_names, record.losses))
            self.progress.update(self.task_id, advance=1, losses=losses)

    def end_epoch(self, log: dict[str, Any], val: dict[str, Any]) -> None:
        if self.progress is None:
            return
        parts = []
        for t, ms in val["metrics"].items():
            parts.append(f"{t}: " + ", ".join(f"{m}={v:.4g}" for m, v in ms.items()))
        crit, score = log["selection/criterion"], log["selection/score"]
        shown = f"val_loss={-score:.4g}" if crit == "val_loss" else f"{crit}={score:.4g}"
        what = self.t.label()
        self.progress.console.print(
            f"[dim]{what}[/] epoch {log['epoch']}/{self.epochs}  val {'; '.join(parts)}  {shown}  "
            f"best={log['best_epoch']}"
        )

"""Step 1 of the engine: per-task losses → :class:`TaskGradients` (no method involved).

The value holds what any method may need — the losses, the saliencies ``S_t = ∂L_t/∂Z``, the
per-task shared-parameter Jacobian (parameter level) or the stacked saliencies (feature level),
the head gradient rows and the Gramian on demand — plus what step 3 (:func:`apply_decision`)
needs to write gradients (the features whose graph it pushes through, the attached regulariser
penalty). Under data parallelism the values that decide the step are already reduced, so every
rank sees the same :class:`TaskGradients` numbers for the decision.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors  # the C++ flatten DDP's buckets use

from ..errors import ConfigurationError, NonFiniteError, ShapeError
from . import pool
from ._autograd import MapHooksHeld, raise_translated, vjp
from .distributed import Dist
from .gramian import (
    gramian_exact,
    gramian_from_blocks,
    gramian_from_matrix,
    gramian_from_rows,
    jacobian_workspace,
    matrix_blocks,
    stack_rows,
)
from .graph import _ACCUMULATE_GRAD, find_leaves
from .protocols import Regularizer
from .sharded import refuse_sharded
from .stacked import StackSplit, prune_stacked_losses, stack_split, stacked_vector

# ``torch.distributed.is_initialized`` where torch was built with it (a build constant): ``resolve(None)``'s
# first test, without its ``is_available`` (≈ 10 µs inside a training loop, where the code is cold)
_dist_initialized = torch.distributed.is_initialized if torch.distributed.is_available() else (lambda: False)

LOG_EPS = 1e-8
JACOBIAN_MODES = ("loop", "batched")
LOSS_TRANSFORMS = ("none", "log")
LEVELS = ("loss", "param", "feature")

_warned_zero: set[str] = set()


def transform_losses(losses: Tensor, transform: str | None) -> Tensor:
    """Apply a loss transform: ``"none"`` or ``"log"`` (``log(L_t + 1e-8)``, DB-MTL / Rep-MTL)."""
    if transform in (None, "none"):
        return losses
    if transform == "log":
        return torch.log(losses + LOG_EPS)
    raise ConfigurationError(f"unknown loss_transform {transform!r}; choose one of {LOSS_TRANSFORMS}")


# ---------------------------------------------------------------------------------------------
@dataclass
class Features:
    """The shared representation(s), normalised at the boundary.

    ``maps``: the tensors; ``owner[m]``: the task index that owns map ``m`` (multi-input: one
    input batch per task, ``features={task: Z_task}``) or ``None`` (a shared map every task may
    read: ``features=Z`` or ``features=[Z_low, Z_high]`` for several maps of one input)."""

    maps: list[Tensor]
    owner: list[int | None]

    @property
    def multi_input(self) -> bool:
        return bool(self.maps) and self.owner[0] is not None

    def of_task(self, t: int) -> list[Tensor]:
        """The maps task t's loss may reach."""
        if self.multi_input:
            return [self.maps[t]]
        return self.maps


def normalise_features(
    features: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None, names: Sequence[str], frozen: bool = False
) -> Features:
    """The step's feature maps, checked. ``frozen``: the encoder is frozen (``shared_params`` given, none requiring
    grad) and the step reads no features (a loss weighting without saliencies): maps that do not require grad are the
    frozen encoder's output, not a detached copy, and are left out (no features)."""
    if features is None:
        return Features([], [])
    maps: list[Tensor]
    owner: list[int | None]
    if isinstance(features, Tensor):
        maps, owner = [features], [None]
    elif isinstance(features, Mapping):
        keys = list(features.keys())
        if sorted(keys) != sorted(names):
            raise ConfigurationError(
                f"multi-input features must map every task to its own representation: got keys {keys} for "
                f"tasks {list(names)}"
            )
        maps = [features[n] for n in names]
        owner = list(range(len(names)))
    elif isinstance(features, Sequence):
        maps = list(features)
        owner = [None] * len(maps)
        if not maps:
            raise ConfigurationError("features is an empty sequence; pass None, a tensor or several maps")
        if len({id(z) for z in maps}) < len(maps):  # its saliency would be pushed through the encoder twice
            raise ConfigurationError(
                "features lists the same tensor more than once; pass each shared map once (features=[Z_1, Z_2, ...])"
            )
    else:
        raise ConfigurationError(
            f"features must be a tensor, a sequence of shared maps or a {{task: Z}} mapping, got "
            f"{type(features).__name__}"
        )
    if frozen and all(isinstance(z, Tensor) and not z.requires_grad for z in maps):
        return Features([], [])
    for z in maps:
        if not isinstance(z, Tensor) or not z.requires_grad:
            raise ConfigurationError(DETACHED_FEATURES)
    return Features(maps, owner)


DETACHED_FEATURES = (
    "features must be the encoder output the heads consumed, attached to the graph (requires_grad=True); do not pass "
    "a detached copy. A frozen encoder (every parameter requires_grad=False: a warm-up or linear-probe phase) gives "
    "features that are not attached: a loss weighting (EW, UW, DWA, ...) steps through it when shared_params lists its "
    "parameters; saliencies, saliency regularisers and gradient methods need an encoder that trains (while it is "
    "frozen, step with method=create('ew') without keep_saliencies, compute_gramian='feature' or regularizers)"
)


def no_shared_error(what: str) -> ConfigurationError:
    """The error for a gradient step without trainable shared parameters (none given, or an encoder frozen)."""
    return ConfigurationError(
        f"{what} needs shared_params (the encoder's trainable parameters): none was given, or every parameter in "
        "shared_params is frozen (requires_grad=False), so there is no shared gradient to decide on. While the "
        "encoder is frozen (a warm-up or linear-probe phase), step with a loss weighting (method=create('ew') writes "
        "the heads' gradients as loss.backward() does) and switch back once the encoder trains"
    )


def frozen_encoder(shared_params: Iterable[Tensor] | None) -> tuple[list[Tensor] | None, bool]:
    """``(shared_params as a list, whether it lists parameters none of which requires grad)``."""
    if shared_params is None:
        return None, False
    given = list(shared_params)
    return given, bool(given) and not any(p.requires_grad for p in given)


def normalise_losses(
    losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, task_names: Sequence[str] | None
) -> tuple[list[str], list[Tensor]]:
    if isinstance(losses, Mapping):
        names = list(losses.keys())
        values = list(losses.values())
        if task_names is not None and list(task_names) != names:
            raise ConfigurationError(f"task_names {list(task_names)} do not match the losses' keys {names}")
    elif isinstance(losses, Tensor):
        values = list(losses.reshape(-1).unbind(0))
        names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(values))]
    else:
        values = list(losses)
        names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(values))]
    if len(values) == 0:
        raise ConfigurationError("mtl_backward got no losses")
    if len(names) != len(values):
        raise ConfigurationError(f"{len(names)} task names for {len(values)} losses")
    out: list[Tensor] = []
    for n, v in zip(names, values):
        if not isinstance(v, Tensor) or v.numel() != 1:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ShapeError(f"loss of task '{n}' must be a scalar tensor, got {shape}; reduce it with .mean()")
        if not v.requires_grad:
            raise ConfigurationError(
                f"loss of task '{n}' does not require grad: it was computed without a graph "
                "(torch.no_grad?) or from detached tensors"
            )
        if v.dtype.is_complex:
            raise complex_loss_error(n, v)
        out.append(v if v.ndim == 0 else v.reshape(()))  # a 0-dim loss as it is: no view node in its graph
    return [n if isinstance(n, str) else str(n) for n in names], out


def complex_loss_error(name: str, loss: Tensor) -> ConfigurationError:
    """The one message for a complex task loss (``loss.backward()`` refuses one too; before, the lean loss step
    differentiated its real part silently and the other routes failed with ``TypeError: must be real number``)."""
    return ConfigurationError(
        f"loss of task '{name}' is complex ({loss.dtype}): a loss must be a real scalar (loss.backward() refuses it "
        "too: 'grad can be implicitly created only for real scalar outputs'); reduce it to a real number, e.g. "
        "with .abs() or .real"
    )


_FUSED_BELOW = 4096  # elements: smaller tensors are summed together after one concatenation


def _sum_for_check(t: Tensor) -> Tensor:
    if t.is_complex() and t.layout == torch.strided:  # both parts (a real sum of a complex tensor drops the imaginary)
        t = torch.view_as_real(t)
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _fused_check_usable() -> bool:
    """Whether this torch has the fused non-finite check on the CPU and it leaves the values and the version
    counter as they were (checked once, on a tensor of ours)."""
    try:
        probe = torch.tensor([1.0, -0.0, 5e-324, 3.0], dtype=torch.float64, device="cpu")
        before = probe.clone()
        found = torch.zeros(1, dtype=torch.float32, device="cpu")
        torch._amp_foreach_non_finite_check_and_unscale_([probe], found, _UNIT_SCALE)
        ok = found.item() == 0.0 and torch.equal(probe.view(torch.int64), before.view(torch.int64))
        probe[0] = float("nan")
        version = probe._version
        torch._amp_foreach_non_finite_check_and_unscale_([probe], found, _UNIT_SCALE)
        return ok and found.item() == 1.0 and probe._version == version
    except Exception:  # noqa: BLE001  (any failure: not usable, the sums below decide)
        return False


# the fused check's inv_scale and flag dtype (float32, on the CPU, whatever the user's default dtype and device):
# ×1 is skipped element by element, never written
_UNIT_SCALE = torch.ones(1, dtype=torch.float32, device="cpu")
_FUSED_CHECK = _fused_check_usable()


def _fused_finite(ts: list[Tensor]) -> bool | None:
    """The verdict of ``torch._amp_foreach_non_finite_check_and_unscale_`` (GradScaler's own check) with an
    inverse scale of 1 — one C++ pass over every tensor, exact (``isfinite`` element by element, no overflow), every
    finite value and infinity stored back unchanged bit for bit (the kernel returns the element itself when the
    scale is 1, even with ``torch.set_flush_denormal(True)``) and no version counter bumped — or ``None`` where it
    does not apply (off the CPU, complex, sparse, integer, an expanded tensor whose elements share memory): the sums
    decide there. A NaN may come back as another NaN (float16's signalling NaNs quieted; bfloat16's re-encoded,
    sign included, ``0x7fc0`` → ``0xffff`` on the vectorised path): only in a tensor the check refuses, which the
    engine drops (a refused step writes nothing). It stores into every tensor: only on tensors the engine owns
    (:func:`all_finite`'s ``owned``)."""
    if not _FUSED_CHECK or not ts[0].is_cpu:
        return None
    found = torch.zeros(1, dtype=torch.float32, device="cpu")
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(ts, found, _UNIT_SCALE)
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return found.item() == 0.0


def all_finite(tensors: Sequence[Tensor | None], owned: bool = False) -> bool:
    """Whether every element of every tensor is finite (``None`` entries are skipped). Exact.

    ``owned``: every tensor was made in this step by autograd or by the engine's own arithmetic (never a method's
    output, a user's tensor or a view of one). Only then, on the CPU, for dense real floating tensors (any mix of
    dtypes), one C++ pass: GradScaler's fused check (:func:`_fused_finite`; 36–42 µs instead of 70–75 µs for the
    16–17 gradients of the conv benchmark right after its backward, docs/performance.md, "The direct write and the fused
    check").
    That kernel stores every element back (the same bits): on memory mapped read-only (``np.load(mmap_mode="r")``,
    a read-only file mapping) the store is a segmentation fault, on a copy-on-write mapping (``torch.load(mmap=True)``)
    it copies every page, and a store racing another thread's write would undo it — so never on a tensor the
    engine does not own. Elsewhere, or where that kernel refuses the tensors:
    one read of the data and a handful of torch calls whatever the number of tensors: one sum per
    tensor of ≥ 4 096 elements, then one C++ concatenation of those sums with every smaller
    tensor (their per-call dispatch costs more than their data), one sum of that and one
    ``.item()`` (one concatenation per dtype when dtypes differ: a promoting concatenation is
    slow). A sum propagates NaN and ±inf (``inf − inf`` is NaN) and is the cheapest full read (an
    inf-norm is ~15x slower on CPU; ``torch.isfinite`` is four elementwise kernels). A sum of
    finite values can overflow; only then, on that rare path, an elementwise ``isfinite`` of each
    tensor decides, so the answer is exact (no false alarm). Sparse tensors are judged by their
    dense values (duplicates summed); mixed dtypes and devices are allowed."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return True
    if owned:
        verdict = _fused_finite(ts)
        if verdict is not None:
            return verdict
    dtype = ts[0].dtype
    if (dtype is torch.float32 or dtype is torch.float64) and all(t.dtype is dtype for t in ts):
        # the common case, one real floating dtype: the same sums in that dtype (as _sum_for_check does) without a
        # Python call per large tensor or a second pass over the dtypes (≈ 40 µs inside a training loop)
        parts = [t if t.numel() < _FUSED_BELOW else t.sum() for t in ts]
        try:  # several devices (or sparse tensors): summed one by one below
            if math.isfinite((parts[0] if len(parts) == 1 else _flatten_dense_tensors(parts)).sum().item()):
                return True
        except (RuntimeError, NotImplementedError):
            if all(math.isfinite(p.sum().item()) for p in parts):
                return True
        return _exactly_finite(ts)
    parts = [t if t.numel() < _FUSED_BELOW else _sum_for_check(t) for t in ts]  # large ones as their sums
    dtype = parts[0].dtype
    groups = [parts] if all(p.dtype is dtype for p in parts) else _by_dtype(parts)
    try:  # several devices (or sparse tensors): summed one by one below
        total = 0.0
        for g in groups:
            total += _sum_for_check(g[0] if len(g) == 1 else _flatten_dense_tensors(g)).item()
        if math.isfinite(total):
            return True
    except (RuntimeError, NotImplementedError):
        if all(math.isfinite(_sum_for_check(p).item()) for p in parts):
            return True
    return _exactly_finite(ts)


def _exactly_finite(ts: list[Tensor]) -> bool:
    """The exact verdict (all_finite's rare path); a sparse gradient is judged by its dense values (duplicates
    summed)."""
    return all(bool(torch.isfinite(t if t.layout == torch.strided else t.to_dense()).all()) for t in ts)


def _by_dtype(parts: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = {}
    for p in parts:
        groups.setdefault(p.dtype, []).append(p)
    return list(groups.values())


def host_finite(values: Tensor) -> bool:
    """Whether every element of a small tensor (task losses, task weights) is finite, judged on the
    host, element by element: one read of the values (``tolist``), no kernel. Exact."""
    return all(map(math.isfinite, values.tolist()))


def loss_problem(names: Sequence[str], raw: Tensor) -> str:
    """Why nothing was written when a task loss is not finite (the engine's one message for it)."""
    bad = ", ".join(f"'{n}'={v}" for n, v in zip(names, raw.tolist()) if not math.isfinite(v))
    return (f"non-finite task loss: {bad}. Nothing was written into .grad. Check the inputs/targets of that task, "
            "lower the learning rate, or pass nonfinite='skip' to skip such steps with a warning.")


def _grads(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Sequence[Tensor],
    grad_outputs: Tensor | Sequence[Tensor] | None = None,
    retain_graph: bool = True, create_graph: bool = False, batched: bool = False,
) -> tuple[Tensor | None, ...]:
    if not batched:  # the engine's one entry into autograd (engine/_autograd.py)
        return vjp(outputs, inputs, grad_outputs, retain_graph=retain_graph, create_graph=create_graph)
    try:
        return torch.autograd.grad(
            outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph or create_graph,
            create_graph=create_graph, allow_unused=True, is_grads_batched=True,
        )
    except RuntimeError as exc:
        raise_translated(exc)


_checked_encoders: weakref.WeakSet[Any] = weakref.WeakSet()


def warn_parameters_outside_shared(method: Any, features: Any, shared: Sequence[Tensor]) -> None:
    """Warn, once per method object, about trainable ``nn.Parameter`` s upstream of ``features`` that are not in
    ``shared_params``: at a gradient level with ``features`` the method is applied to ``shared_params`` only, so the
    step writes them no gradient (they do not train), or — where a head also reads the encoder around ``features``
    — the sum of the tasks' gradients, which is not the method's. A part of the encoder left out by mistake (a stem
    or an embedding outside ``model.encoder``) is then silent; one left out on purpose (trained by another loss)
    gets the warning once. The check walks the graph below ``features`` (≈ 0.25 µs a node) on the method's first
    step only; afterwards it costs one set lookup."""
    if method in _checked_encoders:
        return
    _checked_encoders.add(method)
    maps = list(features.values()) if isinstance(features, Mapping) else (
        [features] if isinstance(features, Tensor) else list(features))
    maps = [m for m in maps if isinstance(m, Tensor)]  # anything else is normalise_features' error, raised later
    ids = {id(p) for p in shared}
    left = [p for p in find_leaves(maps) if isinstance(p, torch.nn.Parameter) and p.requires_grad
            and id(p) not in ids]
    if left:
        shapes = ", ".join(str(tuple(p.shape)) for p in left[:4]) + (", ..." if len(left) > 4 else "")
        warnings.warn(
            f"mtlens: {len(left)} trainable parameter(s) upstream of features are not in shared_params (shapes "
            f"{shapes}): '{method.name}' is applied to shared_params only, so this step writes them no gradient "
            "(they do not train), or only the sum of the tasks' gradients where a head reads the encoder around "
            "features. Pass every encoder parameter in shared_params (e.g. model.encoder.parameters() including its "
            "stem and embeddings), or freeze the ones that must not train with requires_grad_(False). Warned once "
            "per method object.",
            RuntimeWarning, stacklevel=3,
        )


def trainable(params: Iterable[Tensor]) -> list[Tensor]:
    """The parameters that require a gradient, each once, in first-listed order: a parameter listed twice in
    ``shared_params`` (a sub-module's parameters added to its parent's) would get two columns in the Jacobian
    and its gradient written twice, where ``loss.backward()`` writes it once."""
    return list(dict.fromkeys(p for p in params if p.requires_grad))


def zeros_if_none(gs: Sequence[Tensor | None], like: Sequence[Tensor], missed: list[Tensor] | None = None
                  ) -> list[Tensor]:
    """``gs`` with zeros for ``None``; each parameter of ``like`` given zeros appended to ``missed`` (when given)."""
    if missed is None:
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, like)]
    return [g if g is not None else _missed(missed, p, torch.zeros_like(p)) for g, p in zip(gs, like)]


def _missed(missed: list[Tensor], p: Tensor, zeros: Tensor) -> Tensor:
    """Record that no gradient reached ``p`` (its row or block is ``zeros``): evaluated only for a ``None``."""
    missed.append(p)
    return zeros


def unreached_by_all(missed: Sequence[Sequence[Tensor]], shared: Sequence[Tensor]) -> list[int]:
    """Indices in ``shared`` of the parameters that every task's VJP returned ``None`` for (``missed[t]``: task t's):
    no loss reaches them, so ``loss.backward()`` leaves their ``.grad`` as it was (``None`` stays ``None``; AdamW
    would decay a parameter given a zero ``.grad``), where the Jacobian holds zeros. Costs nothing while every
    task reaches every parameter (one truth test per task)."""
    if not missed or not all(missed):
        return []
    common = set.intersection(*({id(p) for p in m} for m in missed))
    return [i for i, p in enumerate(shared) if id(p) in common] if common else []


# ---------------------------------------------------------------------------------------------
@dataclass
class TaskGradients:
    """Everything a method may decide from, for one step (or K accumulated micro-batches).

    Attributes (T tasks, in ``task_names`` order):
        task_names: the task names.
        losses: raw task losses (T,), detached (the mean over ranks / micro-batches).
        objective_losses: the losses the method sees (after the loss transform), detached.
        level: ``"param"``, ``"feature"`` or ``"loss"``.
        saliencies: ``S_t = ∂L_t/∂Z`` of the raw losses (T, *Z.shape), detached, when computed
            (one shared map, or multi-input with equal batch shapes).
        grad_norms: per-task gradient norms (T,) on the ``grad_norm_params`` (loss methods that
            declare ``needs_grad_norms``), else ``None``.
        head_rows: per task, per task-specific parameter, the gradient of the task's objective
            loss (``None`` where the task does not reach the parameter); unscaled, local to
            this rank (the engine averages what it writes).
        shared_params, task_params: the parameters gradients are written to.
        problem: why the step cannot proceed (a non-finite loss or gradient), else ``""``.
    """

    task_names: list[str]
    losses: Tensor
    objective_losses: Tensor
    level: str
    shared_params: list[Tensor] = field(default_factory=list)
    saliencies: Tensor | None = None
    grad_norms: Tensor | None = None
    head_rows: list[list[Tensor | None]] = field(default_factory=list)
    problem: str = ""
    overflow: bool = False
    gramian_level: str | None = None  # loss level: where compute_gramian measured
    regularizer_values: dict[str, float] = field(default_factory=dict)
    # -- internals (used by the decision helpers and by apply_decision) ---------------------
    _rows: list[list[Tensor]] | None = None  # param level: per task, per shared parameter
    _flat: Tensor | None = None  # param level: the Jacobian as one (T, P) matrix (the reused workspace)
    _blocks: list[Tensor] | None = None  # param level (T, *shape) / feature level per map
    _gramian: Tensor | None = None
    _features: Features | None = None
    _parts: list[dict[str, Any]] = field(default_factory=list)  # per micro-batch: graph handles
    _split: StackSplit | None = None  # a stacked loss vector's per-task branches (graph walks)
    _reg_total: Tensor | None = None
    _reg_kind: str = ""
    _attached: list[Tensor] | None = None  # loss level: attached objective losses (value = global)
    _dist: Dist | None = None
    _scale: float = 1.0
    _count: int = 1
    _transform: str = "none"
    _sal_graph: list[list[Tensor]] | None = None  # needs_saliency_graph: S_t per map, attached through the heads
    _task_params: list[Tensor] | None = None
    _attached_stack: Tensor | None = None  # loss level: torch.stack(_attached), when built with the raw losses
    _find_task_params: Callable[[], list[Tensor]] | None = None  # loss level: the graph walk, run when first read
    _head_index: list[list[int]] | None = None  # per task: the head parameters it reaches (heads pass), else None
    _objective_from_rows: bool = False  # loss level: step 3 writes Σ_t w_t g_t from the rows (no objective backward)
    _unreached: list[int] = field(default_factory=list)  # rows: shared parameters no loss reaches (.grad kept)
    # id of a shared parameter with sparse gradients: the indices each of its per-task sparse gradients touched
    _sparse: dict[int, list[Tensor]] = field(default_factory=dict)
    _heads_given: bool = False  # task_params passed by the caller (else found from the graph: may differ by rank)

    @property
    def T(self) -> int:
        return len(self.task_names)

    @property
    def task_params(self) -> list[Tensor]:
        """The task-specific parameters (the heads). At loss level they are found from the graph
        only when first read: one backward of the weighted sum needs no list of them."""
        if self._task_params is None:
            find, self._find_task_params = self._find_task_params, None
            self._task_params = find() if find is not None else []
        return self._task_params

    @task_params.setter
    def task_params(self, value: list[Tensor]) -> None:
        self._task_params, self._find_task_params = list(value), None

    @property
    def ok(self) -> bool:
        return not self.problem

    # -- what methods read ---------------------------------------------------------------------
    def gramian(self) -> Tensor:
        """``G = J Jᵀ`` (T×T, float64) of the objective losses at ``level`` (computed once)."""
        if self._gramian is None:
            if self._flat is not None:
                self._gramian = gramian_from_matrix(self._flat)
            elif self._rows is not None:
                self._gramian = gramian_from_rows(self._rows)
            elif self._blocks is not None:
                self._gramian = gramian_from_blocks(self._blocks)
            else:
                raise ConfigurationError(
                    "no per-task gradients were computed for this step (loss level without compute_gramian)"
                )
        return self._gramian

    def jacobian_blocks(self) -> list[Tensor]:
        """The Jacobian as blocks with a leading task dimension: one per shared parameter at
        parameter level, one per shared map (T, *Z.shape) at feature level."""
        if self._blocks is None and self._flat is not None:
            self._blocks = matrix_blocks(self._flat, self.shared_params)
        if self._blocks is None:
            if self._rows is None:
                raise ConfigurationError("no per-task gradients were computed for this step")
            self._blocks = stack_rows(self._rows, self.shared_params)
            self._rows = None
        return self._blocks

    def method_features(self) -> Tensor | None:
        """The (single) shared representation ``Z``, detached, for methods declaring ``needs_features``."""
        if self._features is None or not self._features.maps:
            return None
        if len(self._parts) > 1 or len(self._features.maps) != 1:
            raise ConfigurationError(
                "this method needs the activations Z of one shared map and one batch; it cannot be used with "
                "several maps, gradient accumulation or data parallelism"
            )
        return self._features.maps[0].detach()

    def attached_saliencies(self) -> list[list[Tensor]]:
        """Per task, per map of ``features``, the saliency ``S_t = ∂obj_t/∂Z`` of the objective loss, attached to
        the graph through the heads (the engine computed it with ``create_graph=True``), unscaled, local to
        this rank (the saliency of this rank's mean loss). Multi-input: each task's own map only.

        Only for methods declaring ``needs_saliency_graph`` (ConsMTL), which differentiate a function of
        the saliencies w.r.t. the task-specific parameters. Raises :class:`ConfigurationError` when the
        step has no saliencies (no ``features``, or several maps computed from one another)."""
        if self._sal_graph is None:
            raise ConfigurationError(
                "this method differentiates the saliencies S_t = dL_t/dZ through the heads: pass features=Z (the "
                "representation the heads read; {task: Z_task} for multi-input), and declare needs_saliency_graph"
            )
        return self._sal_graph

    @property
    def loss_transform(self) -> str:
        """The loss transform the objective losses went through (``"none"`` or ``"log"``)."""
        return self._transform

    @property
    def multi_input(self) -> bool:
        """Whether ``features`` gave one representation per task (``{task: Z_task}``)."""
        return self._features is not None and self._features.multi_input

    @property
    def world(self) -> int:
        """The number of data-parallel ranks (1 without a process group)."""
        return 1 if self._dist is None else int(self._dist.world)

    def reduce_mean(self, tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The mean over ranks of per-rank tensors (unchanged without a process group): what a method that
        computes gradients itself (``adds_gradients``) uses to make them the global batch's."""
        if self._dist is None:
            return list(tensors)
        return list(self._dist.mean_list(list(tensors)))

    def attached_losses(self) -> Tensor:
        """Loss level: the objective losses attached to the graph (T,), valued at the global mean."""
        if self._attached is None:
            raise ConfigurationError("attached losses exist only at loss level")
        if self._attached_stack is not None:
            return self._attached_stack
        return torch.stack(self._attached)

    # -- accumulation --------------------------------------------------------------------------
    @staticmethod
    def accumulate(steps: Sequence[TaskGradients]) -> TaskGradients:
        """Combine K micro-batches of equal size into the gradients of their concatenated batch.

        Parameter level: per-task gradients and head rows are averaged (the loss of the
        concatenated batch is the mean of the micro-batch means); the micro-batch graphs were
        already freed. Feature level: the Gramians are summed with weight 1/K² (saliencies of
        different samples are orthogonal coordinates of the concatenated representation) and
        each micro-batch's encoder graph is kept until :func:`apply_decision` pushes the
        combined saliency through it (memory: K encoder graphs, as one K-times larger batch).
        Loss level: losses are averaged and every micro-batch graph is kept until the single
        backward of the objective.
        """
        steps = list(steps)
        if not steps:
            raise ConfigurationError("accumulate() needs at least one TaskGradients")
        first = steps[0]
        K = len(steps)
        for s in steps:
            if s.task_names != first.task_names or s.level != first.level:
                raise ConfigurationError("accumulated micro-batches must have the same tasks and level")
            if s._dist is not first._dist:
                raise ConfigurationError("accumulated micro-batches must use the same process group")
        bad = next((s for s in steps if not s.ok), None)
        raw = torch.stack([s.losses for s in steps])  # (K, T)
        mean = raw.mean(0)
        transform = first._transform
        out = TaskGradients(
            task_names=list(first.task_names), losses=mean, objective_losses=transform_losses(mean, transform),
            level=first.level, shared_params=first.shared_params, _task_params=first.task_params,
            _features=first._features, _dist=first._dist, _scale=first._scale, _count=K, _transform=transform,
            _heads_given=all(s._heads_given for s in steps),
        )
        if bad is not None:
            out.problem, out.overflow = bad.problem, bad.overflow
            return out
        # A loss transform is not linear: micro-batch k's gradients are ∇ log L_k = ∇L_k / (L_k + ε);
        # those of the concatenated batch are ∇ log L̄ = mean_k ∇L_k / (L̄ + ε). Rescale row t of
        # micro-batch k by c[k, t] = (L_k,t + ε) / (L̄_t + ε) before averaging (exact).
        if transform == "log":
            c = ((raw + LOG_EPS) / (mean + LOG_EPS)).to(torch.float64)
        else:
            c = torch.ones_like(raw, dtype=torch.float64)
        scaled = not bool((c == 1).all())
        out._parts = [p for s in steps for p in s._parts]
        rows_k = [s.head_rows for s in steps]
        if scaled:
            rows_k = [[[None if g is None else g * float(c[k, t]) for g in row] for t, row in enumerate(r)]
                      for k, r in enumerate(rows_k)]
        out.head_rows = _mean_rows(rows_k)
        for s in steps:
            for key, v in s.regularizer_values.items():
                out.regularizer_values[key] = out.regularizer_values.get(key, 0.0) + v / K
        regs = [s._reg_total for s in steps if s._reg_total is not None]
        if regs:
            out._reg_total = _sum(regs) / K
            out._reg_kind = first._reg_kind
        if first.level == "param":
            blocks = [s.jacobian_blocks() for s in steps]
            if scaled:
                blocks = [[b * c[k].to(b.dtype).reshape(-1, *([1] * (b.ndim - 1))) for b in bl]
                          for k, bl in enumerate(blocks)]
            out._blocks = [_sum(bs) / K for bs in zip(*blocks)]
            out._unreached = sorted(set.intersection(*(set(s._unreached) for s in steps)))
            for s in steps:  # the union of the rows every micro-batch touched
                for pid, idx in s._sparse.items():
                    out._sparse.setdefault(pid, []).extend(idx)
        elif first.level == "feature":
            G = _sum(s.gramian() * torch.outer(c[k], c[k]).to(s.gramian().device) for k, s in enumerate(steps))
            if scaled:
                for k, s in enumerate(steps):
                    for p in s._parts:
                        p["saliencies"] = [[z * float(c[k, t]) for z in row] for t, row in enumerate(p["saliencies"])]
            out._gramian = G / (K * K)
        else:
            if first._attached is not None:
                # value = the mean over micro-batches, gradient = each micro-batch's own graph;
                # the transform is applied to the mean raw loss (exact for log too)
                out._attached = [transform_losses(_sum(p["loss_list"][t] for p in out._parts) / K, transform)
                                 for t in range(out.T)]
            if first.grad_norms is not None:
                out.grad_norms = None
                raise ConfigurationError(
                    "gradient accumulation with a method that needs gradient norms (GradNorm) is not supported: "
                    "the norm of the accumulated gradient is not the mean of the micro-batch norms"
                )
            if any(s._gramian is not None for s in steps):
                out._gramian = None
        graphs = [s._sal_graph for s in steps if s._sal_graph is not None]
        if len(graphs) == K:
            # the concatenated batch's saliencies, still attached: micro-batch k's samples carry S_k / K
            # (its mean loss is 1/K of the concatenated one). Under a log transform also × c[k, t], as an
            # attached factor (L_k,t + ε) / (L̄_t + ε): the saliency's own derivative then is exact too.
            if transform == "log":
                Lk = [[s._parts[0]["loss_list"][t] for t in range(out.T)] for s in steps]
                Lbar = [sum(Lk[k][t] for k in range(K)) / K for t in range(out.T)]
                ca = [[(Lk[k][t] + LOG_EPS) / (Lbar[t] + LOG_EPS) for t in range(out.T)] for k in range(K)]
            else:
                ca = [[1.0] * out.T for _ in range(K)]
            out._sal_graph = [[torch.cat([sg[t][m] * ca[k][t] / K for k, sg in enumerate(graphs)])
                               for m in range(len(graphs[0][t]))] for t in range(out.T)]
        sal_k = [s.saliencies for s in steps if s.saliencies is not None]
        if first.saliencies is not None and len(sal_k) == K:
            out.saliencies = torch.cat(sal_k, dim=1) / K
        return out


def _sum(tensors: Iterable[Tensor]) -> Tensor:
    """``t_1 + t_2 + ...`` of at least one tensor (the builtin ``sum`` starts from the int 0)."""
    it = iter(tensors)
    total = next(it)
    for t in it:
        total = total + t
    return total


def _mean_rows(all_rows: list[list[list[Tensor | None]]]) -> list[list[Tensor | None]]:
    K = len(all_rows)
    if K == 1:
        return all_rows[0]
    out: list[list[Tensor | None]] = []
    for t in range(len(all_rows[0])):
        row: list[Tensor | None] = []
        for j in range(len(all_rows[0][t])):
            gs = [g for r in all_rows if (g := r[t][j]) is not None]
            row.append(None if not gs else _sum(gs) / K)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
def _find_heads(loss_list: Sequence[Tensor], feats: Features, shared: Sequence[Tensor],
                task_params: Iterable[Tensor] | None, method_params: Iterable[Tensor]) -> list[Tensor]:
    shared_ids = {id(p) for p in shared}
    if task_params is not None:
        heads = [p for p in task_params if p.requires_grad and id(p) not in shared_ids]
    elif feats.maps:
        heads = find_leaves(loss_list, stop_at=feats.maps)
        leaked = [p for p in heads if id(p) in shared_ids]
        if leaked:
            raise _leak_error(leaked, feats.maps)
    else:
        heads = [p for p in find_leaves(loss_list) if id(p) not in shared_ids]
    mp_ids = {id(p) for p in method_params}
    return [p for p in heads if id(p) not in mp_ids]


def _node_sets(loss_list: Sequence[Tensor], stop_at: Sequence[Tensor], split: StackSplit | None = None
               ) -> list[set[Any]]:
    """The autograd nodes each loss reaches before ``stop_at`` (to free each part of the graph on
    its last use, and to find each task's own heads).

    ``split`` (a stacked loss vector, :func:`mtlens.engine.stacked.stack_split`): reaching the unbind
    through its output ``k`` counts the shared unbind/stack nodes and continues on the stack's input
    ``k`` only — the branch autograd actually runs once the stack's zero gradients are pruned."""
    stop = {t.grad_fn for t in stop_at if t.grad_fn is not None}
    out = []
    for L in loss_list:
        seen: set = set()
        stack: list[tuple[Any, int]] = [(L.grad_fn, L.output_nr)]
        while stack:
            n, nr = stack.pop()
            if split is not None and n is split.unbind:
                seen.update(split.shared)
                stack.append(split.branches[nr])
                continue
            if n is None or n in seen or n in stop:
                continue
            seen.add(n)
            for nxt, k in n.next_functions:
                if nxt is not None and (nxt not in seen or (split is not None and nxt is split.unbind)):
                    stack.append((nxt, k))
        out.append(seen)
    return out


def _walk_heads(loss_list: Sequence[Tensor], maps: Sequence[Tensor], shared: Sequence[Tensor],
                method_params: Sequence[Tensor], starts: Sequence[Any] | None = None
                ) -> tuple[list[Tensor], list[set[Any]], list[list[int]]]:
    """:func:`_find_heads` (heads found from the graph: ``task_params`` not given, shared ``maps``) and
    :func:`_node_sets` ``(loss_list, maps)`` with the heads pass's index of each task's own heads, in ONE walk
    of each loss's graph up to the maps (they walked it twice, and the index scanned the node sets a third time).

    Returns ``(heads, sets, own)``: the heads in :func:`~mtlens.engine.graph.find_leaves`' order (one depth-first
    walk per loss, in loss order, children in the order of ``next_functions``: a leaf is first reached at the
    same point as in its single walk, since every node an earlier loss reached was explored by it whole), the
    autograd nodes each loss reaches before the maps, and per task the sorted indices of the heads it reaches.
    ``starts``: per task, the node its walk starts at instead of its loss's ``grad_fn`` — the stack's input t of
    a stacked loss vector (:meth:`~mtlens.engine.stacked.StackSplit.entry_points`): the sets are then each task's
    own branch, without the shared unbind/stack nodes (those :func:`_node_sets` adds and :func:`_heads_flags`
    takes away again).
    Raises what :func:`_find_heads` raises (a shared parameter reaching a loss around the maps)."""
    stop = {z.grad_fn for z in maps if z.grad_fn is not None}
    skip = {id(z) for z in maps if z.grad_fn is None}  # leaf maps are not heads
    shared_ids = {id(p) for p in shared}
    mp_ids = {id(p) for p in method_params}
    acc = _ACCUMULATE_GRAD
    heads: list[Tensor] = []
    index: dict[int, int] = {}
    leaked: list[Tensor] = []
    sets: list[set[Any]] = []
    own: list[list[int]] = []
    for t, L in enumerate(loss_list):
        seen: set[Any] = set()
        mine: set[int] = set()
        first = L.grad_fn if starts is None else starts[t]
        stack = [first] if first is not None else []
        pop, push, mark = stack.pop, stack.append, seen.add
        while stack:
            node = pop()
            if node in seen or node in stop:
                continue
            mark(node)
            if type(node) is acc:
                var = node.variable  # type: ignore[attr-defined]
                if var is None:
                    continue
                key = id(var)
                i = index.get(key)
                if i is None and key not in skip:
                    skip.add(key)  # judged once: a head, a shared parameter (leaked) or a method's parameter
                    if key in shared_ids:
                        leaked.append(var)
                    elif key not in mp_ids:
                        i = index[key] = len(heads)
                        heads.append(var)
                if i is not None:
                    mine.add(i)
                continue
            nxt = node.next_functions
            if len(nxt) == 1:
                n = nxt[0][0]
                if n is not None:
                    push(n)
            else:
                stack.extend([n for n, _ in reversed(nxt) if n is not None])
        sets.append(seen)
        own.append(sorted(mine))
    if leaked:
        raise _leak_error(leaked, maps)
    return heads, sets, own


def _leak_error(leaked: Sequence[Tensor], maps: Sequence[Tensor]) -> ConfigurationError:
    """The one message for shared parameters that a loss reads around ``features`` (a tied output layer; or head
    parameters listed in ``shared_params``: ``shared_params=model.parameters()``, told apart by the encoder's graph
    not reading them at all)."""
    upstream = {id(p) for p in find_leaves([z for z in maps if z.grad_fn is not None])}
    heads = [p for p in leaked if id(p) not in upstream]
    listed = (
        f" {len(heads)} of them (shapes {[tuple(p.shape) for p in heads]}) are not read by the encoder at all: "
        "head parameters listed in shared_params; pass the encoder's parameters only "
        "(shared_params=model.encoder.parameters(), not model.parameters())."
        if heads else ""
    )
    return ConfigurationError(
        f"{len(leaked)} shared parameter(s) reach the losses without passing through features: features must be "
        f"the only route from the encoder to the losses (shapes {[tuple(p.shape) for p in leaked]}).{listed} A head "
        "that reads an encoder parameter itself (a tied output layer, logits = Z @ E.T), or a loss on an activation "
        "of the encoder before Z (deep supervision: an auxiliary head on an intermediate layer), makes that "
        "parameter's gradient impossible to split at Z: untie it (or read the auxiliary head from Z), or step "
        "without that split (a loss weighting at level='loss' "
        "without keep_saliencies or saliency regularisers, or a gradient method at level='param' without "
        "features=: per-task backwards through the whole graph)"
    )


def maps_dependent(maps: Sequence[Tensor]) -> bool:
    """Whether one of several shared maps is computed from another (``z_high = f(z_low)``)."""
    if len(maps) < 2:
        return False
    nodes = {z.grad_fn: i for i, z in enumerate(maps) if z.grad_fn is not None}
    for i, z in enumerate(maps):
        seen: set = set()
        stack = [n for n, _ in z.grad_fn.next_functions] if z.grad_fn is not None else []
        while stack:
            n = stack.pop()
            if n is None or n in seen:
                continue
            if n in nodes and nodes[n] != i:
                return True
            seen.add(n)
            stack.extend(m for m, _ in n.next_functions if m is not None and m not in seen)
    return False


def maps_share_graph(maps: Sequence[Tensor]) -> bool:
    """Whether the graphs of several per-task maps share a node other than a leaf's (multi-input features sliced
    from one encoder pass, ``{task: Z[idx_t]}``): a backward through one map then frees what another still needs.
    Shared parameters (their ``AccumulateGrad`` nodes hold no buffers) do not count. One walk of every map's graph."""
    seen: set[Any] = set()
    acc = _ACCUMULATE_GRAD
    for z in maps:
        own: set[Any] = set()
        stack = [z.grad_fn] if z.grad_fn is not None else []
        while stack:
            node = stack.pop()
            if node in own:
                continue
            if node in seen:
                if type(node) is not acc:
                    return True
                continue
            own.add(node)
            if type(node) is acc:
                continue
            nxt = node.next_functions
            if len(nxt) == 1:
                if nxt[0][0] is not None:
                    stack.append(nxt[0][0])
            else:
                stack.extend([n for n, _ in nxt if n is not None])
        seen |= own
    return False


def _free_exclusive(L: Tensor, sets: list[set], t: int, heads: Sequence[Tensor]) -> None:
    """Free the part of task t's graph no later task uses (its head), as ``loss.backward()`` would.

    Without ``features`` one backward per task must keep the shared encoder's graph for the next
    task, so the head part of every task but the last would stay alive as long as the caller
    holds the losses. A second, head-only backward (to the parameters reached from ``L`` without
    crossing a node a later task uses) frees it; its cost is one more head backward per task —
    pass ``features=Z`` to avoid it."""
    later: set = set().union(*sets[t + 1:]) if t + 1 < len(sets) else set()
    head_ids = {id(p) for p in heads}
    reached: list[Tensor] = []
    seen: set = set()
    stack = [L.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or n in seen or n in later:
            continue
        seen.add(n)
        var = getattr(n, "variable", None)
        if var is not None:
            if id(var) in head_ids:
                reached.append(var)
            continue
        stack.extend(m for m, _ in n.next_functions if m is not None)
    if reached:
        vjp(L, reached)


def check_only_route(names: Sequence[str], maps: Sequence[Tensor], sets: Sequence[set[Any]],
                     losses: Sequence[Tensor] | None = None) -> None:
    """Raise :class:`ConfigurationError` when a task's part of the graph (``sets[t]``: the nodes its loss reaches
    before the maps) reads an output of a map's autograd node that is not itself a map — the other half of
    ``z, z2 = h.chunk(2)``, an LSTM's hidden state next to its output. That is a route from the encoder to the
    losses around ``features``: its gradient would be dropped from every per-task gradient (the walks stop at the
    map's node; the encoder is differentiated from the maps only). Only a node with several outputs is scanned
    (``_input_metadata``: one entry per forward output; where torch lacks it, every such node). A loss that is
    itself another output of that node (``losses[t]``; its walk stops at once) is such a route too: a model
    ``torch.compile``'d as a whole returns ``Z`` and the losses (or the heads' outputs) from one compiled node."""
    for node, nrs in _maps_by_node(maps).items():
        if not _other_outputs(node, nrs):
            continue
        bad: list[str] = []
        other: set[int] = set()
        for t, (name, st) in enumerate(zip(names, sets)):
            read = {k for n in st for m, k in n.next_functions if m is node and k not in nrs}
            if losses is not None and losses[t].grad_fn is node and losses[t].output_nr not in nrs:
                read.add(losses[t].output_nr)
            if read:
                bad.append(name)
                other |= read
        if bad:
            compiled = "CompiledFunction" in node.name()
            raise ConfigurationError(
                f"the loss of task(s) {bad} reads output(s) {sorted(other)} of the node that made features "
                f"({node.name()}; features: output(s) {sorted(nrs)}): a route from the encoder to the losses around "
                "features, whose gradient would be dropped. features must be the only route from the encoder to the "
                + ("losses. That node is one torch.compile'd graph that computed features and what the heads read "
                   "(the whole model compiled): compile the encoder alone, model.encoder = "
                   "torch.compile(model.encoder), and the heads apart if you like, so that features is the output "
                   "of the encoder's own graph (docs/engine.md, 'torch.compile'); or step without features "
                   "(a loss weighting at level='loss', a gradient method at level='param' without features=)"
                   if compiled else
                   "losses: pass every output the heads read as a shared map, features=[z, z_other]")
            )


def _maps_by_node(maps: Sequence[Tensor]) -> dict[Any, set[int]]:
    """Each map's autograd node with the output numbers of the maps it made."""
    by_node: dict[Any, set[int]] = {}
    for z in maps:
        if z.grad_fn is not None:
            by_node.setdefault(z.grad_fn, set()).add(z.output_nr)
    return by_node


def _other_outputs(node: Any, nrs: set[int]) -> bool:
    """Whether ``node`` has outputs besides the maps' ``nrs`` (``_input_metadata``: one entry per forward output;
    a node without it counts)."""
    meta = getattr(node, "_input_metadata", None)
    return meta is None or len(meta) > len(nrs)


def _multi_output_maps(maps: Sequence[Tensor]) -> bool:
    """Whether a map's autograd node has outputs that are not maps (where :func:`check_only_route` can find a
    route around the maps)."""
    return any(_other_outputs(node, nrs) for node, nrs in _maps_by_node(maps).items())


def _retain_flags(node_sets: list[set]) -> list[bool]:
    """retain[t]: whether a later task's backward still needs a node of task t's graph. A leaf's AccumulateGrad
    node (a parameter two tasks reach: one head module applied to every task) never counts: it holds nothing to
    free, and a backward that asks for the parameter's gradient does not run it — counting it kept every task's
    head graph but the last alive for as long as the caller held the losses."""
    later: set = set()
    flags = [True] * len(node_sets)
    acc = _ACCUMULATE_GRAD
    for t in range(len(node_sets) - 1, -1, -1):
        common = node_sets[t] & later
        flags[t] = bool(common) and any(type(n) is not acc for n in common)
        later |= node_sets[t]
    return flags


def compute_task_gradients(
    losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
    *,
    level: str,
    features: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    task_params: Iterable[Tensor] | None = None,
    task_names: Sequence[str] | None = None,
    loss_transform: str | None = None,
    jacobian: str = "loop",
    regularizers: Sequence[Regularizer] = (),
    keep_saliencies: bool = False,
    compute_gramian: str | None = None,
    grad_norm_params: Sequence[Tensor] | None = None,
    method_params: Sequence[Tensor] = (),
    scale: float = 1.0,
    dist: Dist | None = None,
    retain_graph: bool = False,
    saliency_graph: bool = False,
    weighted_sum: bool = False,
) -> TaskGradients:
    """Step 1: per-task gradients of ``losses`` at ``level``, with no method involved.

    Args:
        losses: per-task scalar losses (``{task: loss}`` preferred, or a sequence / vector).
        level: ``"param"`` (per-task shared-parameter gradients), ``"feature"`` (saliencies) or
            ``"loss"`` (no per-task gradients unless asked for below).
        features: ``Z`` (one shared map), a sequence of shared maps of one input (every task may
            read every map), or ``{task: Z_task}`` for multi-input benchmarks (one input batch per
            task; a task's loss reaching another task's map raises).
        shared_params: the encoder's parameters.
        task_params: the heads; found from the graph between the losses and ``features`` when omitted.
        loss_transform: ``"none"`` or ``"log"``, applied to the losses the method sees.
        jacobian: ``"loop"`` or ``"batched"`` (one vmapped VJP, single shared map only).
        regularizers: penalties on per-task gradients; their attached total is kept for step 3.
        keep_saliencies: loss level: also compute the saliencies (T head backwards).
        compute_gramian: loss level: ``"param"`` or ``"feature"`` to also compute per-task
            gradients and the Gramian there (diagnostics), else ``None``.
        grad_norm_params: loss level: measure per-task gradient norms there (GradNorm).
        method_params: a method's own learnable tensors (UW's s); never treated as heads.
        scale: the GradScaler's scale the losses are multiplied by for the backward passes.
        dist: the process group to reduce over (:func:`mtlens.engine.distributed.resolve`).
        retain_graph: keep the graph after the last backward of the step (default: free it as
            ``loss.backward()`` does; the feature- and loss-level graphs step 3 still needs are
            freed by it).
        saliency_graph: gradient levels: keep the graph of the saliencies through the heads
            (``create_graph=True`` in the heads' backward) for :meth:`TaskGradients.attached_saliencies`
            (methods declaring ``needs_saliency_graph``; needs ``features``).
        weighted_sum: loss level with ``compute_gramian="param"``: the caller promises that the method's
            objective will be ``Σ_t w_t L_t`` of the objective losses with ``w`` its decision's ``weights``
            (:func:`mtlens.engine.protocols.objective_is_weighted_sum`). The per-task Jacobian is then computed
            with the heads' gradients, and :func:`~mtlens.engine.apply.apply_decision` writes ``Σ_t w_t g_t``
            from it instead of differentiating the objective again (one full backward fewer); the graph is freed
            as by ``loss.backward()``. Applies with ``features``, one process, no scaler, no regulariser, no
            leaf outside the shared parameters and heads and no sparse gradient (``nn.Embedding(sparse=True)``);
            otherwise ignored (the objective's backward runs). A shared parameter no loss reaches keeps its
            ``.grad`` (``None`` stays ``None``), as with the objective's backward.

    Returns:
        a :class:`TaskGradients`; ``problem`` is set (and nothing else computed) when a loss or a
        per-task gradient is not finite.
    """
    if level not in LEVELS:
        raise ConfigurationError(f"level={level!r}; choose one of {LEVELS}")
    if jacobian not in ("loop", "batched"):
        raise ConfigurationError(f"jacobian={jacobian!r}; choose one of {JACOBIAN_MODES}")
    names, loss_list = normalise_losses(losses, task_names)
    T = len(loss_list)
    split: StackSplit | None = None
    prune = isinstance(losses, Tensor) and T > 1 and (
        level != "loss" or keep_saliencies or compute_gramian or regularizers or grad_norm_params is not None
    )
    hook_stack = False  # the hook itself is placed around the per-task backwards, below
    if prune:  # (its warning, once, for a vector that is no stack)
        hook_stack = stacked_vector(cast(Tensor, losses))
        split = stack_split(cast(Tensor, losses), loss_list) if hook_stack else None
    listed, frozen = frozen_encoder(shared_params)
    if _dist_initialized():  # sharded parameters (FSDP) need a process group: refused, never a silent step
        refuse_sharded(listed)
    sal_regs = [r for r in regularizers if r.uses == "saliency"]
    reads_features = level != "loss" or bool(sal_regs) or keep_saliencies or compute_gramian == "feature"
    feats = normalise_features(features, names, frozen=frozen and not reads_features)
    if feats.multi_input and len(feats.maps) != T:
        raise ShapeError(f"multi-input features: got {len(feats.maps)} maps for {T} tasks")
    shared = trainable(listed) if listed is not None else []
    param_regs = [r for r in regularizers if r.uses == "param"]
    for r in regularizers:
        if r.uses not in ("saliency", "param"):
            raise ConfigurationError(f"regulariser '{r.name}' uses {r.uses!r}; expected 'saliency' or 'param'")
    if (level == "feature" or sal_regs or keep_saliencies or compute_gramian == "feature") and not feats.maps:
        what = ("level='feature'" if level == "feature" else
                f"regulariser '{sal_regs[0].name}'" if sal_regs else
                "keep_saliencies=True" if keep_saliencies else "compute_gramian='feature'")
        raise ConfigurationError(f"{what} needs features=Z (the shared representation the heads consumed)")
    if level in ("param", "feature") and not shared:
        raise no_shared_error("per-task gradients")
    if (param_regs or compute_gramian == "param") and not shared:
        raise ConfigurationError("parameter-level per-task gradients need shared_params")

    stacked: Tensor | None = None  # loss level: the attached losses as one vector, built once
    if level == "loss" and dist is None and loss_transform in (None, "none") and scale == 1.0:
        stacked = torch.stack(loss_list)
        raw = stacked.detach()
    else:
        raw = torch.stack([v.detach() for v in loss_list])
    if dist is not None:
        dist.check_same_tasks(names)  # before the losses' all-reduce, whose length is the number of tasks
        raw = dist.mean_(raw.clone())
    transform = loss_transform or "none"
    if transform not in LOSS_TRANSFORMS:
        raise ConfigurationError(f"unknown loss_transform {transform!r}; choose one of {LOSS_TRANSFORMS}")
    tg = TaskGradients(task_names=names, losses=raw, objective_losses=raw, level=level, shared_params=shared,
                       _features=feats, _dist=dist, _scale=scale, _transform=transform, _split=split,
                       _heads_given=task_params is not None)
    if not host_finite(raw):
        tg.problem = loss_problem(names, raw)
        return tg
    if transform == "log" and bool((raw < 0).any()):
        raise ConfigurationError(
            "loss_transform='log' needs non-negative losses; got "
            + ", ".join(f"'{n}'={float(v)}" for n, v in zip(names, raw) if v < 0)
        )
    heads: list[Tensor] | None = None
    if level == "loss" and not (regularizers or keep_saliencies or compute_gramian):
        # one backward of the weighted sum needs no list of the heads: walk the graph only if one is asked for
        given, losses_now = task_params, loss_list
        tg._find_task_params = lambda: _find_heads(losses_now, feats, shared, given, method_params)
    else:
        heads = _find_heads(loss_list, feats, shared, task_params, method_params)
    if dist is not None:
        # Valued at the global mean, differentiated through this rank's graph: the mean over ranks
        # of any gradient computed from these is the global one, through a loss transform too
        # (∇ log L̄ = ∇L̄ / (L̄ + ε), not the mean of the ranks' ∇ log L_r).
        loss_list = [L - L.detach() + raw[t] for t, L in enumerate(loss_list)]
    # Per-task objective losses stay separate tensors: differentiating one entry of a stacked
    # vector would run every task's head backward (with zeros) for each task.
    obj_items = loss_list if transform == "none" else [transform_losses(L, transform) for L in loss_list]
    obj = raw if transform == "none" else torch.stack([o.detach() for o in obj_items])
    tg.objective_losses = obj
    obj_scaled = [o * scale for o in obj_items] if scale != 1.0 else obj_items
    if heads is not None:
        tg.task_params = heads
    tg._parts = [{"features": feats, "loss_list": loss_list}]
    tg._attached_stack = stacked

    hooks: list[Any] = []  # the stack node's hook: this step's per-task backwards only, then removed (the user's
    # graph is left as it was: a later backward() through a retained graph writes zeros into a zero-weight branch)
    if hook_stack:
        prune_stacked_losses(cast(Tensor, losses), hooks)
    try:
        if level == "loss":
            _loss_level(tg, names, loss_list, raw, obj_items, obj, obj_scaled, feats, shared, sal_regs, param_regs,
                        keep_saliencies, compute_gramian, grad_norm_params, jacobian, scale, dist, weighted_sum,
                        retain_graph)
        else:
            _gradient_level(tg, names, raw, obj, obj_scaled, feats, shared, tg.task_params, sal_regs, param_regs,
                            transform, jacobian, scale, dist, retain_graph, saliency_graph)
    except _NonFinitePenalty as exc:  # a regulariser's penalty: the step's policy decides (skip or raise)
        tg.problem, tg.overflow = str(exc), scale != 1.0
    finally:
        for h in hooks:
            h.remove()
    return tg


class _NonFinitePenalty(NonFiniteError):
    pass


def _check_own_maps(names: Sequence[str], feats: Features, t: int, others: Sequence[Tensor | None]) -> None:
    reached = [names[m] for m, g in zip([m for m in range(len(feats.maps)) if m != t], others) if g is not None]
    if reached:
        raise ConfigurationError(
            f"multi-input features: the loss of task '{names[t]}' reaches the representation of task(s) "
            f"{reached}, not only its own. With features={{task: Z_task}} each task must read its own input's Z; "
            "for several shared maps of one input pass features=[Z_1, Z_2, ...] instead."
        )


def _entry_points(tg: TaskGradients, transform: str, scale: float, like: Tensor) -> list[tuple[Any, Tensor]] | None:
    """Where each task's backward may start on a stacked loss vector (identity transform only: the
    objective is then ``scale · L_t``, whose gradient at the stack's input is ``scale``)."""
    if tg._split is None or transform != "none":
        return None
    return tg._split.entry_points(scale, like)


def _heads_flags(sets: list[set[Any]], split: StackSplit | None, entries: list[tuple[Any, Tensor]] | None
                 ) -> list[bool]:
    """:func:`_retain_flags` of a heads pass. A stacked vector's unbind/view/stack nodes are in every task's set,
    but a backward started at the stack's input t (``entries``) never runs them: they must not keep task t's
    branch alive (it outlived the step)."""
    return _retain_flags([st - split.shared for st in sets] if split is not None and entries is not None else sets)


def _heads_pass(names: Sequence[str], obj_scaled: Sequence[Tensor], feats: Features, heads: list[Tensor],
                create_graph: bool, retain_graph: bool, split: StackSplit | None = None,
                entries: list[tuple[Any, Tensor]] | None = None, sets: list[set[Any]] | None = None
                ) -> tuple[list[list[Tensor]], list[list[Tensor | None]], list[list[int]]]:
    """One backward per task through its head: the saliencies ``S_t`` (per map), head rows, and per task the
    indices of the head parameters it reaches (the only entries of its row that can be set).

    Each task's backward asks only for the head parameters its loss reaches (found by the same
    graph walk that decides which parts of the graph can be freed): autograd prepares one capture
    per input, so asking every task for all T heads' parameters costs O(T²) for nothing (the
    others' gradients are ``None`` either way)."""
    T = len(obj_scaled)
    if sets is None:  # ``sets``: :func:`_node_sets` ``(obj_scaled, feats.maps, split)`` when the caller has them
        sets = _node_sets(obj_scaled, feats.maps, split)
    if not feats.multi_input:
        check_only_route(names, feats.maps, sets, obj_scaled)
    flags = [True] * T if (retain_graph or create_graph) else _heads_flags(sets, split, entries)
    index = {id(p): i for i, p in enumerate(heads)}
    own = [sorted({index[id(v)] for v in (getattr(n, "variable", None) for n in st) if id(v) in index})
           for st in sets]
    sal: list[list[Tensor]] = []
    rows: list[list[Tensor | None]] = []
    M = len(feats.maps)
    for t, L in enumerate(obj_scaled):
        mine = [heads[i] for i in own[t]]
        if feats.multi_input:
            inputs = [feats.maps[t]] + [feats.maps[m] for m in range(M) if m != t] + mine
            gs = _grads(L, inputs, retain_graph=flags[t], create_graph=create_graph)
            _check_own_maps(names, feats, t, gs[1:M])
            s = [gs[0] if gs[0] is not None else torch.zeros_like(feats.maps[t])]
        else:
            if entries is not None:  # a stacked vector: start at the stack's input t (its own branch only)
                gs = _grads(entries[t][0], feats.maps + mine, grad_outputs=entries[t][1], retain_graph=flags[t],
                            create_graph=create_graph)
            else:
                gs = _grads(L, feats.maps + mine, retain_graph=flags[t], create_graph=create_graph)
            s = [g if g is not None else torch.zeros_like(z) for g, z in zip(gs[:M], feats.maps)]
        hr: list[Tensor | None] = [None] * len(heads)
        for i, g in zip(own[t], gs[M:]):
            hr[i] = g
        sal.append(s)
        rows.append(hr)
    return sal, rows, own


def _dense(gs: Sequence[Tensor | None], shared: Sequence[Tensor] | None = None,
           sparse: dict[int, list[Tensor]] | None = None) -> tuple[Tensor | None, ...]:
    """A sparse gradient (``nn.Embedding(sparse=True)``) as a dense Jacobian row; with ``sparse`` given, the
    gradient's indices (``(sparse_dim, nnz)``, duplicates and all) appended there under the parameter's ``id``
    (``shared`` in ``gs``'s order), so that its ``.grad`` is written sparse, on those indices, as ``loss.backward()``
    writes it (:func:`sparse_again`)."""
    if sparse is None or shared is None:
        return tuple(g.to_dense() if g is not None and g.layout != torch.strided else g for g in gs)
    return tuple(g if g is None or g.layout == torch.strided else _densify(g, p, sparse) for g, p in zip(gs, shared))


def _densify(g: Tensor, p: Tensor, sparse: dict[int, list[Tensor]]) -> Tensor:
    sparse.setdefault(id(p), []).append(g._indices())  # _indices: an uncoalesced gradient's too (no copy)
    return g.to_dense()


def sparse_again(gs: list[Tensor | None], shared: Sequence[Tensor], sparse: dict[int, list[Tensor]]) -> None:
    """The combined gradients of the parameters whose per-task gradients were sparse (``sparse``, from
    :func:`_dense`) as sparse COO tensors again, in place in ``gs``: ``loss.backward()`` gives
    ``nn.Embedding(sparse=True)`` a sparse ``.grad``, which ``torch.optim.SparseAdam`` requires (it refuses a
    dense one) and which holds only the rows a batch touched. The same values, on exactly the indices the per-task
    sparse gradients touched (their union, coalesced: sorted, each once) — a touched row whose combined gradient
    is exactly zero included, as ``backward()`` keeps it, since ``SparseAdam`` updates its moments (and moves the
    row) on every index present. A loop over the parameters only when some gradient was sparse."""
    if not sparse:
        return
    for i, p in enumerate(shared):
        touched = sparse.get(id(p))
        g = gs[i]
        if touched is not None and g is not None and g.layout == torch.strided:
            idx = touched[0] if len(touched) == 1 else torch.cat(touched, dim=1)
            idx = torch.unique(idx, dim=1)  # sorted lexicographically: the coalesced order
            gs[i] = torch.sparse_coo_tensor(idx, g[tuple(idx)], g.shape, dtype=g.dtype, device=g.device,
                                            is_coalesced=True)


def _write_row(J: Tensor, t: int, gs: Sequence[Tensor | None], shared: Sequence[Tensor],
               missed: list[Tensor] | None = None) -> None:
    """Row ``t`` of the ``(T, P)`` workspace from one task's per-parameter gradients (``None``: zeros, the parameter
    appended to ``missed`` when given): one concatenation into the row, whatever the number of parameters."""
    if missed is None:
        missed = []
    parts = [g.reshape(-1) if g is not None
             else _missed(missed, p, torch.zeros(p.numel(), dtype=J.dtype, device=J.device))
             for g, p in zip(gs, shared)]
    if len(parts) == 1:
        J[t].copy_(parts[0])
    else:
        torch.cat(parts, out=J[t])


def _encoder_rows(feats: Features, shared: list[Tensor], sal: Sequence[Sequence[Tensor]], create_graph: bool,
                  retain_graph: bool, jacobian: str, unreached: list[int] | None = None,
                  sparse: dict[int, list[Tensor]] | None = None) -> tuple[list[Any], Tensor | None]:
    """Per-task shared-parameter gradients ``g_t = J_Zᵀ S_t``, and the ``(T, P)`` matrix they were written into;
    the indices of the parameters no task reaches (zeros in the Jacobian) appended to ``unreached`` when given, the
    parameters with sparse gradients recorded in ``sparse`` when given (:func:`_dense`).

    On the CPU without ``create_graph`` (loop mode): every row goes into the reused workspace
    (:func:`~mtlens.engine.gramian.jacobian_workspace`), returned alone (``([], J)``; per-parameter
    views by :func:`~mtlens.engine.gramian.matrix_blocks`).
    Batched mode: blocks ``(T, *shape)`` per parameter and no matrix. Else rows (per task, per parameter)."""
    T = len(sal)
    if jacobian == "batched" and len(feats.maps) == 1 and not feats.multi_input and not create_graph:
        if feats.maps[0].retains_grad:  # its hook would store vmap's batched gradient, a BatchedTensor, as Z.grad
            raise ConfigurationError(
                "jacobian='batched' with features.retain_grad(): the vmapped VJP would leave a batched tensor in the "
                "features' .grad; use jacobian='loop', or read the saliencies from the step's record "
                "(record.saliencies) instead of retaining Z's gradient")
        try:
            with MapHooksHeld(feats.maps):  # hooks on the map already shaped each S_t
                gs = _grads(feats.maps[0], shared, grad_outputs=torch.stack([s[0] for s in sal]), batched=True,
                            retain_graph=retain_graph)
        except NotImplementedError as exc:  # vmap over a sparse gradient (nn.Embedding(sparse=True))
            raise ConfigurationError(f"jacobian='batched' could not differentiate the shared parameters ({exc}); "
                                     "a sparse-gradient parameter (nn.Embedding(sparse=True)) needs "
                                     "jacobian='loop'") from exc
        except RuntimeError as exc:  # a random op run inside the vmapped backward (a checkpoint's recomputed dropout)
            if "random operations inside of vmap" not in str(exc):
                raise
            raise ConfigurationError(
                "jacobian='batched' could not differentiate the shared parameters: the encoder's backward runs a "
                "random operation, which vmap refuses — a torch.utils.checkpoint recomputing dropout (or another "
                "random layer) inside the vmapped backward. Use jacobian='loop' (the default). PyTorch said: "
                + str(exc).splitlines()[0]) from exc
        lost: list[Tensor] = []
        blocks = [g if g is not None else _missed(lost, p, torch.zeros((T, *p.shape), dtype=p.dtype, device=p.device))
                  for g, p in zip(gs, shared)]
        if lost and unreached is not None:
            unreached.extend(unreached_by_all([lost], shared))
        return blocks, None
    # values only: each task's row goes into a (T, P) workspace reused across steps (no page
    # faults for the T·P floats; see jacobian_workspace) and its autograd output is freed at once
    J = None if create_graph else jacobian_workspace(T, shared)
    rows = []
    misses: list[list[Tensor]] = []
    # multi-input maps sliced from one encoder pass share its graph: freed by the last task's row only
    own_graphs = feats.multi_input and (retain_graph or create_graph or not maps_share_graph(feats.maps))
    for t in range(T):
        maps = feats.of_task(t)
        # multi-input: each task's encoder graph is its own (unless sliced from one pass); one shared map: all use it
        last = (t == T - 1) or own_graphs
        keep = retain_graph or create_graph or not last
        with MapHooksHeld(maps):  # hooks on the maps already shaped S_t: not run again on this VJP's root
            gs = _grads(maps, shared, grad_outputs=sal[t], retain_graph=keep, create_graph=create_graph)
        gs = _dense(gs, shared, sparse)
        missed: list[Tensor] = []
        misses.append(missed)
        if J is None:
            rows.append(zeros_if_none(gs, shared, missed))
        else:
            _write_row(J, t, gs, shared, missed)
    if unreached is not None:
        unreached.extend(unreached_by_all(misses, shared))
    return (rows, None) if J is None else ([], J)


def _raw_saliencies(sal_obj: Sequence[Tensor], raw: Tensor, transform: str, scale: float) -> list[Tensor]:
    """Saliencies of the raw losses from those of the objective losses, keeping the graph.

    ``∂ log(L+ε)/∂Z = (∂L/∂Z)/(L+ε)``, so ``∂L/∂Z = ∂obj/∂Z · (L+ε)``: exact, no extra backward."""
    out = []
    for t, s in enumerate(sal_obj):
        if scale != 1.0:
            s = s / scale
        if transform == "log":
            s = s * (raw[t] + LOG_EPS)
        out.append(s)
    return out


def _stack(sal: list[Tensor], names: Sequence[str]) -> Tensor:
    shapes = {tuple(s.shape) for s in sal}
    if len(shapes) != 1:
        detail = ", ".join(f"'{n}': {tuple(s.shape)}" for n, s in zip(names, sal))
        raise ShapeError(
            "multi-input saliencies are paired positionally (sample b of every task's batch forms "
            f"location b), so every task's batch must have the same shape; got {detail}. Use equal "
            "per-task batch sizes (drop_last=True)."
        )
    return torch.stack(sal)


def _reg_saliency_block(sal_raw: list[Tensor], names: Sequence[str], dist: Dist | None) -> Tensor:
    """The saliency block regularisers see: (T, B, ...) of the global batch under data parallelism
    (the local saliencies scaled by 1/W — those of the global mean loss — gathered with gradient)."""
    S = _stack(sal_raw, names)
    if dist is not None:
        S = dist.all_gather_with_grad(S / dist.world, dim=1)
    return S


def regularizer_terms(
    regs: Sequence[Regularizer], blocks: Sequence[Tensor], obj_detached: Tensor
) -> tuple[Tensor | None, dict[str, float]]:
    total = None
    values: dict[str, float] = {}
    for r in regs:
        term, logged = r.loss(blocks, obj_detached)
        if not torch.isfinite(term.detach()):
            raise _NonFinitePenalty(
                f"regulariser '{r.name}' returned a non-finite penalty ({float(term)}); nothing was "
                "written into .grad"
            )
        total = term if total is None else total + term
        values.update({f"{r.name}/{k}": float(v) for k, v in logged.items()})
        values[f"{r.name}/total"] = float(term.detach())
    return total, values


def _warn_zero(names: Sequence[str], diag: Sequence[float], level: str) -> None:
    for n, v in zip(names, diag):
        if v == 0.0 and n not in _warned_zero:
            _warned_zero.add(n)
            warnings.warn(
                f"mtlens: the gradient of task '{n}' on the shared {'parameters' if level == 'param' else 'features'}"
                " is exactly zero: its loss does not reach the shared encoder (a head reading the input, a detached "
                "path?). Gradient methods then see a zero row (MGDA puts all weight on it); its head still trains "
                "under the head rule. Warned once per task.",
                RuntimeWarning, stacklevel=4,
            )


def _gradient_level(tg: TaskGradients, names: list[str], raw: Tensor, obj: Tensor,
                    obj_scaled: list[Tensor], feats: Features, shared: list[Tensor], heads: list[Tensor],
                    sal_regs: list[Regularizer], param_regs: list[Regularizer], transform: str, jacobian: str,
                    scale: float, dist: Dist | None, retain_graph: bool, saliency_graph: bool = False) -> None:
    T = len(names)
    create = bool(sal_regs) or bool(param_regs)
    level = tg.level
    dependent = maps_dependent(feats.maps) if not feats.multi_input else False
    if dependent and level == "feature":
        raise ConfigurationError(
            "features=[...]: one shared map is computed from another, so their saliencies overlap (the gradient at "
            "the earlier map already contains the path through the later one) and the feature-level Jacobian is not "
            "defined on them. Pass the maps that form a cut of the graph (none computed from another), or use "
            "level='param'."
        )
    sal_multi: list[list[Tensor]] | None = None
    head_rows: list[list[Tensor | None]] | None = None
    if feats.maps and not dependent:
        sal_multi, head_rows, tg._head_index = _heads_pass(
            names, obj_scaled, feats, heads, create or saliency_graph, retain_graph, tg._split,
            _entry_points(tg, transform, scale, raw))
        if saliency_graph:  # attached through the heads, unscaled (ConsMTL differentiates them w.r.t. the heads)
            tg._sal_graph = [[s / scale if scale != 1.0 else s for s in row] for row in sal_multi]
            if not create:  # everything below uses them as values only
                sal_multi = [[s.detach() for s in row] for row in sal_multi]
    # ---- regularisers (attached penalty, gradient added in step 3) --------------------------
    reg_total: Tensor | None = None
    if sal_regs:
        if len(feats.maps) != 1 and not feats.multi_input:
            raise ConfigurationError("saliency regularisers need one shared map (features=Z)")
        if sal_multi is None:
            raise ConfigurationError(
                "saliency regularisers need features that form a cut (no map computed from another)")
        own = [s[0] for s in sal_multi]
        sal_raw = _raw_saliencies(own, raw, transform, scale)
        reg_total, values = regularizer_terms(sal_regs, [_reg_saliency_block(sal_raw, names, dist)], obj)
        tg.regularizer_values.update(values)

    # ---- per-task gradients ----------------------------------------------------------------
    if level == "param":
        J: Tensor | None = None  # the (T, P) workspace matrix the rows were written into, when they were
        if sal_multi is not None:
            rows_or_blocks, J = _encoder_rows(feats, shared, sal_multi, create, retain_graph, jacobian,
                                              unreached=tg._unreached, sparse=tg._sparse)
        else:
            free = not (retain_graph or create)
            sets = _node_sets(obj_scaled, [], tg._split) if free else []
            flags = [True] * T if not free else _retain_flags(sets)
            rows_or_blocks, head_rows = [], []
            J = None if create else jacobian_workspace(T, shared)  # values only: rows into the reused (T, P) matrix
            misses: list[list[Tensor]] = []
            for t, L in enumerate(obj_scaled):
                gs = _grads(L, shared + heads, retain_graph=flags[t], create_graph=create)
                misses.append([])
                if J is None:
                    rows_or_blocks.append(zeros_if_none(gs[:len(shared)], shared, misses[-1]))
                else:
                    _write_row(J, t, _dense(gs[:len(shared)], shared, tg._sparse), shared, misses[-1])
                head_rows.append(list(gs[len(shared):]))
                if free and flags[t]:
                    _free_exclusive(L, sets, t, heads)
            tg._unreached = unreached_by_all(misses, shared)
        if dist is not None:
            _agree_unreached(tg, dist, shared)
        if param_regs:
            blocks = rows_or_blocks if isinstance(rows_or_blocks[0], Tensor) else stack_rows(rows_or_blocks, shared)
            pblocks = [b / scale for b in blocks] if scale != 1.0 else blocks
            p_total, values = regularizer_terms(param_regs, pblocks, obj)
            tg.regularizer_values.update(values)
            reg_total = _add_penalty(reg_total, p_total)
        if J is not None and dist is None:  # the Jacobian as one (T, P) matrix: Gramian, combination, check
            if scale != 1.0:
                J.div_(scale)  # the engine's own workspace: nothing else reads it
            tg._flat = J
        else:
            if J is not None:  # data parallelism: per-parameter blocks, reduced as fresh copies below
                rows_or_blocks = matrix_blocks(J, shared)
            if isinstance(rows_or_blocks[0], Tensor):
                blocks = [b.detach() / scale if scale != 1.0 else b.detach() for b in rows_or_blocks]
                if dist is not None:
                    blocks = [dist.mean_(torch.stack([b[t] for t in range(T)]).contiguous()) for b in blocks]
                tg._blocks = blocks
            else:
                rows = [[g.detach() / scale if scale != 1.0 else g.detach() for g in row] for row in rows_or_blocks]
                if dist is not None:
                    rows = [_reduce_row(dist, row) for row in rows]
                tg._rows = rows
    else:  # feature level
        # features are required at feature level, and dependent maps were refused above
        assert sal_multi is not None
        if param_regs:
            enc, _ = _encoder_rows(feats, shared, sal_multi, True, True, "loop")
            pblocks = stack_rows(enc, shared)
            pblocks = [b / scale for b in pblocks] if scale != 1.0 else pblocks
            p_total, values = regularizer_terms(param_regs, pblocks, obj)
            tg.regularizer_values.update(values)
            reg_total = _add_penalty(reg_total, p_total)
        S = [[_value(s, scale) for s in row] for row in sal_multi]
        # The Gramian of the saliencies. One shared map or several: Σ_m S^m S^mᵀ. Multi-input:
        # each task's representation is its own coordinate block of (Z_1, ..., Z_T), so the
        # exact Jacobian is block-diagonal and G = diag(‖S_t‖²) — invariant to permuting any
        # task's batch (positional pairing of unrelated samples would not be).
        if feats.multi_input:
            G = torch.diag(torch.stack([S[t][0].double().pow(2).sum() for t in range(T)]))
        else:  # one T×|Z| stack per map, shared by the Gramian, the blocks and (below) the record
            # written into a reused block where no one holds the last one (engine/pool.py: no page faults)
            feature_blocks = [pool.stack([S[t][m] for t in range(T)]) for m in range(len(feats.maps))]
            tg._blocks = feature_blocks
            G = gramian_from_blocks(feature_blocks)
        if dist is not None:
            G = dist.sum_(G) / (dist.world ** 2)
        tg._gramian = G
        tg._parts[0]["saliencies"] = S  # local, unscaled: step 3 combines them
    if sal_multi is not None and (len(feats.maps) == 1 or feats.multi_input):
        if (level == "feature" and not feats.multi_input and len(feats.maps) == 1 and transform == "none"
                and scale == 1.0 and dist is None):
            tg.saliencies = feature_blocks[0]  # the same values (raw = objective, unscaled): no second copy
        elif len({tuple(s[0].shape) for s in sal_multi}) == 1:
            own = [s[0].detach() for s in sal_multi]
            # into a reused block where no one holds the last one (engine/pool.py: no page faults every step)
            tg.saliencies = pool.stack(_raw_saliencies(own, raw, transform, scale))
    assert head_rows is not None  # from the heads pass, or from the per-task loop when it did not run
    if scale == 1.0 and not create and not saliency_graph:  # autograd's outputs without a graph: as they are
        tg.head_rows = head_rows  # (a T × (head parameters) pass of Python for nothing: 3 200 entries at T = 40)
    else:
        tg.head_rows = [[None if g is None else _value(g, scale) for g in row] for row in head_rows]
    tg._reg_total = reg_total
    tg._reg_kind = "param" if param_regs else "saliency"
    # diag(G) = Σ g_t² in float64 is finite iff every per-task gradient is: a free check
    G = tg.gramian()
    diag = G.diagonal().tolist()  # T floats, read once (each small tensor op costs ~10 µs inside a step)
    if not all(math.isfinite(v) for v in diag):
        # finite but huge gradients whose float32 chunk products overflowed: the Gramian of float64 products (the
        # rare path; not at the feature level under data parallelism, whose Gramian is a sum over the ranks)
        gblocks = None if feats.multi_input else ([tg._flat] if tg._flat is not None else tg.jacobian_blocks()
                                                  if level == "param" or dist is None else None)
        G, problem = recheck_gramian(names, diag, gblocks, raw, level)
        if problem:
            tg.problem, tg.overflow = problem, scale != 1.0
            return
        tg._gramian = G
        diag = G.diagonal().tolist()
    _warn_zero(names, diag, level)


def recheck_gramian(names: Sequence[str], diag: Sequence[float], blocks: Sequence[Tensor] | None, raw: Tensor,
                    level: str) -> tuple[Tensor, str]:
    """A Gramian whose diagonal ``diag`` is not finite, judged again from its ``blocks`` (the general and the lean
    paths' one rule): where every gradient is finite (an exact check), the Gramian of float64 products
    (:func:`~mtlens.engine.gramian.gramian_exact`: the float32 chunk products overflowed) and ``""`` if it is
    finite; else that Gramian (or an empty tensor) and the message: a non-finite gradient (the tasks whose gradient
    is not finite; without ``blocks`` — multi-input maps, the feature level under data parallelism — the tasks
    whose diagonal entry is not), or finite gradients whose squared norms exceed float64."""
    if blocks and all_finite(blocks):
        G = gramian_exact(blocks)
        exact = G.diagonal().tolist()
        if all(math.isfinite(v) for v in exact):
            return G, ""
        bad = [n for n, v in zip(names, exact) if not math.isfinite(v)]
        return G, (f"the gradients of task(s) {bad} at level '{level}' are finite but their squared norms exceed "
                   f"float64 (losses {raw.tolist()}); nothing was written into .grad: lower the learning rate or "
                   "check the inputs.")
    bad = [n for t, n in enumerate(names)
           if not math.isfinite(diag[t]) and not (blocks and all_finite([b[t] for b in blocks]))]
    return torch.empty(0), (f"non-finite gradient of task(s) {bad} at level '{level}' (losses {raw.tolist()}); "
                            "nothing was written into .grad. A loss may be finite while its gradient overflows: lower "
                            "the learning rate or check the inputs.")


def _value(g: Tensor, scale: float) -> Tensor:
    """``g`` detached and unscaled; autograd's outputs without ``create_graph`` are used as they are (no alias)."""
    if g.requires_grad:
        g = g.detach()
    return g / scale if scale != 1.0 else g


def _agree_unreached(tg: TaskGradients, dist: Dist, shared: Sequence[Tensor]) -> None:
    """Data parallelism, parameter level: a shared parameter is unreached (its ``.grad`` left as it was) only when
    no rank's share reaches it, and a sparse one's ``.grad`` holds the rows any rank's gradients touched — the same
    answer on every rank, the one-process step's on the global batch (one all-reduce of 2 numbers per shared
    parameter; one more, of a number per row, for the sparse ones)."""
    n = len(shared)
    local = set(tg._unreached)
    flags = dist.reached_anywhere([i not in local for i in range(n)] + [id(p) in tg._sparse for p in shared])
    tg._unreached = [i for i in range(n) if not flags[i]]
    sparse = [p for i, p in enumerate(shared) if flags[n + i]]
    if sparse:  # nn.Embedding(sparse=True): sparse_dim 1
        union = dist.touched_union([(tuple(p.shape), 1) for p in sparse], [tg._sparse.get(id(p), []) for p in sparse])
        for p, idx in zip(sparse, union):
            tg._sparse[id(p)] = [idx.to(p.device)]


def _reduce_row(dist: Dist, row: list[Tensor]) -> list[Tensor]:
    """Mean over ranks of one task's per-parameter gradients (one flat all-reduce per task)."""
    return dist.mean_tensors(row)


def _add_penalty(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    """``total + term``, where either may be absent (no regulariser of that kind)."""
    if term is None:
        return total
    return term if total is None else total + term


# Nodes whose backward may give a leaf a sparse gradient (when their saved flag says so): the objective's
# backward writes a sparse .grad there (what SparseAdam needs), the per-task rows a dense one.
_SPARSE_FLAGS: dict[type, str] = {
    getattr(torch._C._functions, n): f for n, f in (
        ("EmbeddingBackward0", "_saved_sparse"), ("EmbeddingBagBackward0", "_saved_sparse"),
        ("GatherBackward0", "_saved_sparse_grad")) if hasattr(torch._C._functions, n)}


def _rows_cover_objective(loss_list: Sequence[Tensor], shared: Sequence[Tensor], heads: Sequence[Tensor],
                          feats: Features) -> list[int] | None:
    """Whether ``Σ_t w_t`` (per-task rows over the shared parameters and the heads) is the whole gradient of
    ``Σ_t w_t L_t``, as the objective's backward would write it — one graph walk, the one that backward would
    have made to find its leaves. ``None`` when it is not: a leaf outside the shared parameters and heads, or a
    node giving a sparse gradient (``nn.Embedding(sparse=True)``: the rows are dense, the backward's ``.grad``
    sparse), or multi-input maps whose graphs share nodes (sliced from one encoder pass, ``{task: Z[idx_t]}``:
    each task's row frees its own map's graph, which a later task's row then needs — keeping them instead would
    keep a task's part that the backward frees). Else the indices of the shared parameters no loss reaches: the
    backward leaves their ``.grad`` as it was (``None``), where the rows hold zeros."""
    if feats.multi_input and maps_share_graph(feats.maps):
        return None
    known = {id(p) for p in shared} | {id(p) for p in heads}
    reached: set[int] = set()
    seen: set[Any] = set()
    acc, sparse = _ACCUMULATE_GRAD, _SPARSE_FLAGS
    stack = [L.grad_fn for L in loss_list if L.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        kind = type(node)
        if kind is acc:
            var = node.variable  # type: ignore[attr-defined]
            if var is not None:
                if id(var) not in known or var.layout != torch.strided:
                    return None
                reached.add(id(var))
            continue
        if kind in sparse and getattr(node, sparse[kind], False):
            return None
        nxt = node.next_functions  # as find_leaves: read once, no list for a single input
        if len(nxt) == 1:
            if nxt[0][0] is not None:
                stack.append(nxt[0][0])
        else:
            stack.extend([n for n, _ in nxt if n is not None])
    return [i for i, p in enumerate(shared) if id(p) not in reached]


def _objective_rows(tg: TaskGradients, names: list[str], obj_items: list[Tensor], raw: Tensor, feats: Features,
                    shared: list[Tensor], jacobian: str, retain_graph: bool) -> bool:
    """Loss level, ``compute_gramian="param"``, an objective ``Σ_t w_t L_t``: the per-task Jacobian the Gramian
    is measured on is computed as at parameter level — a heads pass giving each task's saliencies *and* its
    heads' gradients, then the encoder's rows — so that step 3 writes ``Σ_t w_t g_t`` from these rows
    (:func:`mtlens.engine.apply.apply_decision`) instead of running the objective's own backward a second time
    over the whole network. The graph is freed by the last encoder backward unless ``retain_graph``.
    (docs/performance.md, "Monitoring": the second backward was 18 convolution backwards a step against
    the rows' 12 at the conv benchmark's T = 3.)

    Returns ``False`` (nothing computed: the objective's backward runs) when tasks share nodes between their
    losses and the maps (a head layer two tasks read): a task's head backward must then keep its graph for the
    later task, and the part only it uses would outlive the step, where ``loss.backward()`` frees it."""
    heads = tg.task_params
    split = tg._split
    entries = _entry_points(tg, tg._transform, 1.0, raw)
    sets = _node_sets(obj_items, feats.maps, split)
    if not retain_graph and any(_heads_flags(sets, split, entries)):
        return False
    sal, head_rows, tg._head_index = _heads_pass(names, obj_items, feats, heads, False, retain_graph, split,
                                                 entries, sets)
    enc, J = _encoder_rows(feats, shared, sal, False, retain_graph, jacobian)
    if J is not None:
        tg._flat = J
    else:
        tg._blocks = [b.detach() for b in enc] if isinstance(enc[0], Tensor) else stack_rows(enc, shared)
    tg.head_rows = head_rows
    tg._objective_from_rows = True
    tg.gramian()
    tg.gramian_level = "param"
    tg._reg_kind = "loss"
    return True


def _loss_level(tg: TaskGradients, names: list[str], loss_list: list[Tensor], raw: Tensor, obj_items: list[Tensor],
                obj: Tensor, obj_scaled: list[Tensor], feats: Features, shared: list[Tensor],
                sal_regs: list[Regularizer], param_regs: list[Regularizer], keep_saliencies: bool,
                compute_gramian: str | None, grad_norm_params: Sequence[Tensor] | None, jacobian: str, scale: float,
                dist: Dist | None, weighted_sum: bool = False, retain_graph: bool = False) -> None:
    tg._attached = list(obj_items)  # under data parallelism: valued at the global mean (see above)
    if grad_norm_params is not None:
        params = list(grad_norm_params)
        rows = []
        for L in obj_scaled:
            gs = zeros_if_none(_grads(L, params), params)
            rows.append([g.detach() / scale if scale != 1.0 else g.detach() for g in gs])
        if dist is not None:
            rows = [_reduce_row(dist, r) for r in rows]
        norms_sq = [_sum((g.double() ** 2).sum() for g in r) for r in rows]
        tg.grad_norms = torch.stack(norms_sq).sqrt().to(raw.dtype)
        if not bool(torch.isfinite(tg.grad_norms).all()):
            tg.problem = f"non-finite per-task gradient norms {tg.grad_norms.tolist()}"
            tg.overflow = scale != 1.0
            return
    sal: list[Tensor] = []
    block: Tensor | None = None
    if sal_regs or keep_saliencies or compute_gramian == "feature":
        if len(feats.maps) > 1 and not feats.multi_input:
            raise ConfigurationError(
                "saliencies (regularisers, keep_saliencies, compute_gramian='feature') need one shared map "
                "(features=Z) or one per task (features={task: Z_task}), not several shared maps"
            )
        if not feats.multi_input and _multi_output_maps(feats.maps):  # a route around Z leaves S_t short
            check_only_route(names, feats.maps, _node_sets(loss_list, feats.maps), loss_list)
        for t, L in enumerate(loss_list):
            maps = feats.of_task(t)
            s0 = _grads(L, maps, create_graph=bool(sal_regs))[0]
            sal.append(s0 if s0 is not None else torch.zeros_like(maps[0]))
        if len({tuple(s.shape) for s in sal}) == 1:
            # one (T, B, ...) stack: the record's block is the regularisers' (one process), detached
            block = torch.stack(sal)
            tg.saliencies = block.detach()
    reg_total: Tensor | None = None
    if sal_regs:
        S = block if block is not None and dist is None else _reg_saliency_block(sal, names, dist)
        reg_total, values = regularizer_terms(sal_regs, [S], obj)
        tg.regularizer_values.update(values)
    pblocks: list[Tensor] = []
    if (weighted_sum and compute_gramian == "param" and not param_regs and not sal_regs and grad_norm_params is None
            and scale == 1.0 and dist is None and feats.maps and not maps_dependent(feats.maps)
            and (unreached := _rows_cover_objective(loss_list, shared, tg.task_params, feats)) is not None
            and _objective_rows(tg, names, obj_items, raw, feats, shared, jacobian, retain_graph)):
        tg._unreached = unreached
        return
    if param_regs or compute_gramian == "param":
        create = bool(param_regs)
        # Through the maps only when they form a cut: with z_high = f(z_low), ∂L/∂z_low already holds the path
        # through z_high, and pushing both saliencies through the encoder would count that path twice.
        if feats.maps and (feats.multi_input or not maps_dependent(feats.maps)):
            s_obj = [zeros_if_none(_grads(o, feats.of_task(t), create_graph=create), feats.of_task(t))
                     for t, o in enumerate(obj_items)]
            enc, J = _encoder_rows(feats, shared, s_obj, create, True, "loop" if create else jacobian)
            if J is not None:
                enc = matrix_blocks(J, shared)
        else:
            enc = [zeros_if_none(_grads(o, shared, create_graph=create), shared) for o in obj_items]
        pblocks = enc if isinstance(enc[0], Tensor) else stack_rows(enc, shared)
        if param_regs:
            p_total, values = regularizer_terms(param_regs, pblocks, obj)
            tg.regularizer_values.update(values)
            reg_total = _add_penalty(reg_total, p_total)
    if compute_gramian == "param":
        blocks = [b.detach() for b in pblocks]
        tg._blocks = [dist.mean_(b.clone()) for b in blocks] if dist is not None else blocks
        tg.gramian()
        tg.gramian_level = "param"
    elif compute_gramian == "feature":
        if tg.saliencies is None:  # multi-input batches of different shapes: no (T, B, ...) stack
            raise ShapeError(
                "compute_gramian='feature' with multi-input features needs every task's batch to have the same "
                "shape (equal per-task batch sizes, drop_last=True)"
            )
        G = gramian_from_blocks([tg.saliencies])
        tg._gramian = dist.sum_(G) / dist.world ** 2 if dist is not None else G
        tg.gramian_level = "feature"
    tg._reg_total = reg_total
    tg._reg_kind = "loss"

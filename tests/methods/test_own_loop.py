"""Every method in a hand-written training loop: it is itself, or an error names the missing call.

Issue 12, items 1 and 4: stateful methods declare what the user's loop must do
(``Method.user_calls``) and detect a miss; each method declares the loss transforms it is
defined for (``Method.loss_transforms``) and the engine and the configuration refuse the others.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mtlens
from mtlens.engine import LossWeighting, Regularizer
from mtlens.errors import ConfigurationError
from mtlens.methods import available, create, get

TASKS = ["a", "b", "c"]
STEPS = 4  # batches per epoch


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})


def _loader(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, 6, 5, generator=g)
    ys = {t: torch.randn(STEPS, 6, 1, generator=g) * (i + 1) for i, t in enumerate(TASKS)}
    return [(x[k], {t: ys[t][k] for t in TASKS}) for k in range(STEPS)]


def _losses(model, x, targets):
    z = model.encoder(x)
    return z, {t: ((model.heads[t](z) - targets[t]) ** 2).mean() + 0.05 for t in TASKS}


def _observe(method, model, loader, k, lr=0.05):
    """Before the step: SDMGrad, MoDo get the cross-Gramian of two further batches; bilevel methods
    (Auto-Lambda, MOML, FORUM) a look-ahead over the step's batch and the next one."""
    if method.needs_second_batch:
        (xa, ta), (xb, tb) = loader[(k + 1) % len(loader)], loader[(k + 2) % len(loader)]
        method.observe_cross_gramian(mtlens.engine.cross_gramian(
            _losses(model, xa, ta)[1], _losses(model, xb, tb)[1], model.encoder.parameters()))
    if method.needs_lookahead:
        (x, t), (xv, tv) = loader[k], loader[(k + 1) % len(loader)]
        method.meta_step(mtlens.engine.LookAhead(
            list(model.parameters()), lambda: list(_losses(model, x, t)[1].values()),
            lambda: list(_losses(model, xv, tv)[1].values()), lr=lr))


def _level(method):
    if isinstance(method, LossWeighting):
        return None
    return "param" if "param" in method.levels else "feature"


def run_loop(method, *, epochs=3, after_step=True, on_epoch_end=True, task_scores=True, optimizer_params=True,
             accumulate=1,
             model=None, observe=True):
    """The README's own loop (every call made), with switches that leave one call out."""
    torch.manual_seed(0)
    model = model or Model()
    params = list(model.parameters()) + (method.parameters() if optimizer_params else [])
    optimizer = torch.optim.SGD(params, lr=0.05)
    loader = _loader()
    for _ in range(epochs):
        epoch_losses = []
        for k, (x, targets) in enumerate(loader):
            if k % accumulate == 0:
                optimizer.zero_grad()
            if observe:
                _observe(method, model, loader, k)
            z, losses = _losses(model, x, targets)
            record = mtlens.mtl_backward(losses, features=z, shared_params=model.encoder.parameters(),
                                         method=method, level=_level(method))
            if (k + 1) % accumulate:
                continue
            optimizer.step()
            if method.needs_extra_forward and after_step and not record.skipped:
                with torch.no_grad():
                    method.after_step(_losses(model, x, targets)[1])
            epoch_losses.append(record.losses)
        if on_epoch_end:
            method.on_epoch_end(torch.stack(epoch_losses).mean(0))
        if method.needs_task_scores and task_scores:  # PIVRG: each task's drop vs its STL baseline, in %
            method.on_task_scores(_task_scores(torch.stack(epoch_losses).mean(0)))
    return model


def _task_scores(mean_losses):
    """Relative drop (%) of each task's loss against a fixed single-task reference loss."""
    stl = torch.tensor([0.5, 2.0, 6.0], dtype=mean_losses.dtype)
    return 100 * (mean_losses - stl) / stl


def _setup(name):
    return {"num_tasks": len(TASKS), "steps_per_epoch": STEPS}


def _hparams(name):
    # STCH: a one-epoch warm-up so that three epochs reach STCH proper
    return {"stch": {"warmup_epochs": 1}, "rlw": {"seed": 0}}.get(name, {})


def _changed(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape != b.shape or not torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(_changed(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_changed(x, y) for x, y in zip(a, b))
    return a != b


STATEFUL = [n for n in available() if get(n).stateful and get(n).family != "regularizer"]


# -- item 1: every stateful method is itself in the README's loop --------------------------------
@pytest.mark.parametrize("name", STATEFUL)
def test_every_stateful_method_evolves_in_the_own_loop(name):
    method = create(name, **_setup(name), **_hparams(name))
    before = method.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the loop makes every call: nothing to warn about
        run_loop(method)
    assert _changed(before, method.state_dict()), f"{name}: its state never changed in the loop"


def test_famo_logits_move_in_the_own_loop():
    method = create("famo", num_tasks=3)
    run_loop(method)
    assert method.state_dict()["logits"].abs().max() > 1e-3  # the issue: they stayed [0, 0, 0]


def test_dwa_leaves_equal_weights_after_two_epochs():
    method = create("dwa", num_tasks=3, steps_per_epoch=STEPS)
    run_loop(method, epochs=3)
    w = method.weights(torch.ones(3))
    assert not torch.allclose(w, torch.ones(3))  # the issue: DWA stayed at equal weights
    assert float(w.sum()) == pytest.approx(3.0)


def test_stch_leaves_its_warm_up():
    method = create("stch", warmup_epochs=1, num_tasks=3, steps_per_epoch=STEPS)
    run_loop(method, epochs=3)
    assert not method.in_warmup


@pytest.mark.parametrize("name", ["uw", "imtl_l"])
def test_learnable_scalars_train_in_the_own_loop(name):
    method = create(name, num_tasks=3)
    run_loop(method)
    assert method.parameters()[0].detach().abs().max() > 1e-3


# -- item 1: a missed call raises, naming it ------------------------------------------------------
def test_famo_without_after_step_raises_naming_it():
    with pytest.raises(ConfigurationError, match=r"after_step\(new_losses\) was not called"):
        run_loop(create("famo", num_tasks=3), after_step=False)


def test_famo_with_gradient_accumulation_is_not_a_miss():
    method = create("famo", num_tasks=3)
    run_loop(method, accumulate=2)  # two weighting calls per optimiser step, one after_step
    assert method.state_dict()["logits"].abs().max() > 0


@pytest.mark.parametrize("name", ["uw", "imtl_l"])
def test_scalars_missing_from_the_optimiser_raise(name):
    with pytest.raises(ConfigurationError, match=r"method.parameters\(\)"):
        run_loop(create(name, num_tasks=3), optimizer_params=False)


@pytest.mark.parametrize("name", ["uw", "imtl_l"])
def test_lazily_created_scalars_warn_then_raise(name):
    method = create(name)  # no num_tasks: created at the first call, after the optimiser
    with pytest.warns(UserWarning, match="add method.parameters"), \
            pytest.raises(ConfigurationError, match=r"method.parameters\(\)"):
        run_loop(method)


@pytest.mark.parametrize("name,hp", [("dwa", {}), ("stch", {"warmup_epochs": 2})])
def test_missed_on_epoch_end_raises_with_steps_per_epoch(name, hp):
    method = create(name, num_tasks=3, steps_per_epoch=STEPS, **hp)
    with pytest.raises(ConfigurationError, match=r"on_epoch_end\(mean_losses\) was not called"):
        run_loop(method, on_epoch_end=False)


@pytest.mark.parametrize("name,hp", [("dwa", {}), ("stch", {"warmup_epochs": 2})])
def test_without_steps_per_epoch_warns_once_then_learns_the_epoch_length(name, hp):
    method = create(name, num_tasks=3, **hp)
    with pytest.warns(UserWarning, match=r"on_epoch_end\(mean_losses\)"):
        run_loop(method, epochs=1)  # one epoch reported: the length is learnt
    with pytest.raises(ConfigurationError, match="on_epoch_end"):
        run_loop(method, epochs=1, on_epoch_end=False)
        run_loop(method, epochs=1, on_epoch_end=False)


def test_epoch_counters_survive_a_checkpoint():
    a = create("dwa", num_tasks=3)
    with pytest.warns(UserWarning):
        run_loop(a, epochs=1)
    b = create("dwa", num_tasks=3)
    b.load_state_dict(a.state_dict())
    with pytest.raises(ConfigurationError, match="on_epoch_end"):
        run_loop(b, epochs=2, on_epoch_end=False)


def test_create_takes_the_setup_keys_for_every_method():
    for name in available():
        method = create(name, num_tasks=3, steps_per_epoch=STEPS, **_hparams(name))
        assert method.name == name
    with pytest.raises(ConfigurationError, match="no hyper-parameter"):
        create("ew", lr=1.0)


def test_user_calls_are_declared_for_the_stateful_loss_methods():
    from mtlens.engine.protocols import USER_CALLS, required_calls

    assert get("famo").user_calls == ("after_step",)
    assert get("dwa").user_calls == get("stch").user_calls == ("on_epoch_end",)
    assert get("uw").user_calls == get("imtl_l").user_calls == ("parameters",)
    for name in available():
        cls = get(name)
        assert set(cls.user_calls) <= set(USER_CALLS), name
        calls = required_calls(cls)
        assert cls.needs_extra_forward == ("after_step" in calls), name
        assert cls.needs_second_batch == ("observe_cross_gramian" in calls), name
        assert cls.needs_task_scores == ("on_task_scores" in calls), name
        assert cls.needs_lookahead == ("meta_step" in calls), name


@pytest.mark.parametrize("name", [n for n in available() if get(n).needs_task_scores])
def test_missed_task_scores_raise_naming_the_call(name):
    method = create(name, **_setup(name))
    with pytest.raises(ConfigurationError, match=r"on_task_scores\(scores\) was not called"):
        run_loop(method, task_scores=False)  # the issue: PIVRG silently stayed at equal priorities
    method = create(name, num_tasks=3)  # no steps_per_epoch: warn once, learn the epoch from the first report
    with pytest.warns(UserWarning, match=r"on_task_scores\(scores\)"):
        run_loop(method, epochs=1)
    with pytest.raises(ConfigurationError, match="on_task_scores"):
        run_loop(method, epochs=2, task_scores=False)


@pytest.mark.parametrize("name", [n for n in available() if get(n).needs_second_batch])
def test_missed_cross_gramian_raises_naming_it(name):
    with pytest.raises(ConfigurationError, match="observe_cross_gramian"):
        run_loop(create(name, **_setup(name)), observe=False)  # first step: never observed
    method = create(name, **_setup(name))
    run_loop(method, epochs=1)
    with pytest.raises(ConfigurationError, match="observe_cross_gramian was not called"):
        run_loop(method, epochs=1, observe=False)  # observed before, then stale


@pytest.mark.parametrize("name", [n for n in available() if get(n).needs_lookahead])
def test_missed_meta_step_raises_naming_it(name):
    """Bilevel methods: a loop without the look-ahead raises, naming meta_step (FORUM at once: its step is
    computed there; Auto-Lambda, MOML on the second step in a row: their weights would stay frozen)."""
    with pytest.raises(ConfigurationError, match=r"meta_step\(lookahead\) was not called"):
        run_loop(create(name, **_setup(name)), observe=False)


# -- item 4: loss-transform compatibility is a declared property ----------------------------------
def _one_step(method, transform):
    torch.manual_seed(0)
    model = Model()
    loader = _loader()
    x, targets = loader[0]
    _observe(method, model, loader, 0)
    z, losses = _losses(model, x, targets)
    regs = [method] if isinstance(method, Regularizer) else []
    main = create("ew") if regs else method
    return mtlens.mtl_backward(losses, features=z, shared_params=model.encoder.parameters(), method=main,
                               regularizers=regs, level=None if regs else _level(method), loss_transform=transform)


@pytest.mark.parametrize("name", available())
def test_engine_refuses_every_undeclared_transform_with_the_reason(name):
    method = create(name, **_setup(name), **_hparams(name))
    for transform in ("none", "log"):
        problem = method.loss_transform_problem(transform)
        if method.loss_transform is not None and transform != method.loss_transform:
            continue  # a prescribed transform: the engine's own clash message
        if problem is None:
            _one_step(method, transform)
            continue
        with pytest.raises(ConfigurationError) as exc:
            _one_step(method, transform)
        msg = str(exc.value)
        assert f"'{name}' is not defined for loss_transform='{transform}'" in msg and problem in msg


@pytest.mark.parametrize("name", ["uw", "imtl_l", "famo", "gradnorm", "stch", "gls", "imtl"])
def test_methods_that_take_logs_or_need_positive_losses_refuse_log(name):
    assert "log" not in get(name).loss_transforms
    assert "log" in get(name).loss_transform_conflict


def test_moco_refuses_log_only_with_loss_normalisation():
    assert create("moco").loss_transform_problem("log") is not None
    assert create("moco", normalize="l2").loss_transform_problem("log") is None
    _one_step(create("moco", normalize="l2"), "log")


def test_uw_on_log_losses_diverges_which_is_why_it_is_refused():
    """The reason of the guard, measured: UW's objective on negative (log) losses drives its weights up."""
    method = create("uw", num_tasks=2)
    opt = torch.optim.Adam(method.parameters(), lr=0.05)
    log_losses = torch.log(torch.tensor([0.2, 0.5]) + 1e-8)  # L < 1: negative after the log
    for _ in range(400):
        opt.zero_grad()
        objective, w = method.combine(log_losses)
        objective.backward()
        opt.step()
    assert float(w.max()) > 1e6


@pytest.mark.parametrize("name", [n for n in available("loss") if "log" in get(n).loss_transforms])
def test_loss_weightings_declared_for_log_stay_bounded_on_log_losses(name):
    method = create(name, **_setup(name), **_hparams(name))
    model = Model()
    optimizer = torch.optim.SGD(list(model.parameters()) + method.parameters(), lr=0.02)
    loader = _loader()
    for _ in range(25):
        epoch = []
        for k, (x, targets) in enumerate(loader):
            optimizer.zero_grad()
            _observe(method, model, loader, k)
            z, losses = _losses(model, x, targets)
            record = mtlens.mtl_backward(losses, features=z, shared_params=model.encoder.parameters(),
                                         method=method, loss_transform="log")
            optimizer.step()
            epoch.append(record.losses)
        method.on_epoch_end(torch.stack(epoch).mean(0))
    assert torch.isfinite(record.weights).all() and float(record.weights.abs().max()) < 100


def test_config_names_the_preset_that_set_the_log_transform():
    from mtlens.train import load_config

    with pytest.raises(ConfigurationError) as exc:
        load_config(preset="quick-multimnist", overrides=["method.name=famo", "regularizers=[]"])
    msg = str(exc.value)
    assert "'famo' is not defined for loss_transform='log' (set by the preset 'quick-multimnist')" in msg
    assert "--set loss_transform=none" in msg and "min_losses" in msg  # the cause, then the right fix
    cfg = load_config(preset="quick-multimnist",
                      overrides=["method.name=famo", "regularizers=[]", "loss_transform=none"])
    assert cfg.method.name == "famo"

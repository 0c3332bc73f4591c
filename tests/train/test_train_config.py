"""Configuration: validation errors are one line naming the key and what is allowed; presets; --set."""

import pytest
from tiny_bench import tiny_config

from mtlens.errors import ConfigurationError
from mtlens.train import (
    RunConfig,
    apply_override,
    available_presets,
    load_config,
    load_preset,
    validate_config,
)


def _err(d) -> str:
    with pytest.raises(ConfigurationError) as info:
        validate_config(d)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_valid_config_round_trips(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, regularizers=[{"name": "rep_mtl", "hparams": {"lambda_csa": 0.5}}]))
    assert isinstance(cfg, RunConfig)
    assert cfg.regularizers[0].hparams == {"lambda_csa": 0.5}
    again = validate_config(cfg.model_dump())
    assert again == cfg and again.digest() == cfg.digest()


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    msg = _err(tiny_config(tmp_path, optim={"name": "adam", "lrr": 0.1}))
    assert "unknown key 'optim.lrr'" in msg
    assert "lr" in msg and "weight_decay" in msg
    msg = _err({**tiny_config(tmp_path), "epochs": 3})
    assert "unknown key 'epochs'" in msg and "train" in msg


def test_bad_literal_lists_allowed_values(tmp_path):
    msg = _err(tiny_config(tmp_path, optim={"name": "adamx"}))
    assert "optim.name" in msg and "'adamx'" in msg
    for v in ("'adam'", "'adamw'", "'sgd'"):
        assert v in msg
    msg = _err(tiny_config(tmp_path, method={"name": "ew", "level": "layer"}))
    assert "method.level" in msg and "'param'" in msg and "'feature'" in msg and "null" in msg


def test_bad_number(tmp_path):
    msg = _err(tiny_config(tmp_path, optim={"lr": -1}))
    assert "optim.lr" in msg and "greater than 0" in msg
    msg = _err(tiny_config(tmp_path, train={"epochs": "many"}))
    assert "train.epochs" in msg


def test_loss_level_method_at_feature_level_is_the_engines_error(tmp_path):
    msg = _err(tiny_config(tmp_path, method={"name": "ew", "level": "feature"}))
    assert "method.name='ew', method.level='feature'" in msg
    assert "loss-level method" in msg  # the engine's own ConfigurationError text


def test_feature_only_method_at_param_level(tmp_path):
    msg = _err(tiny_config(tmp_path, method={"name": "graddrop", "level": "param"}))
    assert "graddrop" in msg and "feature" in msg


def test_unknown_method_and_hparams(tmp_path):
    msg = _err(tiny_config(tmp_path, method={"name": "upgradd"}))
    assert "method.name" in msg and "upgrad" in msg
    msg = _err(tiny_config(tmp_path, method={"name": "dwa", "hparams": {"temp": 2}}))
    assert "method.hparams" in msg and "temp" in msg


def test_regulariser_slots(tmp_path):
    msg = _err(tiny_config(tmp_path, method={"name": "rep_mtl"}))
    assert "regulariser" in msg and "regularizers" in msg
    msg = _err(tiny_config(tmp_path, regularizers=[{"name": "mgda"}]))
    assert "regularizers.0.name" in msg and "rep_mtl" in msg
    msg = _err(tiny_config(tmp_path, regularizers=[{"name": "rep_mtl", "hparams": {"lambda_tsr": -1}}]))
    assert "regularizers.0.hparams" in msg


def test_benchmark_options_and_model_kwargs_are_checked(tmp_path):
    msg = _err(tiny_config(tmp_path, data={"benchmark": "tiny-mtl", "options": {"n_trains": 3}}))
    assert "data.options" in msg and "n_trains" in msg
    msg = _err(tiny_config(tmp_path, model={"preset": "mlp", "kwargs": {"hiden": [3]}}))
    assert "model.kwargs" in msg and "hidden" in msg
    msg = _err(tiny_config(tmp_path, data={"benchmark": "nope"}))
    assert "nope" in msg and "tiny-mtl" in msg


def test_impossible_combinations(tmp_path):
    msg = _err(tiny_config(tmp_path, optim={"name": "adam", "momentum": 0.9}))
    assert "sgd only" in msg
    msg = _err(tiny_config(tmp_path, train={"selection": "delta_p_task"}))
    assert "train.selection" in msg and "baseline" in msg
    msg = _err(tiny_config(tmp_path, stl_task="z"))
    assert "stl_task" in msg and "'a'" in msg and "'all'" in msg


def test_overrides_parse_yaml_values_and_lists(tmp_path):
    d = tiny_config(tmp_path, regularizers=[{"name": "rep_mtl"}])
    d = apply_override(d, "optim.lr=3e-4")
    d = apply_override(d, "regularizers.0.hparams.lambda_csa=0.25")
    d = apply_override(d, "train.max_steps_per_epoch=2")
    d = apply_override(d, "method.level=null")
    cfg = validate_config(d)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.regularizers[0].hparams == {"lambda_csa": 0.25}
    assert cfg.train.max_steps_per_epoch == 2 and cfg.method.level is None
    with pytest.raises(ConfigurationError, match="KEY=VALUE"):
        apply_override(d, "optim.lr")
    with pytest.raises(ConfigurationError, match="out of range"):
        apply_override(d, "regularizers.3.name=x")


def test_stl_task_switches_to_plain_task_loss(tmp_path):
    base = tiny_config(
        tmp_path,
        regularizers=[{"name": "rep_mtl"}],
        loss_transform="log",
        baseline="auto",
        monitor={"every": 3},
    )
    cfg = load_config(base=base, overrides=["stl_task=b"])
    assert cfg.stl_task == "b" and cfg.method.name == "ew" and cfg.regularizers == []
    assert cfg.loss_transform is None and cfg.baseline is None and cfg.monitor.every == 0
    # constructed directly, the same combination is refused instead
    msg = _err({**base, "stl_task": "b", "baseline": None})
    assert "stl_task" in msg


def test_every_preset_validates():
    names = available_presets()
    assert {
        "quick-multimnist",
        "quick-scenes",
        "repmtl-nyuv2",
        "repmtl-cityscapes",
        "repmtl-office-31",
        "efficiency-nyuv2",
    } <= set(names)
    for name in names:
        raw = load_preset(name)
        overrides = (
            ["data.root=/data/somewhere"]
            if raw["data"].get("root", None) is None and name.startswith(("repmtl", "efficiency"))
            else []
        )
        cfg = load_config(preset=name, overrides=overrides)
        assert cfg.name == name


def test_preset_needing_data_root_says_so():
    with pytest.raises(ConfigurationError, match=r"data\.root"):
        load_config(preset="repmtl-nyuv2")


def test_repmtl_nyuv2_preset_matches_the_paper_setting():
    cfg = load_config(preset="repmtl-nyuv2", overrides=["data.root=/x"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 1e-4, 1e-5)
    assert (cfg.schedule.name, cfg.schedule.step_size, cfg.schedule.gamma) == ("step", 100, 0.5)
    assert (cfg.train.epochs, cfg.train.batch_size) == (200, 8)
    assert cfg.loss_transform == "log" and [r.name for r in cfg.regularizers] == ["rep_mtl"]


def test_unknown_preset():
    with pytest.raises(ConfigurationError, match="quick-multimnist"):
        load_config(preset="quick-multimnst")


def test_set_shortcuts_for_common_keys():
    d = apply_override({"method": {"name": "ew"}}, "level=feature")
    d = apply_override(d, "method=mgda")
    d = apply_override(d, "epochs=3")
    assert d["method"] == {"name": "mgda", "level": "feature"} and d["train"]["epochs"] == 3


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.betas=[2,3]", r"optim\.betas must be two numbers in \[0, 1\).*\[2\.0, 3\.0\]"),
        ("optim.betas=[0.9, 1.0]", r"optim\.betas must be two numbers in \[0, 1\)"),
        ("batch_size=true", r"train\.batch_size: got True: Input should be a valid integer"),
        ("train.epochs=yes", r"train\.epochs: got True"),
        ("train.batch_size='8'", r"train\.batch_size: got '8'"),
        ("lr=.inf", r"optim\.lr: got inf: Input should be a finite number"),
        ("optim.lr=.nan", r"optim\.lr: got nan: Input should be a finite number"),
        ("optim.lr=true", r"optim\.lr: expected a number, got the boolean True"),
        ("optim.weight_decay=.inf", r"optim\.weight_decay: got inf"),
        ("schedule.gamma=-.inf", r"schedule\.gamma: got -inf"),
        ("monitor.fd_temperature=.inf", r"monitor\.fd_temperature: got inf"),
        ("model.pretrained=1", r"model\.pretrained: got 1: Input should be a valid boolean"),
        ("data.num_workers=false", r"data\.num_workers: got False"),
    ],
)
def test_strict_types_and_finite_numbers(tmp_path, override, needle):
    with pytest.raises(ConfigurationError, match=needle):
        load_config(base=tiny_config(tmp_path), overrides=[override])


def test_numbers_yaml_reads_as_strings_still_work(tmp_path):
    cfg = load_config(base=tiny_config(tmp_path), overrides=["optim.lr=1e-3", "optim.betas=[0.5, 0.99]"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.5, 0.99)

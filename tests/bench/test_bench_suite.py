"""Suites: the built-ins expand as documented; invalid suites fail with one line naming key and fix."""

from __future__ import annotations

import collections

import pytest
from bench_helpers import tiny_suite

from mtlens.bench import available_suites, expand, load_suite
from mtlens.errors import ConfigurationError
from mtlens.methods import get


def _runs(suite, **kw):
    return expand(load_suite(suite, **kw) if not hasattr(suite, "benchmarks") else suite, device_type="cpu")


def test_builtin_suites_listed():
    assert {"quick", "fashion", "efficiency-paper", "rep-mtl"} <= set(available_suites())


def test_quick_suite_covers_the_issue():
    runs = _runs("quick")
    mtl = [r for r in runs if r.kind == "mtl"]
    methods = {r.method for r in mtl}
    assert len(methods) >= 12
    families = {get(m).family for m in methods}
    assert families == {"loss", "gradient"}
    # every gradient method runs at both levels where it supports them (graddrop: feature only)
    for m in methods:
        cls = get(m)
        if cls.family == "gradient":
            levels = {r.level for r in mtl if r.method == m and r.variant == "none"}
            assert levels == set(cls.levels), m
    assert {r.variant for r in mtl} == {"none", "rep_mtl", "rep_mtl_tsr", "rep_mtl_csa"}
    assert {r.method for r in mtl if r.variant != "none"} == {"ew"}
    seeds = collections.defaultdict(set)
    for r in mtl:
        seeds[r.benchmark].add(r.seed)
    assert len(seeds["multimnist"]) >= 2 and "synthetic-scenes" in seeds
    stl = [r for r in runs if r.kind == "stl"]
    assert {(r.benchmark, r.task, r.seed) for r in stl} == {
        ("multimnist", t, s) for t in ("left", "right") for s in seeds["multimnist"]
    } | {("synthetic-scenes", t, s) for t in ("segmentation", "depth", "normal") for s in seeds["synthetic-scenes"]}
    # each multi-task run depends on exactly its benchmark's/seed's baselines, which come first
    by_key = {r.key: r for r in runs}
    for r in mtl:
        assert {by_key[d].task for d in r.deps} == set(get_tasks(r.benchmark))
        assert all(by_key[d].seed == r.seed and by_key[d].benchmark == r.benchmark for d in r.deps)
    assert runs.index(stl[-1]) < runs.index(mtl[0])
    # ablation: TSR only / CSA only really switch the other term off
    regs = {r.variant: r.config.regularizers for r in mtl if r.variant != "none"}
    assert regs["rep_mtl_tsr"][0].hparams["csa"] is False
    assert regs["rep_mtl_csa"][0].hparams["tsr"] is False
    assert len({r.key for r in runs}) == len(runs)


def get_tasks(bench):
    from mtlens.tasks.spec import get_benchmark

    return get_benchmark(bench).task_names


def test_paper_suites_need_roots_and_expand_with_them(tmp_path):
    with pytest.raises(ConfigurationError, match=r"--root nyuv2=PATH --root cityscapes=PATH --root metagraspnet=PATH"):
        _runs("efficiency-paper")
    roots = {b: str(tmp_path / b) for b in ("nyuv2", "cityscapes", "metagraspnet")}
    runs = _runs("efficiency-paper", roots=roots)
    mtl = [r for r in runs if r.kind == "mtl" and r.variant == "none"]
    assert len({r.method for r in mtl}) == 16
    assert {r.seed for r in mtl} == {0, 1, 2}
    assert {r.benchmark for r in mtl} == {"nyuv2", "cityscapes", "metagraspnet"}
    assert {r.config.model.preset for r in mtl} == {"resnet18-light"}
    cagrad = {r.benchmark: r.config.method.hparams.get("c") for r in mtl if r.method == "cagrad"}
    assert cagrad == {"nyuv2": 0.4, "cityscapes": None, "metagraspnet": None}
    assert {r.level for r in mtl if r.method == "mgda"} == {"param", "feature"}
    assert {r.level for r in mtl if r.method == "graddrop"} == {"feature"}
    assert all(r.config.data.root == str(tmp_path / r.benchmark) for r in runs)

    roots = {b: str(tmp_path / b) for b in ("nyuv2", "cityscapes", "office-31", "office-home")}
    runs = _runs("rep-mtl", roots=roots)
    mtl = [r for r in runs if r.kind == "mtl"]
    assert {r.variant for r in mtl} == {"none", "log_losses", "rep_mtl", "rep_mtl_tsr", "rep_mtl_csa"}
    rep = [r for r in mtl if r.variant == "rep_mtl"]
    assert all(r.config.loss_transform == "log" and r.method == "ew" for r in rep)
    # the ablation's reference: EW on the same log losses, without the regulariser
    log_base = [r for r in mtl if r.variant == "log_losses"]
    assert log_base and all(r.method == "ew" and r.config.loss_transform == "log" and not r.config.regularizers
                            for r in log_base)
    assert all(not r.config.regularizers and r.config.loss_transform is None
               for r in mtl if r.variant == "none" and r.method == "ew")


def test_set_routes_suite_and_run_keys():
    s = load_suite(tiny_suite(), ["seeds=[3]", "train.epochs=1", "epochs=1", "benchmarks.tiny-mtl.seeds=[5, 6]"])
    assert s.seeds == [3] and s.set == ["train.epochs=1", "epochs=1"]
    runs = _runs(s)
    assert {r.seed for r in runs} == {5, 6}
    assert {r.config.train.epochs for r in runs} == {1}
    s = load_suite(tiny_suite(), seeds=3)
    assert {r.seed for r in _runs(s)} == {0, 1, 2}


def test_keys_are_config_hashes():
    a = {r.label + str(r.seed): r.key for r in _runs(load_suite(tiny_suite()))}
    b = {r.label + str(r.seed): r.key for r in _runs(load_suite(tiny_suite()))}
    assert a == b
    c = {r.label + str(r.seed): r.key for r in _runs(load_suite(tiny_suite(), ["optim.lr=0.02"]))}
    assert not set(a.values()) & set(c.values())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bogus": 1}, r"unknown key 'bogus'; allowed keys in the top level: name, description"),
        ({"methods": ["ew", "mgdaa"]}, r"unknown method 'mgdaa'. Did you mean 'mgda'"),
        ({"methods": ["ew", "rep_mtl"]}, r"'rep_mtl' is a regulariser; put it in a variant"),
        ({"methods": ["ew", "graddrop"], "levels": ["param"]}, r"'graddrop' works at level\(s\) feature only"),
        ({"methods": ["ew", {"name": "dwa", "levels": ["param"]}]},
         r"'dwa' is a loss-level method; it takes no levels"),
        ({"methods": ["ew", "ew"]}, r"\['ew'\] appear twice; give each a distinct label"),
        ({"variants": {"none": {}, "rep": {"regularizers": [{"name": "rep_mtl"}], "methods": ["uw"]}}},
         r"variants.rep.methods: \['uw'\] not among the methods"),
        ({"variants": {"none": {"regularizers": [{"name": "rep_mtl"}]}}}, r"the 'none' variant has no regularizers"),
        ({"levels": ["parameter"]}, r"levels.0: got 'parameter'; allowed values: 'param' or 'feature'"),
        ({"benchmarks": {"tiny-mtl": {"variants": ["nope"]}}}, r"unknown variant\(s\) \['nope'\]"),
        ({"benchmarks": {"nope": {}}}, r"benchmarks.nope: unknown benchmark 'nope'"),
        ({"benchmarks": {}}, r"a suite needs at least one benchmark"),
        ({"seeds": []}, r"seeds: give at least one seed"),
        ({"exclude": ["uw"]}, r"exclude: \['uw'\] are not methods of the suite"),
        ({"set": ["optim.lr=-1"]}, r"tiny-mtl method 'ew' level loss variant 'none' seed 0: invalid configuration: "
                                   r"optim.lr"),
        ({"base": {"train": {"epochz": 1}}}, r"unknown key 'train.epochz'"),
        ({"benchmarks": {"tiny-mtl": {"method_hparams": {"cagrad": {"c": 1}}}}},
         r"method_hparams: \['cagrad'\] are not methods of the suite"),
        ({"methods": ["ew", {"name": "cagrad", "hparams": {"c": -1}}]}, r"method.hparams"),
    ],
)
def test_invalid_suites_fail_with_one_clear_line(change, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        _runs(load_suite(tiny_suite(**change)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        # each of these used to expand to no run at all (or to fewer than asked) and "succeed" with nothing done
        ({"variants": {}}, r"variants: give at least one variant \('none: \{\}' runs the methods"),
        ({"variants": {"none": {}, "rep": {"regularizers": [{"name": "rep_mtl"}], "methods": []}}},
         r"variants.rep.methods: empty, so the variant applies to no method"),
        ({"exclude": ["ew", "dwa", "mgda"]}, r"benchmarks.tiny-mtl: exclude leaves no method to run"),
        ({"variants": {"rep": {"regularizers": [{"name": "rep_mtl"}]}}, "exclude": ["ew"]},
         r"benchmarks.tiny-mtl: no run to do: none of its variants \(rep\) applies"),
        ({"benchmarks": {"tiny-mtl": {"methods": []}}}, r"benchmarks.tiny-mtl.methods: empty, so the benchmark has"),
        ({"benchmarks": {"tiny-mtl": {"variants": []}}}, r"benchmarks.tiny-mtl.variants: empty, so the benchmark"),
        # a repeated seed used to be reported as two runs "resolving to the same configuration; remove the duplicate
        # method or variant", which names the wrong fix
        ({"seeds": [0, 0]}, r"seeds: seed\(s\) \[0\] appear more than once in \[0, 0\]; give each seed once"),
        ({"benchmarks": {"tiny-mtl": {"seeds": [1, 2, 1]}}}, r"benchmarks.tiny-mtl.seeds: seed\(s\) \[1\] appear"),
        # the name makes the default store bench/<name>: '' and '../x' wrote outside bench/
        ({"name": ""}, r"name: got ''; a suite name is one non-empty path component"),
        ({"name": "../../x"}, r"name: got '../../x'; a suite name is one non-empty path component"),
        # run-config overrides of what the suite varies used to apply silently (seed 5 recorded as seed 0; every
        # method turned into UW, reported as "runs 'ew' and 'dwa' resolve to the same configuration")
        ({"set": ["train.seed=5"]}, r"set: 'train.seed=5' changes train.seed, which the suite sets for each run; "
                                    r"change the suite's seeds \(--seeds K"),
        ({"set": ["seed=5"]}, r"'seed=5' changes train.seed"),
        ({"set": ["method=uw"]}, r"'method=uw' changes method, .*--set methods=\[...\]"),
        ({"set": ["method.hparams.c=1"]}, r"changes method, .*benchmarks.NAME.method_hparams"),
        ({"set": ["regularizers=[]"]}, r"changes regularizers, .*variants"),
        ({"set": ["name=x"]}, r"'name=x' changes name"),
        # the same keys in base or a benchmark's config were overwritten by the expansion in silence
        ({"base": {"method": {"name": "uw"}, "train": {"epochs": 1}}},
         r"base: 'method.name' sets method, which the suite sets for each run \(it would be overwritten in "
         r"silence\); change the suite's methods"),
        ({"base": {"train": {"epochs": 1, "seed": 3}}}, r"base: 'train.seed' sets train.seed"),
        ({"benchmarks": {"tiny-mtl": {"config": {"regularizers": [{"name": "rep_mtl"}]}}}},
         r"benchmarks.tiny-mtl.config: 'regularizers' sets regularizers, .*variants"),
        ({"benchmarks": {"tiny-mtl": {"config": {"loss_transform": "log"}}}},
         r"'loss_transform' sets loss_transform, .*variants.LABEL.loss_transform"),
    ],
)
def test_suites_that_would_run_nothing_or_the_wrong_thing_are_refused(change, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        _runs(load_suite(tiny_suite(**change)))
    assert "\n" not in str(info.value)


def test_unknown_suite_name_and_files(tmp_path):
    with pytest.raises(ConfigurationError, match=r"unknown suite 'quik'. Did you mean 'quick'"):
        load_suite("quik")
    with pytest.raises(ConfigurationError, match=r"suite file '.*nope.yaml' does not exist"):
        load_suite(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigurationError, match=r"is not valid YAML"):
        load_suite(str(bad))
    with pytest.raises(ConfigurationError, match=r"--root nyuv2=...: the suite has no benchmark 'nyuv2'"):
        load_suite(tiny_suite(), roots={"nyuv2": "/x"})
    with pytest.raises(ConfigurationError, match=r"plugins: cannot import 'no_such_plugin_mod'"):
        load_suite(tiny_suite(plugins=["no_such_plugin_mod"]))


def test_user_suite_file_roundtrip(tmp_path):
    import yaml

    p = tmp_path / "mine.yaml"
    raw = tiny_suite()
    raw.pop("name")
    p.write_text(yaml.safe_dump(raw))
    s = load_suite(str(p))
    assert s.name == "mine"
    runs = _runs(s)
    # 2 seeds x (ew, dwa, mgda param, mgda feature, ew + rep_mtl) + 2 seeds x 2 STL tasks
    assert len(runs) == 2 * 5 + 2 * 2
    assert {r.label for r in runs} == {"ew", "dwa", "mgda (param)", "mgda (feature)", "ew + rep_mtl", "STL a", "STL b"}


def test_threads_below_one_is_an_error():
    """`--threads 0` / `--threads -3` used to be accepted (torch then ran 1 thread, and run.json recorded -3)."""
    from mtlens.bench.executors import LocalExecutor

    for bad in (0, -3):
        with pytest.raises(ConfigurationError, match=rf"--threads must be ≥ 1, got {bad}"):
            LocalExecutor(workers=2, threads=bad)


def test_executor_options_that_do_not_apply_are_errors(tmp_path):
    """`--address` with the local executor and `--threads` with Ray used to be ignored without a word."""
    from mtlens.bench import run_suite

    suite = load_suite(tiny_suite())
    with pytest.raises(ConfigurationError, match=r"--address auto: joining a Ray cluster needs --executor ray"):
        run_suite(suite, tmp_path / "s", address="auto")
    with pytest.raises(ConfigurationError, match=r"--threads is for the local executor.*--set resources.cpus=2"):
        run_suite(suite, tmp_path / "s", executor="ray", threads=2)
    assert not (tmp_path / "s").exists()

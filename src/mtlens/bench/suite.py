"""Benchmark suites: a YAML file that expands into many validated training runs.

A suite is *benchmark(s) × methods × levels × regulariser variants × seeds*, plus the
single-task (STL) baselines that its Δ needs. Each run is a full :class:`~mtlens.train.RunConfig`
(the same object ``mtlens train`` uses), built by merging, for each benchmark entry::

    preset (src/mtlens/train/presets)  <  suite ``base``  <  the benchmark's ``config``
      <  what the suite varies (method, level, regularisers/loss transform of the variant, seed)
      <  the suite's ``set`` list (``mtlens bench --set train.epochs=1`` lands there)

A minimal suite file::

    name: my-suite
    seeds: [0, 1]
    methods: [ew, uw, {name: cagrad, hparams: {c: 0.4}}, mgda, graddrop]
    levels: [param, feature]          # gradient methods run at each level they support
    variants:                         # regulariser variants (label -> regularisers, loss transform)
      none: {}
      rep_mtl: {regularizers: [{name: rep_mtl}], methods: [ew]}
    benchmarks:
      multimnist: {preset: quick-multimnist, config: {train: {epochs: 4}}}

Loss-level methods (``mtlens methods --family loss``) run once, at level ``loss``; gradient
methods at every level of ``levels`` they support (GradDrop is feature-only; a method that
supports none of the requested levels is an error, never silently dropped). Variant ``none``
(no regulariser) applies to every method unless it says otherwise; other variants apply to
their ``methods`` (default ``[ew]``). Every failure is one :class:`~mtlens.errors.ConfigurationError`
naming the key and the allowed values.

Built-in suites live in ``src/mtlens/bench/suites/*.yaml`` (``mtlens bench --list``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigurationError, MissingDependencyError
from ..registry import import_plugins as _import_plugins
from ..registry import plugin_modules
from ..train.config import (
    RegularizerConfig,
    RunConfig,
    apply_override,
    deep_merge,
    format_validation_error,
    load_preset,
    stl_settings,
)

VARIANT_NONE = "none"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodEntry(_Section):
    """One method of the suite: its registry name (``mtlens methods``) and hyper-parameters."""

    name: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    levels: list[Literal["param", "feature"]] | None = Field(
        None, description="levels for this method (default: the suite's levels it supports)"
    )
    label: str | None = Field(None, description="name in tables (default: name); needed when a method appears twice")

    @property
    def display(self) -> str:
        return self.label or self.name


class VariantSpec(_Section):
    """A regulariser variant: the regularisers and loss transform every run of the variant uses."""

    regularizers: list[RegularizerConfig] = Field(default_factory=list)
    loss_transform: Literal["none", "log"] | None = None
    methods: list[str] | None = Field(
        None, description="labels of the methods this variant applies to (default: all for 'none', [ew] otherwise)"
    )


class Resources(_Section):
    """What one run asks of the Ray executor (and how many intra-op threads it uses)."""

    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)


class BenchmarkEntry(_Section):
    """One benchmark of the suite: the preset its runs start from and what it changes."""

    benchmark: str | None = Field(None, description="registered benchmark name (default: the entry's key)")
    preset: str | None = Field(None, description="run preset the configs start from (`mtlens presets`)")
    config: dict[str, Any] = Field(default_factory=dict, description="run-config keys merged over preset and base")
    seeds: list[int] | None = None
    methods: list[MethodEntry] | None = None
    levels: list[Literal["param", "feature"]] | None = None
    variants: list[str] | None = Field(None, description="names of the suite's variants to run here (default: all)")
    method_hparams: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-method hyper-parameters on this benchmark, merged over the method's (e.g. cagrad: {c: 0.4})",
    )
    probe: bool = Field(
        False, description="load the data once on the driver before any run, so missing data fails at once"
    )
    exclude: list[str] = Field(default_factory=list, description="method labels left out on this benchmark")

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, v):
        return _method_entries(v)


_BOTH_LEVELS: tuple[Literal["param", "feature"], ...] = ("param", "feature")


class Suite(_Section):
    """A validated suite (see the module docstring for the file format)."""

    name: str
    description: str = ""
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules imported by the driver and by every worker before any run "
        "(to register your own benchmarks or methods)",
    )
    seeds: list[int] = Field(default_factory=lambda: [0])
    methods: list[MethodEntry]
    exclude: list[str] = Field(
        default_factory=list, description="method labels to leave out everywhere (e.g. --set exclude=[nash_mtl])"
    )
    levels: list[Literal["param", "feature"]] = Field(default_factory=lambda: list(_BOTH_LEVELS))
    variants: dict[str, VariantSpec] = Field(default_factory=lambda: {VARIANT_NONE: VariantSpec()})
    base: dict[str, Any] = Field(default_factory=dict, description="run-config keys common to every benchmark")
    benchmarks: dict[str, BenchmarkEntry]
    set: list[str] = Field(default_factory=list, description="KEY=VALUE run-config overrides applied last")
    stl: bool = Field(True, description="train single-task baselines and report Δ against them")
    tensorboard: bool = Field(False, description="write TensorBoard scalars in each run directory")
    resources: Resources = Field(default_factory=Resources)

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, v):
        return _method_entries(v)

    @model_validator(mode="after")
    def _check(self) -> Suite:
        if not self.benchmarks:
            raise ValueError("benchmarks: a suite needs at least one benchmark")
        if not self.methods:
            raise ValueError("methods: a suite needs at least one method")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        _no_repeats("seeds", self.seeds)
        if not self.name.strip() or self.name.strip(".") == "" or any(c in self.name for c in "/\\"):
            raise ValueError(
                f"name: got {self.name!r}; a suite name is one non-empty path component (it names the default "
                "store, bench/<name>): letters, digits, '-', '_'"
            )
        for o in self.set:
            _check_run_override(o)
        _check_config_keys("base", self.base)
        for key, entry in self.benchmarks.items():
            _check_config_keys(f"benchmarks.{key}.config", entry.config)
        if not self.variants:
            raise ValueError("variants: give at least one variant ('none: {}' runs the methods without a regulariser)")
        for vname, v in self.variants.items():
            if v.methods is not None and not v.methods:
                raise ValueError(
                    f"variants.{vname}.methods: empty, so the variant applies to no method; name the methods it "
                    "applies to, or delete the variant"
                )
        for key, entry in self.benchmarks.items():
            for what, value in (("methods", entry.methods), ("variants", entry.variants)):
                if value is not None and not value:
                    raise ValueError(
                        f"benchmarks.{key}.{what}: empty, so the benchmark has nothing to run; leave the key out to "
                        f"run the suite's {what}, or delete the benchmark"
                    )
            if entry.seeds:
                _no_repeats(f"benchmarks.{key}.seeds", entry.seeds)
            if entry.variants is not None:
                bad = [v for v in entry.variants if v not in self.variants]
                if bad:
                    raise ValueError(
                        f"benchmarks.{key}.variants: unknown variant(s) {bad}; the suite defines "
                        + ", ".join(repr(v) for v in self.variants)
                    )
            if entry.seeds is not None and not entry.seeds:
                raise ValueError(f"benchmarks.{key}.seeds: give at least one seed")
        return self


#: Run-configuration keys the suite itself sets for each run (what it varies, and where runs go): a ``set`` entry
#: (``--set``) that changes one is refused, naming the suite key to change instead. Such an override used to
#: apply silently: ``--set train.seed=5`` ran seed 5 under the label of seed 0 (and two seeds became "the same
#: configuration"), ``--set method=uw`` turned every method into UW, ``--set name=x`` was dropped.
_SUITE_VARIES = {
    "method": "the suite's methods, levels and hyper-parameters (--set methods=[...], --set levels=[...], "
              "benchmarks.NAME.method_hparams)",
    "regularizers": "the suite's variants (variants: {LABEL: {regularizers: [...]}})",
    "loss_transform": "the suite's variants (variants.LABEL.loss_transform)",
    "train.seed": "the suite's seeds (--seeds K, or --set seeds=[0,1])",
    "data.benchmark": "the suite's benchmarks (benchmarks: {NAME: {...}})",
    "stl_task": "the suite's stl key (--set stl=false)",
    "baseline": "the suite's stl key (--set stl=false)",
    "name": "the suite's own name (the name key of the suite file)",
    "out_dir": "--out",
}


def _varied(key: str) -> tuple[str, str] | None:
    """``(the key of _SUITE_VARIES that ``key`` sets, its hint)``, or ``None`` (``--set`` shortcuts resolved)."""
    from ..train.config import SHORTCUTS

    key = SHORTCUTS.get(key, key)
    for varied, hint in _SUITE_VARIES.items():
        if key == varied or key.startswith(varied + "."):
            return varied, hint
    return None


def _check_run_override(assignment: str) -> None:
    hit = _varied(assignment.split("=", 1)[0].strip())
    if hit:
        raise ValueError(
            f"set: '{assignment}' changes {hit[0]}, which the suite sets for each run; change {hit[1]} instead"
        )


def _check_config_keys(where: str, config: dict[str, Any]) -> None:
    """Refuse a ``base`` or ``benchmarks.NAME.config`` key that the suite sets for each run (:data:`_SUITE_VARIES`):
    the expansion overwrote it in silence (``base: {method: {name: uw}}`` still ran every method of the suite)."""
    def keys(m: Any, prefix: str = "") -> list[str]:
        if not isinstance(m, dict):
            return [prefix[:-1]]
        return [k for name, v in m.items() for k in keys(v, f"{prefix}{name}.")]

    for dotted in keys(config):
        hit = _varied(dotted)
        if hit:
            raise ValueError(
                f"{where}: '{dotted}' sets {hit[0]}, which the suite sets for each run (it would be overwritten in "
                f"silence); change {hit[1]} instead"
            )


def _no_repeats(where: str, seeds: list[int]) -> None:
    rep = sorted({x for x in seeds if seeds.count(x) > 1})
    if rep:
        raise ValueError(f"{where}: seed(s) {rep} appear more than once in {seeds}; give each seed once")


def _method_entries(v):
    if v is None:
        return v
    if not isinstance(v, list):
        raise ValueError(f"expected a list of method names or {{name, hparams}} mappings, got {type(v).__name__}")
    return [{"name": m} if isinstance(m, str) else m for m in v]


# ---------------------------------------------------------------------------------------------
# built-in suites and loading
def _suite_dir():
    return resources.files("mtlens.bench") / "suites"


def available_suites() -> list[str]:
    """Names of the built-in suites (``src/mtlens/bench/suites/*.yaml``)."""
    return sorted(p.name[: -len(".yaml")] for p in _suite_dir().iterdir() if p.name.endswith(".yaml"))


def describe_suites() -> list[dict[str, str]]:
    """``[{"name", "description"}]`` of every built-in suite."""
    rows = []
    for n in available_suites():
        raw = yaml.safe_load((_suite_dir() / f"{n}.yaml").read_text()) or {}
        rows.append({"name": n, "description": " ".join(str(raw.get("description", "")).split())})
    return rows


def read_suite_file(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The raw dictionary of a built-in suite (by name) or a suite YAML file (by path)."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if s.endswith((".yaml", ".yml")) or os.sep in s or p.is_file():
        if not p.is_file():
            raise ConfigurationError(f"suite file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"suite file '{p}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigurationError(f"suite file '{p}' must hold a mapping, got {type(data).__name__}")
        data.setdefault("name", p.stem)
        return data
    names = available_suites()
    if s not in names:
        import difflib

        close = difflib.get_close_matches(s, names, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigurationError(
            f"unknown suite '{s}'.{hint} Built-in suites: {', '.join(names)}; or give a path to a suite YAML file"
        )
    data = yaml.safe_load((_suite_dir() / f"{s}.yaml").read_text()) or {}
    data.setdefault("name", s)
    return data


#: Top-level keys of a suite; a ``--set`` key starting with one of them changes the suite,
#: any other key is a run-config override appended to the suite's ``set`` list.
SUITE_KEYS = tuple(Suite.model_fields)


def apply_suite_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``--set`` assignments: suite keys (``seeds=[0]``, ``benchmarks.nyuv2.config.data.root=...``)
    change the suite; any other key (``train.epochs=1``, ``epochs=1``) is a run-config override."""
    out = copy.deepcopy(raw)
    for o in overrides:
        if "=" not in o:
            raise ConfigurationError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got '{o}'")
        head = o.split("=", 1)[0].strip().split(".")[0]
        if head in SUITE_KEYS and head != "name":
            out = apply_override(out, o)
        else:
            out["set"] = [*out.get("set", []), o]
    return out


def load_suite(
    name_or_path: str | os.PathLike | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    seeds: int | None = None,
    roots: dict[str, str] | None = None,
) -> Suite:
    """Read, override and validate a suite.

    Args:
        name_or_path: a built-in suite name, a YAML path, or an already-read dictionary.
        overrides: ``--set KEY=VALUE`` assignments (see :func:`apply_suite_overrides`).
        seeds: ``--seeds K``: run seeds ``0..K-1`` on every benchmark (replaces every seed list).
        roots: ``--root BENCH=PATH``: ``data.root`` of benchmark entry ``BENCH``.

    Raises:
        ConfigurationError: one line per problem, naming the key and the allowed values.
    """
    raw = copy.deepcopy(name_or_path) if isinstance(name_or_path, dict) else read_suite_file(name_or_path)
    raw = apply_suite_overrides(raw, overrides)
    if seeds is not None:
        if seeds < 1:
            raise ConfigurationError(f"--seeds must be ≥ 1, got {seeds}")
        raw["seeds"] = list(range(seeds))
        for entry in (raw.get("benchmarks") or {}).values():
            if isinstance(entry, dict):
                entry.pop("seeds", None)
    for bench, root in (roots or {}).items():
        entries = raw.get("benchmarks") or {}
        if bench not in entries:
            raise ConfigurationError(
                f"--root {bench}=...: the suite has no benchmark '{bench}'; it has {', '.join(entries) or 'none'}"
            )
        entry = entries[bench] if isinstance(entries[bench], dict) else {}
        entry.setdefault("config", {})
        entry["config"] = deep_merge(entry["config"], {"data": {"root": str(root)}})
        entries[bench] = entry
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        msg = format_validation_error(exc, Suite).replace("invalid configuration:", "invalid suite:", 1)
        raise ConfigurationError(msg) from None
    import_plugins(suite.plugins, search=_suite_dirs(name_or_path))
    return suite


def _suite_dirs(name_or_path: object) -> tuple[str, ...]:
    """The suite file's directory and the working directory: where a plugin beside the suite is looked for."""
    dirs = [os.getcwd()]
    if isinstance(name_or_path, (str, os.PathLike)):
        p = Path(name_or_path).expanduser()
        if p.is_file():
            dirs.insert(0, str(p.resolve().parent))
    return tuple(dirs)


def import_plugins(plugins: list[str], search: list[str] | tuple[str, ...] = ()) -> None:
    """Import the suite's plugins and those of ``$MTLENS_PLUGINS`` (:func:`mtlens.registry.import_plugins`);
    ``search``: directories named in the error when a plugin is found there but not importable."""
    _import_plugins(plugin_modules(plugins), search=search, where="plugins")


# ---------------------------------------------------------------------------------------------
# expansion into runs
@dataclass
class RunSpec:
    """One run of a suite: what the store's ``run.json`` says of it, and its validated config."""

    key: str
    label: str
    benchmark: str  # the suite's benchmark entry key
    method: str  # method label
    level: str  # "loss" | "param" | "feature"
    variant: str
    seed: int
    kind: str  # "mtl" | "stl"
    config: RunConfig
    task: str | None = None
    deps: list[str] = field(default_factory=list)  # keys of the STL runs whose results form the baseline
    relpath: str = ""  # run directory relative to the store

    def entry(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "benchmark": self.benchmark,
            "method": self.method,
            "level": self.level,
            "variant": self.variant,
            "seed": self.seed,
            "kind": self.kind,
            "task": self.task,
        }


def _method_levels(m: MethodEntry, levels: Sequence[str], where: str) -> list[str | None]:
    from ..methods import get

    try:
        cls = get(m.name)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    if cls.family == "regularizer":
        raise ConfigurationError(
            f"{where}: '{m.name}' is a regulariser; put it in a variant "
            f"(variants: {{{m.name}: {{regularizers: [{{name: {m.name}}}]}}}}), not in methods"
        )
    if cls.family == "loss":
        if m.levels:
            raise ConfigurationError(f"{where}: '{m.name}' is a loss-level method; it takes no levels")
        return [None]
    wanted = m.levels if m.levels is not None else levels
    ok: list[str | None] = [lv for lv in wanted if lv in cls.levels]
    if not ok:
        raise ConfigurationError(
            f"{where}: '{m.name}' works at level(s) {', '.join(cls.levels)} only, and the suite asks for "
            f"{', '.join(wanted) or 'none'}; add one of them to levels or drop the method"
        )
    if m.levels is not None and len(ok) < len(m.levels):
        bad = [lv for lv in m.levels if lv not in cls.levels]
        raise ConfigurationError(f"{where}: '{m.name}' does not work at level(s) {bad}; it supports {cls.levels}")
    return ok


def _label(method: str, level: str | None, variant: str) -> str:
    s = method + (f" ({level})" if level else "")
    return s if variant == VARIANT_NONE else f"{s} + {variant}"


def expand(suite: Suite, *, device_type: str) -> list[RunSpec]:
    """Every run of ``suite``: STL baselines first, then the multi-task runs (each listing the STL
    runs it needs in ``deps``). Keys are configuration hashes (:func:`mtlens.bench.store.run_key`);
    two runs resolving to the same configuration are an error."""
    from ..tasks.spec import get_benchmark
    from ..train.baseline import stl_cache_key
    from .store import run_key

    mtl: list[RunSpec] = []
    stl: dict[str, RunSpec] = {}
    labels = [m.display for m in suite.methods]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigurationError(f"methods: {dup} appear twice; give each a distinct label (label: ...)")
    for vname, v in suite.variants.items():
        if vname == VARIANT_NONE and v.regularizers:
            raise ConfigurationError("variants.none: the 'none' variant has no regularizers; name it otherwise")
    missing_roots = []
    vcache: dict[str, RunConfig] = {}
    for bkey, entry in suite.benchmarks.items():
        bname = entry.benchmark or bkey
        try:
            spec = get_benchmark(bname)
        except ConfigurationError as exc:
            raise ConfigurationError(f"benchmarks.{bkey}: {exc}") from None
        base: dict[str, Any] = load_preset(entry.preset) if entry.preset else {}
        base = deep_merge(base, suite.base)
        base = deep_merge(base, entry.config)
        base.setdefault("data", {})
        base["data"]["benchmark"] = bname
        if spec.needs_root and not base["data"].get("root"):
            missing_roots.append((bkey, spec))
            continue
        methods = entry.methods if entry.methods is not None else suite.methods
        all_labels = {m.display for m in suite.methods} | {m.display for m in methods}
        bad_ex = [x for x in suite.exclude if x not in all_labels]
        if bad_ex:
            raise ConfigurationError(
                f"exclude: {bad_ex} are not methods of the suite ({', '.join(sorted(all_labels))})"
            )
        bad_ex = [x for x in entry.exclude if x not in all_labels]
        if bad_ex:
            raise ConfigurationError(
                f"benchmarks.{bkey}.exclude: {bad_ex} are not methods of the suite ({', '.join(sorted(all_labels))})"
            )
        excluded = set(suite.exclude) | set(entry.exclude)
        methods = [m for m in methods if m.display not in excluded]
        levels = entry.levels if entry.levels is not None else suite.levels
        seeds = entry.seeds if entry.seeds is not None else suite.seeds
        vnames = entry.variants if entry.variants is not None else list(suite.variants)
        by_label = {m.display: m for m in methods}
        unknown_hp = [k for k in entry.method_hparams if k not in all_labels]
        if unknown_hp:
            raise ConfigurationError(
                f"benchmarks.{bkey}.method_hparams: {unknown_hp} are not methods of the suite "
                f"({', '.join(sorted(all_labels))})"
            )
        if not methods:
            raise ConfigurationError(
                f"benchmarks.{bkey}: exclude leaves no method to run (excluded: {', '.join(sorted(excluded))}); "
                "exclude fewer methods, or delete the benchmark"
            )
        n_before = len(mtl)
        for seed in seeds:
            for vname in vnames:
                v = suite.variants[vname]
                targets = v.methods if v.methods is not None else (list(by_label) if vname == VARIANT_NONE else ["ew"])
                targets = [t for t in targets if t not in excluded]
                unknown = [t for t in targets if t not in by_label]
                if unknown:
                    raise ConfigurationError(
                        f"variants.{vname}.methods: {unknown} not among the methods of benchmark '{bkey}' "
                        f"({', '.join(by_label)})"
                    )
                for mlabel in targets:
                    m = by_label[mlabel]
                    for level in _method_levels(m, levels, f"benchmarks.{bkey}: method '{mlabel}'"):
                        d = copy.deepcopy(base)
                        d.pop("name", None)
                        hp = {**m.hparams, **entry.method_hparams.get(mlabel, {})}
                        d["method"] = {"name": m.name, "hparams": hp, "level": level}
                        d["regularizers"] = [r.model_dump() for r in v.regularizers]
                        d["loss_transform"] = v.loss_transform
                        d.setdefault("train", {})["seed"] = seed
                        d["baseline"] = "auto" if suite.stl else None
                        d["stl_task"] = None
                        d["out_dir"] = None
                        for o in suite.set:
                            d = apply_override(d, o)
                        d["name"] = f"{suite.name}/{bkey}"
                        cfg = _validate(d, f"benchmarks.{bkey} method '{mlabel}' level {level or 'loss'} "
                                           f"variant '{vname}' seed {seed}", vcache)
                        spec_ = RunSpec(
                            key=run_key(cfg, device_type),
                            label=_label(mlabel, level, vname),
                            benchmark=bkey,
                            method=mlabel,
                            level=level or "loss",
                            variant=vname,
                            seed=cfg.train.seed,
                            kind="mtl",
                            config=cfg,
                        )
                        spec_.relpath = f"runs/{spec_.key}"
                        if suite.stl:
                            for t in spec.task_names:
                                sd = stl_settings({**cfg.model_dump(mode="json"), "stl_task": t, "out_dir": None})
                                scfg = _validate(sd, f"benchmarks.{bkey} STL baseline of '{t}' seed {seed}", vcache)
                                skey = stl_cache_key(scfg, device_type)
                                if skey not in stl:
                                    stl[skey] = RunSpec(
                                        key=skey,
                                        label=f"STL {t}",
                                        benchmark=bkey,
                                        method="stl",
                                        level="loss",
                                        variant=VARIANT_NONE,
                                        seed=scfg.train.seed,
                                        kind="stl",
                                        task=t,
                                        config=scfg,
                                        relpath=f"baselines/{spec.name}-{t}-{skey}",
                                    )
                                spec_.deps.append(skey)
                        mtl.append(spec_)
        if len(mtl) == n_before:  # e.g. only variants whose methods are all excluded
            raise ConfigurationError(
                f"benchmarks.{bkey}: no run to do: none of its variants ({', '.join(vnames)}) applies to a method it "
                f"runs ({', '.join(by_label)}); add 'none: {{}}' to variants, or change the variants' methods"
            )
    if missing_roots:
        parts = [f"{k} (benchmark '{s.name}')" for k, s in missing_roots]
        flags = " ".join(f"--root {k}=PATH" for k, _ in missing_roots)
        raise ConfigurationError(
            f"suite '{suite.name}' needs data that is not bundled with mtlens: {', '.join(parts)}. Give the data "
            f"directories with `mtlens bench {suite.name} {flags}` (layouts and downloads: "
            "`mtlens datasets NAME` and docs/benchmarks-data.md)"
        )
    runs = [*stl.values(), *mtl]
    seen: dict[str, RunSpec] = {}
    for r in runs:
        if r.key in seen:
            raise ConfigurationError(
                f"runs '{seen[r.key].label}' and '{r.label}' of benchmark '{r.benchmark}' (seed {r.seed}) resolve to "
                "the same configuration; remove the duplicate method or variant"
            )
        seen[r.key] = r
    return runs


def _validate(d: dict[str, Any], where: str, cache: dict[str, RunConfig] | None = None) -> RunConfig:
    """Validate a run config. Configurations that differ only in ``train.seed`` are validated once
    (the engine dry run costs ~10 ms) and copied with the seed changed."""
    import json

    seed = (d.get("train") or {}).get("seed", 0)
    ck = None
    if cache is not None:
        probe = copy.deepcopy(d)
        probe.setdefault("train", {}).pop("seed", None)
        ck = json.dumps(probe, sort_keys=True, default=str)
        if ck in cache:
            cfg = cache[ck].model_copy(deep=True)
            cfg.train.seed = seed
            return cfg
    try:
        cfg = RunConfig.model_validate(d)
    except ValidationError as exc:
        raise ConfigurationError(f"{where}: {format_validation_error(exc, RunConfig)}") from None
    except MissingDependencyError as exc:
        method = (d.get("method") or {}).get("name")
        raise MissingDependencyError(
            f"{where}: {exc}; or leave the method out with --set exclude=[{method}]"
        ) from None
    if cache is not None and ck is not None:
        cache[ck] = cfg
    return cfg


def resolved_yaml(suite: Suite) -> str:
    """The suite after overrides, as YAML (written to ``DIR/suite.yaml``)."""
    return yaml.safe_dump(suite.model_dump(mode="json", exclude_none=True), sort_keys=False)

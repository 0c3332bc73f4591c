"""The ``mtlens`` command line: a thin layer that parses, validates and calls :mod:`mtlens.train`.

Every error is printed as one line (no traceback); a bad configuration exits with code 2,
other mtlens errors (missing data, corrupt checkpoint, non-finite training) with code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..diagnose.spectra import DEFAULT_SPECTRA_METHOD
from ..errors import ConfigurationError, MTLensError

if TYPE_CHECKING:
    from ..tasks.spec import BenchmarkSpec

app = typer.Typer(
    name="mtlens",
    help="mtlens: multi-task learning optimisation through representation-level task saliency.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

out = Console()
err = Console(stderr=True)


@app.callback()
def _plugins(
    plugin: Annotated[
        list[str] | None,
        typer.Option("--plugin", "-p", help="a module to import first: your own benchmarks, model presets and "
                     "methods register themselves there (repeatable; also $MTLENS_PLUGINS=MOD1,MOD2; bench workers "
                     "import them too)"),
    ] = None,
) -> None:
    """mtlens: multi-task learning optimisation through representation-level task saliency."""
    import os

    from ..registry import PLUGINS_ENV, import_plugins, plugin_modules

    modules = plugin_modules(plugin or [])
    if plugin:  # spawned bench workers inherit the environment: they import the same modules
        os.environ[PLUGINS_ENV] = ",".join(modules)
    _guard(lambda: import_plugins(modules, search=[os.getcwd()], where="--plugin"))


def _fail(exc: BaseException) -> None:
    # One line, except a data error that lays out the expected directory tree: its lines are kept.
    # Escaped: a message's square brackets (`pip install 'mtlens[nash]'`) are text, not rich markup.
    text = str(exc).strip()
    if "\nExpected layout" in text:
        msg = "\n".join(ln.rstrip() for ln in text.splitlines())
    else:
        msg = " ".join(text.split())
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1)


def _guard(fn):
    """Run ``fn``; turn mtlens errors into one line and an exit code."""
    try:
        return fn()
    except typer.Exit:
        raise
    except MTLensError as exc:
        _fail(exc)
    except OSError as exc:  # a file the command reads or writes: one line naming it (never a traceback)
        where = f" '{exc.filename}'" if exc.filename else ""
        _fail(MTLensError(f"{exc.strerror or exc}{where}; check the path and its permissions"))
    except KeyboardInterrupt:
        err.print("interrupted")
        _exit_interrupted()


def _exit_interrupted() -> NoReturn:
    """Exit with status 130, the status docs/cli.md promises for Ctrl-C, under ``python -m`` too.

    CPython ends a ``python -m`` process by killing it with SIGINT (status -2, not 130) when a ``KeyboardInterrupt``
    ever ended the code of a string ``exec``/``eval``, even one the program caught: ``run_eval_code_obj`` sets
    ``_PyRuntime.signals.unhandled_keyboard_interrupt`` and nothing clears it, and ``Py_RunMain`` honours it after
    ``-m`` (bpo-41602). dataclasses and ``namedtuple`` build their methods with a string ``exec``, so a Ctrl-C during an
    import can land there (seen in CI: the message of an interrupted run, then status -2). Every string eval resets
    the flag when it starts, so one empty eval makes the exit status ours. The ``mtlens`` script is a file run, which
    exits through ``Py_Exit`` without that check."""
    exec("", {})  # resets the flag (see above); runs nothing
    raise typer.Exit(130) from None


def _interrupted(out_dir: Path, stl_all: bool) -> NoReturn:
    """The Ctrl-C message of ``mtlens train``: offer ``--resume`` only when there is something to resume."""
    found = list(out_dir.glob("stl-*/checkpoint.pt")) if stl_all else []
    if (out_dir / "checkpoint.pt").is_file() or found:
        err.print(f"interrupted; continue with: mtlens train --out {escape(str(out_dir))} --resume",
                  highlight=False, soft_wrap=True)
    else:
        err.print(
            f"interrupted before the first checkpoint of {escape(str(out_dir))} was written (one is written at the "
            "end of every epoch, and every checkpoint.every_steps steps when set): there is nothing to resume; "
            "start the run again without --resume",
            highlight=False, soft_wrap=True,
        )
    _exit_interrupted()


# ---------------------------------------------------------------------------------------------
TRAIN_EPILOG = """
[bold]Examples[/]

  mtlens train --preset quick-multimnist
      Rep-MTL (EW + rep_mtl) on MultiMNIST, with single-task baselines trained first
      (or reused from the cache) and Δ in three named conventions.

  mtlens train --preset quick-multimnist --set method.name=upgrad --set method.level=feature \\
      --set regularizers=[] --out runs/upgrad

  mtlens train --config my.yaml --set optim.lr=3e-4 --set regularizers.0.hparams.lambda_csa=0.5

  mtlens train --preset quick-scenes --set stl_task=all --out runs/stl
      one single-task model per task; runs/stl/baseline.json can then be given as baseline=PATH

  mtlens train --out runs/upgrad --resume
      continue a killed run from its last checkpoint (same config; exact on CPU)

Presets: mtlens presets.  Keys and values: docs/cli.md.
"""


@app.command(epilog=TRAIN_EPILOG)
def train(
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="bundled preset (see `mtlens presets`)")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config file (merged over the preset)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override KEY=VALUE (YAML value); repeatable")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="output directory (default runs/<name>-<method>-<time>)"),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its checkpoint")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no progress bar or summary; print the results path")
    ] = False,
) -> None:
    """Train a multi-task model (or single-task baselines), test the best epoch, write results.json."""
    from ..train import interrupt, load_config, run
    from ..train.build import default_out_dir

    def go():
        overrides = list(set_ or [])
        if resume and preset is None and config is None:
            if out_dir is None:
                raise ConfigurationError("--resume needs --out DIR (the run to continue)")
            saved = out_dir / "config.yaml"
            if not saved.is_file():
                raise ConfigurationError(
                    f"'{saved}' does not exist: '{out_dir}' holds no run to resume; start one without --resume"
                )
            import yaml

            cfg = load_config(base=yaml.safe_load(saved.read_text()), overrides=overrides, out_dir=out_dir)
        else:
            cfg = load_config(preset=preset, config_file=config, overrides=overrides, out_dir=out_dir)
        if cfg.out_dir is None:  # fixed now, so that an interruption can name it
            cfg = cfg.model_copy(update={"out_dir": str(default_out_dir(cfg))})
        run_dir = Path(cfg.out_dir) if cfg.out_dir is not None else default_out_dir(cfg)
        if cfg.stl_task is not None and not quiet:
            err.print(
                "[dim]single-task mode: plain task loss (method ew, no regularizers, no loss transform, "
                "no diagnostics)[/]"
            )
        try:
            with interrupt.catching():  # a Ctrl-C Python drops (inside an import's callback) still stops the run
                results = run(cfg, resume=resume, quiet=quiet, console=err)
        except KeyboardInterrupt:
            _interrupted(run_dir, cfg.stl_task == "all")
        if results.get("kind") == "stl-baseline":
            path = Path(results["source"])
            if quiet:  # for scripts: the path on one line, whatever the terminal's width (no folding, no markup)
                out.print(str(path), soft_wrap=True, markup=False, highlight=False)
                return
            from ..bench.console import metrics_table

            directions = _directions(cfg.data.benchmark)
            out.print(metrics_table("single-task baselines: test metrics", results["metrics"]["test"], directions))
            out.print(f"[dim]baseline file: {path} (use it with --set baseline={path})[/]")
            return
        if quiet:  # for scripts, as above
            out.print(str(Path(results["out_dir"]) / "results.json"), soft_wrap=True, markup=False, highlight=False)
            return
        from ..bench.console import print_results

        print_results(results, out)

    _guard(go)


def _directions(benchmark: str) -> dict[str, dict[str, bool]]:
    from ..tasks.spec import get_benchmark

    return get_benchmark(benchmark).metric_directions()


# ---------------------------------------------------------------------------------------------
EVAL_EPILOG = """
[bold]Examples[/]

  mtlens eval runs/demo/best.pt
  mtlens eval runs/demo --split val
  mtlens eval runs/demo/checkpoint.pt --set data.root=/data/nyuv2 --json
"""


@app.command("eval", epilog=EVAL_EPILOG)
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="best.pt, checkpoint.pt, or a run directory (uses best.pt)")],
    split: Annotated[str, typer.Option("--split", help="train, val or test")] = "test",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="override a stored config key (e.g. data.root=...)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Evaluate saved weights on a split, with the config stored in the file."""
    from ..train import evaluate_checkpoint

    def go():
        res = evaluate_checkpoint(checkpoint, split, overrides=list(set_ or []))
        if as_json:
            from ..train.records import dumps

            print(dumps(res, indent=2))  # strict JSON: non-finite values as "inf"/"nan" strings
            return
        from ..bench.console import delta_table, metrics_table

        directions = _directions_from_file(res)
        out.print(f"{split} metrics of {res['checkpoint']} (epoch {res['epoch']})")
        out.print(metrics_table(None, res["metrics"], directions))
        table = delta_table(res.get("delta"), split, "baseline.json")
        if table is not None:
            out.print(table)

    _guard(go)


def _directions_from_file(res: dict[str, Any]) -> dict[str, dict[str, bool]]:
    from ..train import load_checkpoint
    from ..train.checkpoint import WEIGHTS_FORMAT

    cfg = load_checkpoint(res["checkpoint"], expect=WEIGHTS_FORMAT)["config"]
    d = _directions(cfg["data"]["benchmark"])
    return {t: d[t] for t in res["tasks"]}


# ---------------------------------------------------------------------------------------------
@app.command(
    epilog="[bold]Examples[/]\n\n  mtlens methods\n\n  mtlens methods --family gradient\n\n  mtlens methods --json"
)
def methods(
    family: Annotated[str | None, typer.Option("--family", help="loss, gradient or regularizer")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON (with defaults)")] = False,
) -> None:
    """List the registered methods: name, family, levels, reference."""
    from ..methods import describe

    def go():
        rows = describe()
        if family is not None:
            from ..methods import available

            keep = set(available(family))
            rows = [r for r in rows if r["name"] in keep]
        if as_json:
            from ..train.records import dumps

            out.print_json(dumps(rows, default=str))
            return
        table = Table(title=f"{len(rows)} methods", title_justify="left")
        table.add_column("name", no_wrap=True)
        for col in ("family", "levels", "reference"):
            table.add_column(col, overflow="fold")
        for r in rows:
            levels = ", ".join(r["levels"]) if r["levels"] else "— (one backward)"
            notes = []
            if r.get("loss_transform"):
                notes.append(f"loss transform {r['loss_transform']}")
            if r.get("needs_extra_forward"):
                notes.append("extra forward")
            name = r["name"] + (f" [dim]({'; '.join(notes)})[/]" if notes else "")
            table.add_row(name, r["family"], levels, r["reference"])
        out.print(table)

    _guard(go)


# ---------------------------------------------------------------------------------------------
DATASETS_EPILOG = """
[bold]Examples[/]

  mtlens datasets
  mtlens datasets nyuv2
  mtlens datasets --check
  mtlens datasets --check --root nyuv2=/data/nyuv2 --root cityscapes=/data/cityscapes
"""


@app.command(epilog=DATASETS_EPILOG)
def datasets(
    name: Annotated[str | None, typer.Argument(help="show one benchmark in detail (metrics, options, source)")] = None,
    check: Annotated[
        bool, typer.Option("--check", help="read every sample of each benchmark's splits (finds truncated files); "
                           "exit code 1 when data was found broken")
    ] = False,
    root: Annotated[
        list[str] | None, typer.Option("--root", help="BENCHMARK=PATH of a data directory to check")
    ] = None,
) -> None:
    """List the benchmarks: tasks, default model, whether data is bundled; or one benchmark in detail."""
    from ..tasks.spec import available_benchmarks, get_benchmark

    def go():
        roots = {}
        for item in root or []:
            if "=" not in item:
                raise ConfigurationError(f"--root expects BENCHMARK=PATH, got '{item}'")
            k, v = item.split("=", 1)
            roots[k.strip()] = v
        unknown = [k for k in roots if k not in available_benchmarks()]
        if unknown:
            raise ConfigurationError(f"--root: unknown benchmark(s) {unknown}; available: {available_benchmarks()}")
        bad: list[bool] = []  # --check: a benchmark whose data was read and found broken
        if name is not None:
            spec = get_benchmark(name)
            from rich.markup import escape

            out.print(f"[bold]{spec.name}[/]: {escape(spec.description)}")  # "mtlens[graph]" is not markup
            out.print(f"source: {escape(spec.source)}")
            out.print(
                f"input channels {spec.in_channels}; {'dense' if spec.dense else 'vector'} tasks; "
                f"{'multi-input (each task its own images)' if spec.multi_input else 'single input'}; "
                f"default model {spec.default_model}"
            )
            table = Table(title="tasks and metrics (↑ higher is better, ↓ lower)", title_justify="left")
            for col in ("task", "kind", "outputs", "metrics"):
                table.add_column(col)
            for t, ts in spec.tasks.items():
                table.add_row(
                    t,
                    ts.kind,
                    str(ts.out_channels),
                    ", ".join(
                        f"{m} {'↑' if hib else '↓'}" + (f" ({ts.units[m]})" if m in ts.units else "")
                        for m, hib in ts.metrics.items()
                    ),
                )
            out.print(table)
            opts = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "none"
            out.print(f"options (--set data.options.KEY=VALUE): {opts}")
            status = spec.data_status() or "no root needed"
            if check:
                status, ok = _availability(spec, roots.get(name))
                bad.append(not ok)
            out.print("data: " + status, highlight=False)
            if any(bad):
                raise typer.Exit(1)
            return
        table = Table(title="benchmarks (details: mtlens datasets NAME)", title_justify="left")
        table.add_column("name", no_wrap=True)
        for col in ("tasks", "model", "data"):
            table.add_column(col, overflow="fold")
        for bname in available_benchmarks():
            spec = get_benchmark(bname)
            tasks = ", ".join(spec.tasks)
            if spec.multi_input:
                tasks += " [dim](multi-input)[/]"
            status = spec.data_status() or "no root needed"
            if check:
                status, ok = _availability(spec, roots.get(bname))
                bad.append(not ok)
            table.add_row(bname, tasks, spec.default_model, status)
        out.print(table)
        if any(bad):
            raise typer.Exit(1)

    _guard(go)


def _availability(spec: BenchmarkSpec, root: str | None) -> tuple[str, bool]:
    """``(status, ok)`` of one benchmark: every sample of every split is read (a truncated or
    corrupt file anywhere is found), ``ok`` is False only when data was found and is broken."""
    from ..errors import DataError, MissingDependencyError

    if spec.needs_root and root is None:
        return "needs data.root (pass --root NAME=PATH to check)", True
    status = spec.data_status()
    if root is None and status is not None:
        return status, True

    def first_line(exc: BaseException) -> str:
        return escape(" ".join(str(exc).split("\nExpected layout")[0].split())[:300])

    try:
        splits = spec.datasets(root=root, seed=0)
    except (DataError, MissingDependencyError, ConfigurationError, OSError) as exc:
        return "[red]unavailable[/]: " + first_line(exc), False

    def parts(ds):
        return list(ds.items()) if isinstance(ds, dict) else [(None, ds)]

    for split in ("train", "val", "test"):
        for task, ds in parts(splits[split]):
            if getattr(ds, "validated_on_load", False):  # QM9: every row was checked when processed
                continue
            for i in range(len(ds)):
                try:
                    ds[i]
                except (MTLensError, OSError, ValueError, RuntimeError) as exc:
                    where = f"{split}{'/' + task if task else ''} sample {i}"
                    return f"[red]unavailable[/]: {where}: " + first_line(exc), False

    def n(ds):
        return sum(len(d) for d in ds.values()) if isinstance(ds, dict) else len(ds)

    counts = "/".join(str(n(splits[s])) for s in ("train", "val", "test"))
    return f"[green]available[/] {counts} (train/val/test; every sample read)", True


# ---------------------------------------------------------------------------------------------
@app.command(epilog="[bold]Examples[/]\n\n  mtlens presets\n\n  mtlens presets --show quick-multimnist")
def presets(
    show: Annotated[str | None, typer.Option("--show", help="print one preset's YAML")] = None,
) -> None:
    """List the bundled training presets (papers' settings and quick CPU runs)."""
    from ..train.config import available_presets, load_preset, preset_path

    def go():
        if show is not None:
            load_preset(show)  # validates the name
            # the file itself, byte for byte: valid YAML to redirect into my.yaml (rich would wrap lines)
            sys.stdout.write(preset_path(show).read_text())
            sys.stdout.flush()
            return
        table = Table(title="presets (details: mtlens presets --show NAME)", title_justify="left")
        table.add_column("name", no_wrap=True)
        for col in ("benchmark", "model", "method", "epochs", "batch"):
            table.add_column(col, overflow="fold")
        for name in available_presets():
            d = load_preset(name)
            method = (d.get("method") or {}).get("name", "ew")
            level = (d.get("method") or {}).get("level")
            regs = [r["name"] for r in d.get("regularizers") or []]
            train_d = d.get("train") or {}
            table.add_row(
                name,
                d["data"]["benchmark"],
                (d.get("model") or {}).get("preset") or "(default)",
                method + (f" ({level})" if level else "") + "".join(f" + {r}" for r in regs),
                str(train_d.get("epochs", "")),
                str(train_d.get("batch_size", "")),
            )
        out.print(table)

    _guard(go)


# ---------------------------------------------------------------------------------------------
DIAGNOSE_EPILOG = """
[bold]Examples[/]

  mtlens diagnose runs/demo
  mtlens diagnose runs/demo --alpha weightwatcher --out plots/demo
  mtlens diagnose runs/demo --alpha none
"""


@app.command(epilog=DIAGNOSE_EPILOG)
def diagnose(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (with log.jsonl)")],
    plots_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="where to write PNGs (default RUN_DIR/plots)")
    ] = None,
    alpha: Annotated[
        str, typer.Option("--alpha", help="power-law α of the best weights: mle (the library's default, "
                          "docs/diagnostics.md), weightwatcher or none")
    ] = DEFAULT_SPECTRA_METHOD,
) -> None:
    """Plot FD, GDS, GMS, task weights, losses and val metrics over training; power-law α per component."""

    def go():
        from ..bench.plots import plot_alpha, plot_run
        from ..train.records import read_jsonl

        if alpha not in ("mle", "weightwatcher", "none"):
            raise ConfigurationError(f"--alpha {alpha!r}; choose mle, weightwatcher or none")
        log = run_dir / "log.jsonl"
        if not log.is_file():
            raise ConfigurationError(f"'{log}' does not exist; give the directory of a run written by `mtlens train`")
        records = read_jsonl(log)
        dest = plots_dir or run_dir / "plots"
        written, notes = plot_run(records, dest, title=run_dir.name)
        alpha_summary = None
        if alpha != "none":
            alpha_summary, where = _alpha(run_dir, alpha)
            if alpha_summary is not None:
                written.append(plot_alpha(alpha_summary, dest / "alpha.png", alpha))
                from ..train.records import dumps

                (dest / "alpha.json").write_text(
                    dumps({"method": alpha, "weights": where, "alpha": alpha_summary}, indent=2)
                )
            else:
                notes.append(where)
        epochs = [r for r in records if r.get("type") == "epoch"]
        steps = [r for r in records if r.get("type") == "step"]
        out.print(f"{run_dir}: {len(steps)} step records, {len(epochs)} epochs")
        diag = [r for r in steps if any(k.startswith("diag/") for k in r)]
        if diag:
            last = diag[-1]
            table = Table(title=f"diagnostics (first and last of {len(diag)} monitored steps)", title_justify="left")
            table.add_column("identifier")
            table.add_column(f"step {diag[0]['global_step']}", justify="right")
            table.add_column(f"step {last['global_step']}", justify="right")
            for k in [k for k in last if k.startswith("diag/") and "grad_norm/" not in k]:
                table.add_row(k.removeprefix("diag/"), f"{diag[0].get(k, float('nan')):.4f}", f"{last[k]:.4f}")
            out.print(table)
        if alpha_summary is not None:
            table = Table(title=f"power-law α per component ({alpha})", title_justify="left")
            table.add_column("component")
            table.add_column("α (median over layers)", justify="right")
            for comp, a in alpha_summary.items():
                table.add_row(comp, f"{a:.2f}")
            out.print(table)
            out.print("[dim]reading (Rep-MTL Sec. 4.3): α in [2, 4] well trained, α > 6 under-trained[/]")
        for p in written:
            out.print(f"wrote {p}")
        for n in notes:
            out.print(f"[dim]note: {n}[/]")

    _guard(go)


def _alpha(run_dir: Path, method: str) -> tuple[dict[str, Any] | None, str]:
    """α per component of the run's best (else latest) weights; (None, reason) when there are none."""
    from ..diagnose import power_law_alpha
    from ..train.evaluate import load_model

    for name in ("best.pt", "checkpoint.pt"):
        f = run_dir / name
        if f.is_file():
            break
    else:
        return None, "no best.pt/checkpoint.pt in the run directory: power-law α skipped"
    model, _ = load_model(f)
    report = power_law_alpha(model, method=method)
    return report.summary, str(f)


# ---------------------------------------------------------------------------------------------
BENCH_EPILOG = """
[bold]Examples[/]

  mtlens bench quick
      the built-in quick suite (MultiMNIST + synthetic scenes, 13 methods, Rep-MTL ablation)
      into bench/quick; rerunning skips what is done and resumes what was interrupted

  mtlens bench --list

  mtlens bench quick --workers 2 --seeds 1 --set train.epochs=2 --out bench/smoke

  mtlens bench efficiency-paper --root nyuv2=/data/nyuv2 --root cityscapes=/data/cityscapes \\
      --root metagraspnet=/data/mgn --executor ray --address auto

  mtlens bench my-suite.yaml --set benchmarks.multimnist.seeds=[0,1,2]

  PYTHONPATH=. mtlens bench my-suite.yaml
      a suite on your own benchmark, model or method: `plugins: [my_mtl]` in the suite names the
      module that registers them (docs/benchmark.md, "Your own benchmark, model and method")

Suite format, built-in suites, store layout: docs/benchmark.md.
"""


@app.command(epilog=BENCH_EPILOG)
def bench(
    suite: Annotated[str | None, typer.Argument(help="a built-in suite (see --list) or a suite YAML file")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="results store (default bench/<suite name>)")
    ] = None,
    executor: Annotated[str, typer.Option("--executor", "-e", help="local or ray")] = "local",
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", help="local: worker processes (1 = in this process; default cores ÷ the "
                     "suite's CPUs per run, or 1 for GPU suites); ray: runs in flight (default: as many as the "
                     "cluster's CPUs allow)"),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads per local worker (default cores // workers)")
    ] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="run seeds 0..K-1 on every benchmark")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="KEY=VALUE: a suite key (seeds=[0], benchmarks.X....) or a run-config "
                     "key for every run (train.epochs=2); repeatable"),
    ] = None,
    root: Annotated[
        list[str] | None, typer.Option("--root", help="BENCHMARK=PATH: data directory of a suite benchmark")
    ] = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster address (ray executor)")] = None,
    list_: Annotated[bool, typer.Option("--list", help="list the built-in suites")] = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="skip writing DIR/report")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-run lines; print the report path")] = False,
) -> None:
    """Run a benchmark suite (methods × levels × variants × seeds, plus STL baselines) into a results store,
    then print the leaderboard and where the report is."""

    def go():
        from ..bench import describe_suites, load_suite, run_suite

        if list_:
            table = Table(title="built-in suites (run: mtlens bench NAME)", title_justify="left")
            table.add_column("name", no_wrap=True)
            table.add_column("what", overflow="fold")
            for r in describe_suites():
                from rich.markup import escape

                table.add_row(r["name"], escape(r["description"]))
            out.print(table)
            return
        if suite is None:
            raise ConfigurationError("give a suite (mtlens bench quick) or --list")
        roots = {}
        for item in root or []:
            if "=" not in item:
                raise ConfigurationError(f"--root expects BENCHMARK=PATH, got '{item}'")
            k, v = item.split("=", 1)
            roots[k.strip()] = v
        s = load_suite(suite, list(set_ or []), seeds=seeds, roots=roots)
        dest = out_dir or Path("bench") / s.name
        total = {"n": 0}

        def progress(event: str, e: dict) -> None:
            if quiet:
                return
            what = f"{e['benchmark']} seed {e['seed']}: {e['label']}"
            if event == "start":
                total["n"] += 1
                err.print(f"[dim]start[/] {what}", highlight=False)
            elif event == "done":
                err.print(f"[green]done[/]  {what} ({e['wall_s']:.1f} s)", highlight=False)
            else:
                err.print(f"[red]failed[/] {what}: {e['error']}", highlight=False, soft_wrap=True)

        try:
            summary = run_suite(s, dest, executor=executor, workers=workers, threads=threads, address=address,
                                progress=progress)
        except KeyboardInterrupt:
            err.print("interrupted; rerun the same command to continue: finished runs are kept, interrupted ones "
                      "resume from their last checkpoint", highlight=False, soft_wrap=True)
            _exit_interrupted()
        counts = ", ".join(f"{n} {k}" for k, n in summary.counts.items())
        if not quiet:
            err.print(f"suite '{s.name}': {counts}; {summary.skipped} already done before this run; "
                      f"{summary.wall_s:.0f} s", highlight=False)
        report_path = None
        if not no_report:
            report_path = _bench_report(summary.out, quiet, reuse=not summary.ran)
        if quiet:
            out.print(str(report_path or summary.out), soft_wrap=True, markup=False, highlight=False)
        else:
            out.print(f"results store: {summary.out}", soft_wrap=True)
            if report_path is not None:
                out.print(f"report: {report_path} (report.md, CSV tables and PNG figures beside it)", soft_wrap=True)
        if summary.failed or summary.counts.get("failed"):
            failed = [e for e in _index_runs(summary.out) if e["status"] == "failed"]
            for e in failed[:10]:
                err.print(f"[red]failed[/] {e['benchmark']} seed {e['seed']}: {e['label']}: {e['error']}",
                          highlight=False, soft_wrap=True)
            err.print(f"{len(failed)} run(s) failed (tracebacks in {summary.out}/index.json and each run.json); "
                      "rerun the same command to retry them", highlight=False, soft_wrap=True)
            raise typer.Exit(1)

    _guard(go)


def _index_runs(store: Path) -> list[dict]:
    from ..bench import load_index

    return load_index(store)["runs"]


def _bench_report(store: Path, quiet: bool, reuse: bool = False) -> Path:
    """Write the report (mtlens.bench.report) and print each benchmark's leaderboard; return report.html.

    ``write_report`` keeps a report whose fingerprint (the store's files and the report code) is unchanged; with
    ``reuse`` (no run ran this time) that is said. A report written by another version of mtlens is rewritten (the
    index's modification time alone, checked here before, kept it)."""
    from ..bench.report import leaderboard_renderables, write_report

    html = store / "report" / "report.html"
    before = html.stat().st_mtime_ns if html.is_file() else None
    path = write_report(store) / "report.html"
    if reuse and not quiet and before is not None and path.stat().st_mtime_ns == before:
        err.print("[dim]nothing new in the store: the report is up to date[/]")
    if not quiet:
        # a pipe or CI log: rich would wrap at 80 columns and break numbers over lines
        console = out if out.is_terminal else Console(width=max(out.width, 160))
        for renderable in leaderboard_renderables(store):  # one print each: rich joins texts on one line
            console.print(renderable)
    return path


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    sys.exit(app())

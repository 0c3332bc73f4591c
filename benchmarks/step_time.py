"""Step time of mtlens's engine against a plain PyTorch loop and TorchJD, as ratios.

Every timing is a median from ``torch.utils.benchmark`` measured in the same run as its
baseline (the plain loop ``sum(losses).backward()``), so ratios are comparable on a noisy,
shared machine. Writes a markdown report (``--out``) with the exact command.

    python benchmarks/step_time.py --out /tmp/step_time.md   # not docs/benchmarks.md: run_all.py writes that page
    python benchmarks/step_time.py --workloads lenet --methods ew,upgrad,mgda --no-torchjd   # the report on stdout

Workloads:
  resnet18: ResNet-18 encoder (timm, random init) + 3 light dense heads (13-class segmentation,
            depth, normals), input 3×64×64, batch 8.
  lenet:    LeNet MultiMNIST encoder + 2 linear heads, input 1×36×36, batch 256.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from mtlens.engine import mtl_backward
from mtlens.methods import available, create, get
from mtlens.models._torchvision_shim import ensure_torchvision_importable

ensure_torchvision_importable()  # PyPI's CUDA torchvision with a CPU torch: before timm imports it

TORCHJD = {  # our name -> (TorchJD class name, kwargs)
    "upgrad": ("UPGrad", {}),
    "dualproj": ("DualProj", {}),
    "mgda": ("MGDA", {}),
    "pcgrad": ("PCGrad", {}),
    "cagrad": ("CAGrad", {"c": 0.5}),
    "imtl_g": ("IMTLG", {}),
    "aligned_mtl": ("AlignedMTL", {}),
    "config": ("ConFIG", {}),
    "gradvac": ("GradVac", {}),
    "fairgrad": ("FairGrad", {"alpha": 1.0}),
    "rgw": ("Random", {}),
}


class LightHead(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, c_out, 1))


class ResNetEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        import timm

        self.body = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(4,))

    def forward(self, x):
        return self.body(x)[0]


class LeNetEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 10, 5), nn.Conv2d(10, 20, 5), nn.Linear(20 * 6 * 6, 50)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.c1(x), 2))
        x = F.relu(F.max_pool2d(self.c2(x), 2))
        return F.relu(self.fc(x.flatten(1)))


def make_workload(name: str):
    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        enc = ResNetEncoder()
        heads = nn.ModuleDict({"seg": LightHead(512, 13), "depth": LightHead(512, 1), "normal": LightHead(512, 3)})
        x = torch.randn(8, 3, 64, 64, generator=g)
        seg_t = torch.randint(0, 13, (8, 64, 64), generator=g)
        depth_t = torch.rand(8, 1, 64, 64, generator=g)
        normal_t = F.normalize(torch.randn(8, 3, 64, 64, generator=g), dim=1)

        def forward():
            z = enc(x)
            up = {t: F.interpolate(h(z), size=(64, 64), mode="bilinear", align_corners=False)
                  for t, h in heads.items()}
            losses = {
                "seg": F.cross_entropy(up["seg"], seg_t),
                "depth": (up["depth"] - depth_t).abs().mean(),
                "normal": 1 - F.cosine_similarity(F.normalize(up["normal"], dim=1), normal_t, dim=1).mean(),
            }
            return z, losses
    elif name == "lenet":
        enc = LeNetEncoder()
        heads = nn.ModuleDict({"left": nn.Linear(50, 10), "right": nn.Linear(50, 10)})
        x = torch.randn(256, 1, 36, 36, generator=g)
        yl, yr = torch.randint(0, 10, (256,), generator=g), torch.randint(0, 10, (256,), generator=g)

        def forward():
            z = enc(x)
            return z, {"left": F.cross_entropy(heads["left"](z), yl), "right": F.cross_entropy(heads["right"](z), yr)}
    else:
        raise SystemExit(f"unknown workload {name}")
    params = list(enc.parameters()) + list(heads.parameters())
    return enc, heads, params, forward


def timer(fn, min_run_time: float) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def run(workload: str, methods: list[str], min_run_time: float, with_torchjd: bool, jacobian: str,
        repeats: int = 2):
    enc, heads, params, forward = make_workload(workload)

    def zero():
        for p in params:
            p.grad = None

    def plain():
        zero()
        _, losses = forward()
        sum(losses.values()).backward()

    def engine_step(m, level):
        def step():
            zero()
            z, losses = forward()
            mtl_backward(losses, features=z, shared_params=enc.parameters(), method=m, level=level,
                         jacobian=jacobian)
        return step

    rows = []
    bases = []
    for name in methods:
        cls = get(name)
        kwargs = {"seed": 0} if "seed" in _init_args(cls) else {}
        levels = [None] if cls.family == "loss" else list(cls.levels)
        for level in levels:
            try:
                m = create(name, **kwargs)
                step = engine_step(m, level)
                step()  # warm-up, also surfaces configuration errors
                # alternate method and plain loop; the ratio is the median of adjacent pairs
                ts, ps = [], []
                for _ in range(repeats):
                    ts.append(timer(step, min_run_time))
                    ps.append(timer(plain, min_run_time))
            except Exception as exc:  # report, never hide
                rows.append((name, level or "loss", float("nan"), float("nan"),
                             f"error: {type(exc).__name__}: {exc}"[:90]))
                continue
            bases += ps
            ratio = statistics.median(t / p for t, p in zip(ts, ps))
            tjd = None
            if with_torchjd and level == "param" and name in TORCHJD:
                tjd = torchjd_time(name, enc, forward, zero, min_run_time)
            rows.append((name, level or "loss", statistics.median(ts), ratio, tjd))
    return statistics.median(bases) if bases else float("nan"), rows


def _init_args(cls):
    import inspect

    if cls.__init__ is object.__init__:
        return set()
    return set(inspect.signature(cls.__init__).parameters)


def torchjd_time(name, enc, forward, zero, min_run_time):
    try:
        import torchjd.aggregation as A
        from torchjd.autojac import jac_to_grad
        from torchjd.autojac import mtl_backward as tjd_mtl_backward
    except ImportError:
        return None
    cls_name, kw = TORCHJD[name]
    agg = getattr(A, cls_name)(**kw)
    shared = list(enc.parameters())

    def step():
        zero()
        z, losses = forward()
        tjd_mtl_backward(list(losses.values()), features=z)
        jac_to_grad(shared, agg)

    try:
        step()
        return timer(step, min_run_time)
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"[:60]


def render(results, args) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Step time (forward + mtlens backward, no optimiser step) as the median of",
        "`torch.utils.benchmark` blocked runs, and its ratio to a plain PyTorch loop",
        "(`sum(losses).backward()`): each method's measurement alternates with one of the plain loop",
        "and the ratio is the median over the adjacent pairs. Parameter-level rows also give",
        "TorchJD's `mtl_backward` + `jac_to_grad` with the same aggregator (ratio TorchJD / mtlens:",
        "> 1 means mtlens is faster). Machines here are shared and noisy: compare ratios, not times.",
        "",
        f"Command: `python benchmarks/step_time.py {' '.join(sys.argv[1:])}`",
        "",
        f"Measured {_dt.date.today().isoformat()} on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}, jacobian mode `{args.jacobian}`.",
    ]
    for workload, (base, rows) in results.items():
        lines += ["", f"## {workload}", "", f"Plain loop: {base * 1000:.1f} ms/step (median).", "",
                  "| method | level | ms/step | × plain loop | TorchJD ms/step | TorchJD / mtlens |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, level, t, ratio, tjd in rows:
            if t != t:  # NaN: error
                lines.append(f"| {name} | {level} | — | — | {tjd} | |")
                continue
            tj = f"{tjd * 1000:.1f}" if isinstance(tjd, float) else (tjd or "")
            ratio_tj = f"{tjd / t:.2f}" if isinstance(tjd, float) else ""
            lines.append(f"| {name} | {level} | {t * 1000:.1f} | {ratio:.2f} | {tj} | {ratio_tj} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="resnet18,lenet")
    ap.add_argument("--methods", default="all", help="comma list, or 'all' (ew + every gradient method)")
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternations of method and plain loop per row")
    ap.add_argument("--jacobian", default="loop", choices=["loop", "batched"])
    ap.add_argument("--no-torchjd", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = ["ew"] + available("gradient") if args.methods == "all" else args.methods.split(",")
    results = {}
    for w in args.workloads.split(","):
        results[w] = run(w, methods, args.min_run_time, not args.no_torchjd, args.jacobian, args.repeats)
    text = render(results, args)
    print(text)
    if args.out:
        args.out.write_text(text)
    return results


if __name__ == "__main__":
    main()

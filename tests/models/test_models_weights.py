"""Pretrained / local weights: loading a state_dict the test writes, and the errors without one."""

import pytest
import torch

import mtlens  # noqa: F401  (mtlens.models, imported below, installs the torchvision shim timm needs)
from mtlens.errors import CheckpointError, ConfigurationError, MissingDependencyError
from mtlens.models import create


def _assert_backbone_equal(body, reference_sd):
    own = body.state_dict()
    assert own, "empty backbone"
    for k, v in own.items():
        assert torch.equal(v, reference_sd[k]), k


@pytest.fixture
def resnet18_file(tmp_path):
    import timm

    torch.manual_seed(1)
    ref = timm.create_model("resnet18", pretrained=False)
    sd = ref.state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(sd, path)
    return path, sd


def test_weights_file_loads_into_dense_backbone(resnet18_file):
    path, sd = resnet18_file
    model = create("resnet18-light", {"seg": 3}, weights=str(path), output_stride=8)
    _assert_backbone_equal(model.encoder.body, sd)  # the ImageNet classifier fc.* is dropped
    fresh = create("resnet18-light", {"seg": 3})
    assert not torch.equal(fresh.encoder.body.conv1.weight, sd["conv1.weight"])


def test_weights_checkpoint_with_module_prefix_and_pooled_backbone(resnet18_file, tmp_path):
    _, sd = resnet18_file
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    model = create("resnet18-office", {"a": 5}, weights=path)
    _assert_backbone_equal(model.encoder.body, sd)


def test_pretrained_cfg_overlay_file(resnet18_file):
    path, sd = resnet18_file
    model = create("resnet18-light", {"seg": 3}, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    _assert_backbone_equal(model.encoder.body, sd)


def test_torchvision_state_dict_and_single_channel_adaptation(resnet18_file, tmp_path):
    import torchvision

    tv = torchvision.models.resnet18()
    path = tmp_path / "tv.pt"
    torch.save(tv.state_dict(), path)
    model = create("resnet18-light", {"seg": 2}, weights=path)
    _assert_backbone_equal(model.encoder.body, tv.state_dict())
    gray = create("resnet18-light", {"seg": 2}, weights=path, in_channels=1)
    assert torch.allclose(gray.encoder.body.conv1.weight, tv.conv1.weight.sum(1, keepdim=True))


def test_weights_errors(resnet18_file, tmp_path):
    path, sd = resnet18_file
    with pytest.raises(CheckpointError, match="does not exist"):
        create("resnet18-light", {"seg": 3}, weights=tmp_path / "missing.pt")
    bad = tmp_path / "partial.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4")}, bad)
    with pytest.raises(CheckpointError, match="missing"):
        create("resnet18-light", {"seg": 3}, weights=bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({**sd, "conv1.weight": torch.zeros(32, 3, 7, 7)}, wrong)
    with pytest.raises(CheckpointError, match="another shape"):
        create("resnet18-light", {"seg": 3}, weights=wrong)
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(CheckpointError, match="state_dict"):
        create("resnet18-light", {"seg": 3}, weights=junk)


def test_pretrained_without_network_names_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(MissingDependencyError, match=r"weights='w.pt'"):
        create("resnet18-light", {"seg": 3}, pretrained=True)


def test_encoder_weights_for_presets_without_imagenet_weights(tmp_path):
    src = create("lenet-multimnist", {"l": 10})
    path = tmp_path / "lenet.pt"
    torch.save(src.encoder.state_dict(), path)
    dst = create("lenet-multimnist", {"l": 10}, weights=path)
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(v, dst.encoder.state_dict()[k])
    with pytest.raises(ConfigurationError, match="no pretrained weights"):
        create("lenet-multimnist", {"l": 10}, pretrained=True)


def test_cached_pretrained_file_reads_timms_url_and_file_name_pair(monkeypatch, tmp_path):
    """timm's ``PretrainedCfg.url`` may be a ``(url, file name)`` pair whose cached file is that name
    (timm's ``check_cached_file``): the offline lookup finds it instead of failing on the pair."""
    import timm.models

    from mtlens.models import backbones

    class Cfg:
        hf_hub_id = None
        hf_hub_filename = None
        url = ("https://example.org/weights/resnet18-abc123.pth", "resnet18-pair.pth")

    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: Cfg())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert backbones.cached_pretrained_file("resnet18") is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18-pair.pth").write_bytes(b"weights")
    assert backbones.cached_pretrained_file("resnet18") == str(tmp_path / "checkpoints" / "resnet18-pair.pth")

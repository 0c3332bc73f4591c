"""Pretrained weights come from the local caches; the network is reached only when asked (issue 12, item 6)."""

import pytest
import torch

import mtlens  # noqa: F401  (mtlens.models, imported below, installs the torchvision shim timm needs)
from mtlens.errors import MissingDependencyError
from mtlens.models import create
from mtlens.models.backbones import cached_pretrained_file


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty caches, and every download route of timm / huggingface_hub / torch.hub fails the test."""
    import huggingface_hub
    import huggingface_hub.constants as hf
    import timm.models._builder as builder
    import timm.models._hub as hub

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    torch_home = tmp_path / "torch"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(torch_home))
    reached = []

    def network(*args, **kwargs):
        reached.append(args)
        raise OSError("the test forbids the network")

    routes = ((huggingface_hub, "hf_hub_download"), (hub, "hf_hub_download"), (torch.hub, "download_url_to_file"),
              (builder, "load_state_dict_from_url"), (builder, "load_state_dict_from_hf"))
    for mod, name in routes:
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, network)
    return torch_home, reached


def test_pretrained_not_cached_fails_at_once_without_the_network(offline):
    _, reached = offline
    with pytest.raises(MissingDependencyError) as exc:
        create("resnet18-light", {"seg": 3}, pretrained=True)
    msg = str(exc.value)
    assert "resnet18.tv_in1k" in msg and "download=True" in msg and "model.kwargs.download=true" in msg
    assert "weights='w.pt'" in msg
    assert reached == []


def test_download_only_when_asked(offline):
    _, reached = offline
    with pytest.raises(MissingDependencyError, match="could not be downloaded"):
        create("resnet18-light", {"seg": 3}, pretrained=True, download=True)
    assert reached  # asked: timm tried


def test_cached_torchvision_file_is_used_without_the_network(offline):
    import timm

    torch_home, reached = offline
    torch.manual_seed(3)
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    (torch_home / "checkpoints").mkdir(parents=True)
    torch.save(sd, torch_home / "checkpoints" / "resnet18-f37072fd.pth")  # the name torchvision's URL gives
    assert cached_pretrained_file("resnet18") == str(torch_home / "checkpoints" / "resnet18-f37072fd.pth")
    model = create("resnet18-light", {"seg": 3}, pretrained=True)
    for k, v in model.encoder.body.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert reached == []

import pytest
import torch

from backdoorlab.models import MODELS, Arch, build_model


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 17, 23)])
def test_stage_contract(name, shape):
    model = build_model(Arch(name, shape[0], 7, shape[1:], 0.125)).eval()
    x = torch.rand(3, *shape)
    out = model(x)
    assert out.shape == (3, 7)
    feats = model.features(x)
    assert feats.shape == (3, model.feature_dim)
    assert torch.allclose(model.head(feats), out, atol=1e-5)
    names = model.stage_names
    assert names[-1] == "head" and model.conv_stage in names
    for k in range(len(names) + 1):  # "the output of layer K" then the rest gives the same logits
        assert torch.allclose(model.forward_from(model.forward_to(x, k), k), out, atol=1e-5)
    conv = model.forward_to(x, model.conv_stage)
    assert conv.dim() == 4


def test_reference_sizes():
    assert sum(p.numel() for p in build_model(Arch("resnet18", 3, 10, (32, 32))).parameters()) == 11_173_962
    digit = build_model(Arch("digit-cnn", 1, 10, (28, 28)))
    assert [n for n in digit.stage_names] == ["conv1", "conv2", "fc1", "head"]
    assert digit.stages["conv1"][0].out_channels == 16 and digit.stages["conv2"][0].out_channels == 32
    assert digit.feature_dim == 512
    traffic = build_model(Arch("traffic-cnn", 3, 43, (32, 32)))
    convs = [m.out_channels for m in traffic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [32, 32, 64, 64, 128, 128] and traffic.feature_dim == 512

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


@pytest.mark.parametrize("channels", [1, 3])
def test_cpu_images_enter_channels_last_with_the_same_logits(channels):
    torch.manual_seed(0)
    m = build_model(Arch("digit-cnn", channels, 10, (28, 28))).eval()
    seen = []
    m.stages["conv1"][0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last) and inp[0].stride(1) == 1))
    x = torch.rand(5, channels, 28, 28)
    with torch.no_grad():
        fast = m(x)
        m.channels_last = False
        plain = m(x)
    assert seen == [True, False]  # one-channel images too: contiguous() alone would leave their strides
    assert torch.allclose(fast, plain, atol=1e-5)
    assert torch.equal(m.forward_to(x, 0), x)  # "the first 0 stages" is the input itself

"""unet.py: shapes, zero initialisation, conditioning on t and labels, the DDPM CIFAR-10 size."""

import pytest
import torch

from unet import ResBlock, UNet



def tiny_unet(in_channels=1, image_size=8, channel_mults=(1, 2), num_classes=None, attn_resolutions=(4,)):
    return UNet(in_channels=in_channels, base_channels=8, channel_mults=channel_mults, num_res_blocks=1,
                attn_resolutions=attn_resolutions, dropout=0.0, image_size=image_size, num_classes=num_classes)


def zero_initialised(model):
    """The layers that must start at zero: each residual block's last conv, each attention output
    projection, and conv_out."""
    layers = [m.conv2 for m in model.modules() if isinstance(m, ResBlock)]
    layers += [m.proj for m in model.modules() if m.__class__.__name__ == "Attention"]
    return layers + [model.conv_out]


def perturb(layers, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_unet_maps_B_C_H_W_to_the_same_shape(channels, image_size):
    torch.manual_seed(0)
    # 28 = 4·7 halves twice, so three levels at most; attention at 16 px where the size reaches it
    model = tiny_unet(channels, image_size, channel_mults=(1, 2, 2), attn_resolutions=(16,))
    perturb(zero_initialised(model))
    x = torch.randn(2, channels, image_size, image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert out.abs().max() > 0


def test_fresh_unet_outputs_zero_because_residual_branches_and_conv_out_start_at_zero():
    torch.manual_seed(0)
    model = tiny_unet(num_classes=3)
    layers = zero_initialised(model)
    assert len(layers) == 8 + 4 + 1                          # 8 res blocks, 4 attentions, conv_out here
    for layer in layers:
        assert all((p == 0).all() for p in layer.parameters()), layer
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 100, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t, torch.tensor([0, 1, 2, 0])), torch.zeros_like(x))
        # every residual branch is zero, so each block is its skip path: with only conv_out perturbed,
        # the output no longer is 0 but cannot depend on t or the label yet
        perturb([model.conv_out])
        out = model(x, t)
        assert out.abs().max() > 0
        assert torch.allclose(model(x, t.flip(0)), out, atol=1e-6)
        assert torch.allclose(model(x, t, torch.tensor([2, 1, 0, 2])), out, atol=1e-6)


def test_unet_output_depends_on_t():
    torch.manual_seed(0)
    model = tiny_unet()
    perturb(zero_initialised(model))
    x = torch.randn(1, 1, 8, 8).expand(3, 1, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 1, 500]))
    assert not torch.allclose(out[0], out[1], atol=1e-5)
    assert not torch.allclose(out[0], out[2], atol=1e-5)
    # the same t in two batch slots gives the same output: each sample sees only its own t
    with torch.no_grad():
        assert torch.allclose(model(x, torch.tensor([7, 7, 7]))[0], model(x, torch.tensor([7, 0, 3]))[0], atol=1e-6)


def test_ddpm_cifar10_unet_has_35_7M_parameters():
    model = UNet(in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, image_size=32)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.05, n


def test_class_labels_change_output_and_none_means_the_null_label():
    torch.manual_seed(0)
    model = tiny_unet(num_classes=3)
    perturb(zero_initialised(model))
    x, t = torch.randn(1, 1, 8, 8).expand(4, 1, 8, 8), torch.full((4,), 50)
    with torch.no_grad():
        out = model(x, t, torch.tensor([0, 1, 2, 3]))              # 3 is the null label
        unconditional = model(x, t)
    for i in range(3):
        assert not torch.allclose(out[i], out[3], atol=1e-5), i
    assert not torch.allclose(out[0], out[1], atol=1e-5)
    assert torch.allclose(unconditional, out[3:].expand_as(unconditional), atol=1e-6)


def test_bad_image_size_raises_value_error():
    with pytest.raises(ValueError, match="image_size"):
        UNet(in_channels=3, base_channels=8, channel_mults=(1, 2, 2, 2), num_res_blocks=1,
             attn_resolutions=(), dropout=0.0, image_size=28)             # 28 does not halve 3 times
    model = tiny_unet(image_size=8)
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 16, 16), torch.zeros(1, dtype=torch.long))  # built for 8×8
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))    # built for 1 channel
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_unet_gradients_reach_every_parameter():
    # Zero init must not block learning: after one step on a fresh model, every weight gets a gradient
    # once the zero layers have moved (the first step moves conv_out, the next ones everything else).
    torch.manual_seed(0)
    model = tiny_unet(num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 400]), torch.tensor([0, 3])
    for _ in range(3):
        optimizer.zero_grad()
        ((model(x, t, y) - x) ** 2).mean().backward()
        optimizer.step()
    no_grad = sorted(name for name, p in model.named_parameters()
                     if name != "label_emb.weight" and (p.grad is None or p.grad.abs().sum() == 0))
    assert not no_grad, no_grad
    label_grad = model.label_emb.weight.grad.abs().sum(1)            # only the labels used: 0 and null (3)
    assert (label_grad[[0, 3]] > 0).all() and (label_grad[[1, 2]] == 0).all()

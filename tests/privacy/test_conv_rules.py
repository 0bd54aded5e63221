"""Conv1d/2d/3d rules: per-sample norms and clipped sums equal a one-sample-at-a-time loop (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from trustml.privacy import PerSampleClipper
from trustml.privacy import conv as conv_rules
from trustml.privacy.conv import ConvFactors, ConvRule
from trustml.privacy.layers import Factored, rule_for

STRATEGIES = ["auto", "ghost", "materialise"]


def loss_fn(model, x):
    out = model(x)
    return (out.flatten(1) * torch.linspace(-1, 1, out[0].numel(), dtype=out.dtype)).sum(1) + (
        out.flatten(1).tanh() ** 2
    ).sum(1)


def per_sample_reference(model, x):
    """Each sample's gradient by its own autograd call: (norms (B,), per-sample grads per param)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(loss_fn(model, x[i : i + 1]).sum(), params) for i in range(len(x))]
    per_param = [torch.stack(gs) for gs in zip(*grads)]
    norms = sum(g.flatten(1).pow(2).sum(1) for g in per_param).sqrt()
    return norms, per_param


def assert_exact(model, x, strategy="auto"):
    model = model.double()
    x = x.double()
    norms_ref, per_param = per_sample_reference(model, x)
    max_norm = norms_ref.median().item()  # some samples clipped, some not
    factors = (max_norm / norms_ref).clamp(max=1.0)
    clipper = PerSampleClipper(model, max_norm, strategy=strategy)
    model.zero_grad(set_to_none=True)
    norms = clipper.backward(loss_fn(model, x))
    clipper.remove()
    torch.testing.assert_close(norms, norms_ref, rtol=1e-6, atol=1e-12)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (name, p), g in zip(params, per_param):
        ref = torch.tensordot(factors, g, dims=1)
        torch.testing.assert_close(p.grad, ref, rtol=1e-6, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


CONV2D_CASES = [
    (stride, padding, dilation, groups, (stride + dilation + groups) % 2 == 1)
    for stride, padding, dilation, groups in itertools.product([1, 2], [0, 1, "same"], [1, 2], [1, 2])
    if not (padding == "same" and stride != 1)  # torch refuses 'same' with stride
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stride,padding,dilation,groups,bias", CONV2D_CASES)
def test_conv2d(stride, padding, dilation, groups, bias, strategy):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), stride, padding, dilation, groups, bias)
    assert_exact(conv, torch.randn(5, 4, 7, 6), strategy)


@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, 2, "same", "valid"])
def test_conv1d_padding_modes_and_batch_sizes(batch, mode, padding):
    torch.manual_seed(1)
    conv = nn.Conv1d(3, 4, 3, padding=padding, padding_mode=mode, dilation=2 if padding == 2 else 1)
    assert_exact(conv, torch.randn(batch, 3, 9))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 2},
        {"kernel_size": (2, 3, 1), "stride": (1, 2, 1), "padding": (1, 0, 2)},
        {"kernel_size": 2, "dilation": (2, 1, 1), "groups": 2, "bias": False},
        {"kernel_size": 3, "padding": "same", "padding_mode": "circular"},
        {"kernel_size": 2, "stride": 2, "padding": 1, "padding_mode": "replicate", "groups": 2},
    ],
)
def test_conv3d(kwargs, strategy):
    torch.manual_seed(2)
    assert_exact(nn.Conv3d(2, 4, **kwargs), torch.randn(3, 2, 4, 5, 3), strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_depthwise_and_strided_conv1d(strategy):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, stride=3, groups=4), nn.ReLU(), nn.Conv1d(8, 8, 1, groups=8))
    assert_exact(model, torch.randn(4, 4, 11), strategy)


class Twice(nn.Module):
    """One convolution applied twice: the per-sample norm needs the cross term of both calls."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.tanh(self.conv(x)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_conv_called_twice(strategy):
    torch.manual_seed(4)
    assert_exact(Twice(), torch.randn(4, 3, 5, 5), strategy)


def test_cnn_with_groupnorm_and_head():
    """The benchmark's CNN shape: Conv2d + GroupNorm + ReLU + pooling blocks, then a linear head."""
    torch.manual_seed(5)
    blocks = []
    for c_in, c_out in [(3, 8), (8, 8)]:
        blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(2, c_out), nn.ReLU(), nn.AvgPool2d(2)]
    model = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(8 * 2 * 2, 3))
    assert_exact(model, torch.randn(6, 3, 8, 8))


def test_rule_is_chosen_by_exact_type_and_no_second_forward():
    for layer in (nn.Conv1d(1, 1, 1), nn.Conv2d(1, 1, 1), nn.Conv3d(1, 1, 1)):
        assert isinstance(rule_for(layer), ConvRule)
    conv = nn.Conv2d(2, 2, 3)
    calls = []
    conv.register_forward_hook(lambda *_: calls.append(1))
    clipper = PerSampleClipper(conv, 1.0)
    clipper.backward(conv(torch.randn(3, 2, 5, 5)).flatten(1).sum(1))
    assert len(calls) == 1  # the torch.func fallback would have called the layer again


@pytest.mark.parametrize(
    "layer,x",
    [
        (nn.Conv1d(2, 3, 2), torch.randn(2, 5)),
        (nn.Conv2d(2, 3, 2), torch.randn(2, 5, 5)),
        (nn.Conv3d(2, 3, 2), torch.randn(2, 4, 4, 4)),
    ],
)
def test_unbatched_input_refused(layer, x):
    clipper = PerSampleClipper(layer, 1.0)
    with pytest.raises(ValueError, match=r"batch-first inputs \(N, C"):
        layer(x)
    clipper.remove()


GHOST_CASES = [  # small output maps, wide channels: the rule hands the clipper im2col factors
    (lambda: nn.Conv1d(16, 12, 3, stride=2, dilation=2, padding=1, padding_mode="reflect"), (4, 16, 7)),
    (lambda: nn.Conv2d(16, 12, 3, padding="same", padding_mode="circular"), (5, 16, 2, 2)),
    (lambda: nn.Conv2d(16, 12, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 0)), (3, 16, 4, 4)),
    (lambda: nn.Conv3d(8, 6, 2, stride=(1, 2, 1), padding=(0, 1, 0), dilation=(1, 1, 2)), (4, 8, 2, 3, 3)),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", range(len(GHOST_CASES)))
def test_gram_path(case, strategy):
    torch.manual_seed(6)
    build, shape = GHOST_CASES[case]
    conv, x = build(), torch.randn(shape)
    g = conv(x)
    uses = dict((id(p), u) for p, u in rule_for(conv).uses(conv, x, [g], shape[0]))
    assert isinstance(uses[id(conv.weight)], Factored)
    assert_exact(conv, x, strategy)


def force_route(monkeypatch, route: str) -> None:
    """Materialise by im2col + bmm ("unfolded") or the grouped convolution, whatever the shape."""
    monkeypatch.setattr(conv_rules, "unfolds", lambda *args: route == "unfolded")


@pytest.mark.parametrize("samples_per_chunk", [1, 2, 3])
@pytest.mark.parametrize(
    "build,shape",
    [
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (5, 4, 7, 6)),
        (lambda: nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect"), (5, 3, 9)),
        (lambda: nn.Conv3d(2, 4, 2, padding=1, padding_mode="circular", groups=2), (5, 2, 3, 4, 3)),
    ],
)
@pytest.mark.parametrize("route", ["grouped", "unfolded"])
def test_materialised_in_chunks_of_samples(monkeypatch, build, shape, samples_per_chunk, route):
    """Large layers are materialised a few samples at a time (the last chunk may be shorter), by
    either route: the grouped convolution or im2col + bmm."""
    torch.manual_seed(7)
    conv = build()
    x = torch.randn(shape)
    force_route(monkeypatch, route)
    monkeypatch.setattr(conv_rules, "CHUNK_ELEMENTS", conv.weight.numel() * samples_per_chunk)
    columns = conv_rules.columns(conv, x[:1], x.dim() - 2).numel()
    monkeypatch.setattr(conv_rules, "COLUMN_ELEMENTS", columns * samples_per_chunk)
    assert_exact(conv, x, "materialise")


UNFOLDED_CASES = [
    *[(nn.Conv2d, (4, 6, (3, 2), *case[:4], case[4]), (5, 4, 7, 6)) for case in CONV2D_CASES],
    *[(nn.Conv1d, (3, 4, 3), (2, 3, 9), {"padding": p, "padding_mode": m, "dilation": d})
      for p, m, d in [(1, "reflect", 1), (2, "circular", 2), ("same", "replicate", 2),
                      ("valid", "zeros", 1)]],
    (nn.Conv3d, (2, 4, (2, 3, 1)), (3, 2, 4, 5, 3), {"stride": (1, 2, 1), "padding": (1, 0, 2)}),
    (nn.Conv3d, (2, 4, 2), (3, 2, 4, 5, 3), {"dilation": (2, 1, 1), "groups": 2, "bias": False}),
    (nn.Conv3d, (2, 4, 3), (3, 2, 4, 5, 3), {"padding": "same", "padding_mode": "circular"}),
    (nn.Conv3d, (2, 4, 2), (3, 2, 4, 5, 3), {"stride": 2, "padding": 1, "padding_mode": "replicate"}),
]


@pytest.mark.parametrize("case", range(len(UNFOLDED_CASES)))
def test_unfolded_route(monkeypatch, case):
    """im2col + bmm materialises exactly for every stride, padding, dilation, groups and
    padding mode of Conv1d/2d/3d (forced here; by default it takes small maps of wide patches)."""
    torch.manual_seed(10)
    cls, args, shape, *kwargs = UNFOLDED_CASES[case]
    force_route(monkeypatch, "unfolded")
    assert_exact(nn.Sequential(cls(*args, **(kwargs[0] if kwargs else {})), nn.Tanh()),
                 torch.randn(shape), "materialise")


def test_route_choice_follows_the_shape(monkeypatch):
    """Small maps of wide patches go through im2col + bmm, large maps through the grouped kernel;
    on CPU, channels per group that oneDNN's direct kernels do not take (not a multiple of
    DIRECT_BLOCK: an RGB input, 12 output channels) through im2col + bmm whatever the map."""
    calls = []
    for name in ("per_sample_weight_grads", "unfolded_weight_grads"):
        real = getattr(conv_rules, name)
        monkeypatch.setattr(conv_rules, name, lambda *a, _f=real, _n=name: calls.append(_n) or _f(*a))
    cases = [(nn.Conv2d(64, 16, 3, padding=1, groups=2), (2, 64, 4, 4), "unfolded"),
             (nn.Conv2d(8, 16, 3, padding=1), (2, 8, 16, 16), "per_sample"),
             (nn.Conv2d(32, 16, 3, padding=1, groups=2), (2, 32, 16, 16), "per_sample"),
             (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 16, 16), "unfolded"),
             (nn.Conv2d(8, 12, 3, padding=1), (2, 8, 16, 16), "unfolded"),
             (nn.Conv2d(16, 16, 3, padding=1, groups=4), (2, 16, 16, 16), "unfolded")]
    for conv, shape, _ in cases:
        g = conv(torch.randn(shape))
        for _, use in ConvRule(2).uses(conv, torch.randn(shape), [g.detach()], 2):
            if isinstance(use, ConvFactors):  # held as input and output gradient until the norm
                use.materialise()
    assert [c.split("_")[0] for c in calls] == [route.split("_")[0] for *_, route in cases]
    assert not conv_rules.unfolds(nn.Conv2d(3, 8, 3), 256, torch.device("meta"))  # CPU only


COLLISION_CASES = [  # the batch size equals another dim: channels, length, height, depth, kernel
    (lambda: nn.Conv1d(4, 4, 4, padding="same"), (4, 4, 4)),
    (lambda: nn.Conv1d(3, 6, 3, stride=2, padding=3, dilation=3, groups=3, padding_mode="circular"),
     (3, 3, 3 * 3)),
    (lambda: nn.Conv2d(4, 4, 3, padding=1), (4, 4, 4, 4)),
    (lambda: nn.Conv2d(2, 4, (2, 3), stride=(3, 2), padding=(2, 1), padding_mode="reflect"), (2, 2, 5, 2)),
    (lambda: nn.Conv2d(6, 3, 3, padding="same", dilation=2, groups=3, bias=False), (3, 6, 3, 7)),
    (lambda: nn.Conv3d(2, 2, 2, padding=1, padding_mode="replicate"), (2, 2, 2, 2, 2)),
    (lambda: nn.Conv3d(3, 3, (1, 3, 2), stride=(1, 1, 3), padding="valid", groups=3), (3, 3, 3, 5, 7)),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", range(len(COLLISION_CASES)))
def test_batch_size_equal_to_another_dim(case, strategy):
    """The rule reads the batch from dim 0 only: a batch size that also is a channel, spatial or
    kernel size (odd and even sizes, asymmetric 'same' padding) changes nothing."""
    torch.manual_seed(8)
    build, shape = COLLISION_CASES[case]
    model = nn.Sequential(build(), nn.Tanh())
    assert_exact(model, torch.randn(shape), strategy)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_odd_sizes_through_a_conv_stack(padding_mode):
    """Two convolutions of different dimensionality and options in one model, odd sizes throughout."""
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=3,
                  padding_mode=padding_mode),
        nn.GroupNorm(3, 6), nn.Tanh(), nn.Flatten(2),
        nn.Conv1d(6, 5, 3, padding="same", dilation=2, padding_mode=padding_mode),
    )
    assert_exact(model, torch.randn(5, 3, 7, 5))


@pytest.mark.parametrize("route", ["grouped", "unfolded", "ghost"])
def test_channels_last_input(monkeypatch, route):
    """im2col reads the input through its own strides: a channels_last input gives the same
    gradients by every route."""
    torch.manual_seed(11)
    force_route(monkeypatch, route)
    conv = nn.Conv2d(16, 6, 3, stride=2, padding=1, groups=1 if route == "ghost" else 2).double()
    x = torch.randn(4, 16, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    if route == "ghost":
        g = conv(x).detach()
        uses = dict((id(p), u) for p, u in rule_for(conv).uses(conv, x, [g], 4))
        assert isinstance(uses[id(conv.weight)], Factored)
    assert_exact(conv, x, "auto")

"""ISSBA (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021): a
StegaStamp-like encoder/decoder pair is trained on the data set at hand so that the encoder hides a
bit string in an image as a small residual and the decoder reads the bits back; the encoder is then
applied with the attacker's one secret to ``poison_rate`` of the non-target training images, which
are relabelled to the target, and the victim trains from scratch (data poisoning). The trigger is
sample-specific: every image gets its own residual.

Encoder/decoder training (:func:`train_steganography`, batched, Adam on both networks): every batch
gets fresh random secrets s ∈ {0,1}^bits; a learned linear map E turns 2s − 1 into a secret image
of the input's size (StegaStamp: a dense layer to a 50x50x3 map), stacked on the image as extra input
channels of a generator of :mod:`backdoorlab.models.generators`; x' = clip(x + ε·tanh(g([x, E(2s − 1)])), 0, 1),
so ||x' − x||∞ ≤ ε by construction (as in :class:`GeneratorTrigger`); x' is rounded to 8 bits with
a straight-through gradient (the decoder learns from what is delivered); the loss is
BCE(decoder(x'), s) + w·mean((x' − x)²)/ε², with w rising linearly from 0 to ``residual_weight`` over
the first half of the steps (StegaStamp also ramps its image losses: with the full weight from the
start the residual collapses to zero before the decoder reads anything; measured on MNIST-5k).
The trained encoder with the attacker's secret stored in its buffers is the trigger
(:class:`ISSBATrigger`, ``issba/NAME``): it maps an image to its poisoned version alone, and saves
and rebuilds from its tensors. Delivered images are rounded to 8 bits inside the ε ball (``quantize``).

Our choices (the paper's setting is StegaStamp on 224x224 ImageNet/MS-Celeb images):
- the residual loss is L2 only: StegaStamp adds LPIPS and a critic (WGAN) term, and there are no
  LPIPS weights offline; the L∞ cap ε (default 0.05, about 13/255: the L∞ the SIBA paper reports for
  ISSBA on CIFAR-10) bounds visibility by construction instead of a learned critic;
- ``bits`` = 32 by default: StegaStamp hides 100 bits in 400x400 images; a 28x28 image has 204 times
  fewer pixels, and the attack needs one secret, not a channel (2^32 secrets are plenty of keys),
  while fewer bits keep the encoder's task learnable in a CPU minute;
- no image distortions in training besides 8-bit rounding (StegaStamp's blur, noise and JPEG model
  printing and photographing; the attack delivers digital images);
- the decoder is a small strided CNN with batch norm (:func:`bit_decoder`, base width
  ``decoder_width``; the Digit-CNN, without normalisation, stays at chance); the encoder is the
  generator made for the image size (``generator: auto``); the secret is drawn from ``secret_seed``;
  both networks' initialisation and data order are seeded from the run's seed; 10 epochs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.core import Dataset, ImageSet, iterate
from ..models.generators import GENERATORS, _cbr, generator_name
from ..optim.pgd import quantize
from ..train.evaluate import batched
from ..validate import check_choice, check_int, check_range
from .base import ATTACKS, AttackContext, AttackResult, PoisoningAttack, PoisonParams, derived_seed
from .triggers import TRIGGERS, GeneratorTrigger
from .universal import check_budget


class ISSBATrigger(GeneratorTrigger):
    """x' = clip(x + ε·tanh(g([x, E·(2s − 1)])), 0, 1): a generator g conditioned on the bit string
    s (``secret``, a buffer) through a learned linear map E (``embed``) from the bits to a secret
    image of the input's channels and size, stacked on the input as extra channels."""

    def __init__(self, name: str, net: nn.Module, eps: float, channels: int, width: int, secret: Tensor, pixels: int) -> None:
        super().__init__(name, net, eps, channels, width)
        self.kind = f"issba/{name}"  # type: ignore[misc]
        self.register_buffer("secret", secret.float())
        self.embed = nn.Linear(len(secret), channels * pixels)

    def encode(self, x: Tensor, secrets: Tensor) -> Tensor:
        """The bounded residual ε·tanh(g) hiding ``secrets`` ((N, bits), or (bits,) for all) in ``x``."""
        s = secrets.to(x.device, x.dtype) * 2 - 1
        s = s.expand(len(x), -1) if s.dim() == 1 else s
        cond = self.embed(s).view(len(x), -1, *x.shape[-2:])
        return self.eps.to(x.dtype) * torch.tanh(self.net(torch.cat([x, cond], 1)))

    def residual(self, x: Tensor) -> Tensor:
        return self.encode(x, self.secret)

    @staticmethod
    def make(name: str, channels: int, width: int | None, eps: float, secret: Tensor, pixels: int) -> "ISSBATrigger":
        """An untrained encoder for images of ``channels`` x ``pixels`` (H·W)."""
        entry = GENERATORS.get(name)
        w = entry.default_width if width is None else width
        return ISSBATrigger(name, entry.build(channels, w, in_channels=2 * channels), eps, channels, w, secret, pixels)

    @staticmethod
    def from_state(name: str, **tensors: Tensor) -> "ISSBATrigger":
        channels, width = (int(v) for v in tensors["config"].tolist())
        pixels = tensors["embed.weight"].shape[0] // channels
        trig = ISSBATrigger.make(name, channels, width, float(tensors["eps"]), tensors["secret"], pixels)
        trig.load_state_dict(tensors)
        return trig.eval()


for _name in GENERATORS.names():
    TRIGGERS.add(f"issba/{_name}", partial(ISSBATrigger.from_state, _name))  # type: ignore[arg-type]


@dataclass
class ISSBAParams(PoisonParams):
    """``bits``: length of the secret (32: see the module docstring); ``epsilon``: L∞ cap of the
    residual (0.05, our choice); ``epochs``, ``batch_size``, ``lr``: the encoder/decoder training
    (Adam, both networks); ``residual_weight``: weight of mean((x' − x)²)/ε² against the decoder's
    BCE; ``secret_seed``: draws the attacker's secret; ``generator``/``gen_width``: the encoder
    (a generator name or ``auto``; None: its default width); ``decoder_width``: the decoder's
    base width; ``poison_rate``: 10%, the ISSBA paper's (the SIBA grid uses 1%)."""

    poison_rate: float = 0.1
    bits: int = 32
    epsilon: float = 0.05
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    residual_weight: float = 1.0
    secret_seed: int = 0
    generator: str = "auto"
    gen_width: int | None = None
    decoder_width: int = 32

    def validate(self, num_classes: int) -> None:
        super().validate(num_classes)
        check_int("bits", self.bits, 1, 1024)
        check_budget("epsilon", self.epsilon)
        check_int("epochs", self.epochs, 1, 100_000)
        check_int("batch_size", self.batch_size, 2)
        check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        check_range("residual_weight", self.residual_weight, 0.0, 1e6)
        check_int("secret_seed", self.secret_seed, 0)
        check_choice("generator", self.generator, ("auto", *GENERATORS.names()))
        if self.gen_width is not None:
            check_int("gen_width", self.gen_width, 1, 4096)
        check_int("decoder_width", self.decoder_width, 1, 4096)

    def secret(self) -> Tensor:
        """The attacker's bit string (float 0/1, ``bits`` long), fixed by ``secret_seed``."""
        return torch.randint(0, 2, (self.bits,), generator=torch.Generator().manual_seed(self.secret_seed)).float()


def bit_decoder(channels: int, bits: int, size: tuple[int, int], width: int) -> nn.Module:
    """Image -> ``bits`` logits: two stride-2 3x3 convolutions (``width``, 2·``width`` channels) and a
    256-unit hidden layer, all with batch norm (StegaStamp's decoder is a deeper strided CNN; without
    batch norm a CNN here stays at chance for epochs: the hidden bits are a faint signal on the image)."""
    h, w = (-(-(-(-s // 2)) // 2) for s in size)  # ceil(ceil(s/2)/2)
    return nn.Sequential(*_cbr(channels, width, 3, 2), *_cbr(width, 2 * width, 3, 2), nn.Flatten(),
                         nn.Linear(2 * width * h * w, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Linear(256, bits))


def round_8bit(x: Tensor) -> Tensor:
    """x rounded to the nearest of 256 levels, with the identity's gradient (straight-through)."""
    return x + (x.mul(255).round().div(255) - x).detach()


def train_steganography(encoder: ISSBATrigger, decoder: nn.Module, data: ImageSet, p: ISSBAParams, seed: int,
                        device: torch.device) -> list[dict]:
    """Train ``encoder`` and ``decoder`` together (see the module docstring); per-epoch means of
    the loss terms and the bit accuracy on the training batches."""
    g = torch.Generator().manual_seed(seed)
    params = [*encoder.net.parameters(), *encoder.embed.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=p.lr)
    encoder.train(), decoder.train()
    history, step = [], 0
    ramp = max(1, (p.epochs * (len(data) // p.batch_size)) // 2)  # steps over which the residual weight rises from 0
    for epoch in range(p.epochs):
        sums, steps = torch.zeros(3), 0
        for x, _, _ in iterate(data, p.batch_size, shuffle=True, generator=g, device=device, drop_last=True):
            s = torch.randint(0, 2, (len(x), p.bits), generator=g).float().to(device)
            xp = round_8bit((x + encoder.encode(x, s)).clamp(0, 1))
            logits = decoder(xp)
            bce = F.binary_cross_entropy_with_logits(logits, s)
            image = (xp - x).pow(2).mean() / p.epsilon**2
            loss = bce + p.residual_weight * min(1.0, step / ramp) * image
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.stack([bce.detach(), image.detach(), ((logits.detach() > 0).float() == s).float().mean()]).cpu()
            steps, step = steps + 1, step + 1
        m = (sums / max(1, steps)).tolist()
        history.append({"epoch": epoch + 1, "bce": m[0], "residual_l2": m[1], "bit_accuracy": m[2]})
    encoder.requires_grad_(False).eval()
    decoder.requires_grad_(False).eval()
    return history


@torch.no_grad()
def bit_accuracy(encoder: ISSBATrigger, decoder: nn.Module, x: Tensor, secrets: Tensor) -> float:
    """The share of bits the decoder reads back from the delivered (8-bit, inside ε) images of
    uint8 ``x`` encoded with ``secrets`` ((N, bits) or (bits,))."""
    secrets = secrets.expand(len(x), -1) if secrets.dim() == 1 else secrets
    hits = []
    for i in range(0, len(x), 512):
        xb, sb = x[i : i + 512].cpu(), secrets[i : i + 512]
        out = batched(partial(_encode_at, encoder, sb), encoder, xb)
        logits = batched(decoder, decoder, quantize(xb, out, float(encoder.eps)))
        hits.append(((logits > 0).float() == sb.cpu()).float())
    return float(torch.cat(hits).mean()) if hits else float("nan")


def _encode_at(encoder: ISSBATrigger, secrets: Tensor, x: Tensor) -> Tensor:
    return (x + encoder.encode(x, secrets)).clamp(0, 1)


@ATTACKS.register("issba")
class ISSBA(PoisoningAttack):
    name = "issba"
    paper = "Li et al., Invisible Backdoor Attack with Sample-Specific Triggers (ICCV 2021)"
    Params = ISSBAParams
    p: ISSBAParams

    def check_data(self, data: Dataset) -> None:
        super().check_data(data)
        generator_name(self.p.generator, data.spec.shape)

    def make_trigger(self, ctx: AttackContext) -> ISSBATrigger:
        p, shape = self.p, ctx.data.spec.shape
        torch.manual_seed(derived_seed(ctx.seed, "issba/encoder"))  # the attacker's own networks: their own seed
        encoder = ISSBATrigger.make(generator_name(p.generator, shape), shape[0], p.gen_width, p.epsilon, p.secret(), shape[1] * shape[2]).to(ctx.device)
        decoder = bit_decoder(shape[0], p.bits, (shape[1], shape[2]), p.decoder_width).to(ctx.device)
        t0, c0 = time.perf_counter(), time.process_time()
        history = train_steganography(encoder, decoder, ctx.data.train, p, derived_seed(ctx.seed, "issba/order"), ctx.device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        test = ctx.data.test.x
        random_secrets = torch.randint(0, 2, (len(test), p.bits), generator=torch.Generator().manual_seed(derived_seed(ctx.seed, "issba/test")))
        self.decoder = decoder
        self.extra_metrics: dict[str, Any] = {
            "bits": p.bits,
            "secret": "".join(str(int(b)) for b in encoder.secret.tolist()),
            "generator": encoder.name,
            "encoder_seconds": seconds,
            "encoder_cpu_seconds": cpu,  # this process's CPU time (the cores may be shared)
            "encoder_history": history,
            "bit_accuracy_test": bit_accuracy(encoder, decoder, test, random_secrets),  # held-out images, random secrets
            "secret_bit_accuracy_test": bit_accuracy(encoder, decoder, test, encoder.secret.cpu()),  # ... the attacker's secret
        }
        return encoder

    def run(self, ctx: AttackContext) -> AttackResult:
        res = super().run(ctx)
        res.metrics.update({"poison_count": len(res.tensors["poison_indices"]), "epsilon": self.p.epsilon, **self.extra_metrics})
        res.tensors.update({f"decoder.{k}": v.detach().cpu() for k, v in self.decoder.state_dict().items()})
        return res

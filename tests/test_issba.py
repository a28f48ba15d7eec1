"""ISSBA: the encoder's L∞ bound and 8-bit delivery, its safetensors round trip, the decoder reading
the secret back after short training, bad input naming the field, and one small run end to end."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.attacks import ATTACKS, TRIGGERS, Trigger
from backdoorlab.attacks.issba import ISSBAParams, ISSBATrigger, bit_accuracy, bit_decoder, train_steganography
from backdoorlab.errors import ConfigError
from backdoorlab.jobs import AttackJob, run_attack

pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder(eps: float, bits: int = 16, seed: int = 0, shape=(1, 8, 8)) -> ISSBATrigger:
    torch.manual_seed(seed)
    secret = ISSBAParams(bits=bits, secret_seed=seed).secret()
    return ISSBATrigger.make("conv-ae", shape[0], None, eps, secret, shape[1] * shape[2])


@pytest.mark.parametrize("eps", [0.02, 0.05, 0.3])
def test_residual_is_bounded_by_epsilon_and_sample_specific(eps):
    trig = _encoder(eps, shape=(3, 12, 12))
    with torch.no_grad():  # large weights drive tanh to ±1: the bound must hold where it is tight
        for prm in trig.net.parameters():
            prm.mul_(20)
    trig.eval()
    x = torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        xp = trig(x)
    r = xp - x
    assert float(r.abs().max()) <= eps + 1e-6 and float(xp.min()) >= 0 and float(xp.max()) <= 1
    assert float(r.abs().max()) > 0.9 * eps  # saturated: the bound is reached, not just respected
    assert not torch.allclose(r[0], r[1])  # one residual per image, not a universal δ
    xu = (x * 255).round().to(torch.uint8)
    delivered = trig.deliver(xu)  # the trigger delivers its own images (as every poisoning attack uses it)
    assert delivered.dtype == torch.uint8
    assert int((delivered.int() - xu.int()).abs().max()) <= int(eps * 255 + 1e-6)  # 8-bit, inside the same ball


def test_trigger_round_trips_through_its_tensors():
    trig = _encoder(0.05, bits=16, seed=3).eval()
    tensors = trig.tensors()
    assert trig.kind == "issba/conv-ae" and f"issba/{trig.name}" in TRIGGERS
    back = Trigger.from_tensors(trig.kind, tensors)
    assert isinstance(back, ISSBATrigger) and torch.equal(back.secret, trig.secret) and float(back.eps) == pytest.approx(0.05)
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(x), trig(x))  # the secret travels in the buffers: image -> poisoned image alone
    other = Trigger.from_tensors(trig.kind, {**tensors, "secret": 1 - tensors["secret"]})
    with torch.no_grad():
        assert not torch.allclose(other(x), trig(x))  # ... and it is what the encoder hides


def test_decoder_reads_the_secret_back_far_above_chance(digits):
    p = ISSBAParams(bits=8, epochs=12, batch_size=32, epsilon=0.1, residual_weight=0.1)
    enc = _encoder(p.epsilon, bits=p.bits, seed=4)
    torch.manual_seed(5)
    dec = bit_decoder(1, p.bits, (8, 8), p.decoder_width)
    hist = train_steganography(enc, dec, digits.train, p, seed=6, device=torch.device("cpu"))
    assert len(hist) == 12 and hist[-1]["bce"] < hist[0]["bce"]
    secrets = torch.randint(0, 2, (len(digits.test), p.bits), generator=torch.Generator().manual_seed(7))
    untrained = bit_accuracy(_encoder(p.epsilon, bits=p.bits, seed=4), dec, digits.test.x, secrets)
    held_out = bit_accuracy(enc, dec, digits.test.x, secrets)  # held-out images, random secrets, 8-bit delivery
    assert held_out > 0.8 and held_out > untrained + 0.2  # chance is 0.5
    assert bit_accuracy(enc, dec, digits.test.x, enc.secret) > 0.75  # the attacker's own secret


@pytest.mark.parametrize("params,field", [
    ({"bits": 0}, "params.bits"),
    ({"bits": -4}, "params.bits"),
    ({"bits": 2.5}, "params.bits"),
    ({"epsilon": 0.0}, "params.epsilon"),
    ({"epsilon": 1.5}, "params.epsilon"),
    ({"epsilon": -0.1}, "params.epsilon"),
    ({"epochs": 0}, "params.epochs"),
    ({"lr": 0}, "params.lr"),
    ({"residual_weight": -1}, "params.residual_weight"),
    ({"secret_seed": -1}, "params.secret_seed"),
    ({"generator": "gan"}, "params.generator"),
    ({"poison_rate": 0.0}, "params.poison_rate"),
])
def test_bad_params_name_the_field(params, field):
    with pytest.raises(ConfigError) as e:
        AttackJob(dataset="digits", attack="issba", params=params).build()
    assert e.value.field == field


def test_a_generator_that_does_not_fit_fails_before_the_run_folder_exists(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:  # 8x8 digits: the strided autoencoder needs sides of 16
        run_attack(AttackJob(dataset="digits", attack="issba", params={"generator": "strided-ae"}), out, progress=False)
    assert e.value.field == "params.generator" and not out.exists()


def test_issba_end_to_end_on_digits(tmp_path):
    from safetensors.torch import load_file

    from backdoorlab.data import load_dataset

    job = AttackJob(dataset="digits", width=0.5, train={"epochs": 20, "batch_size": 64, "augment": False}, attack="issba",
                    params={"poison_rate": 0.2, "bits": 8, "epochs": 12, "batch_size": 32, "epsilon": 0.1, "residual_weight": 0.0})
    m = run_attack(job, tmp_path / "issba", progress=False)
    assert m["kind"] == "data-poisoning" and m["poison_count"] == round(0.2 * 1437)
    assert m["bit_accuracy_test"] > 0.8 and m["secret_bit_accuracy_test"] > 0.75
    assert m["mean_perturbation_linf"] <= 0.1 + 1e-6 and m["ssim"] < 1
    assert m["clean_accuracy"] > 0.8
    assert m["attack_success_rate"] > m["attack_success_rate_clean_model"] + 0.3
    t = load_file(str(tmp_path / "issba" / "tensors.safetensors"))
    trig = Trigger.from_tensors("issba/conv-ae", {k[len("trigger."):]: v for k, v in t.items() if k.startswith("trigger.")})
    assert "".join(str(int(b)) for b in trig.secret.tolist()) == m["secret"]
    x = load_dataset("digits").test.x[:16]
    xp = trig.deliver(x)  # defenses rebuild poisoned images from the file
    assert 0 < int((xp.int() - x.int()).abs().max()) <= int(0.1 * 255)


def test_registered():
    assert "issba" in ATTACKS.names() and ATTACKS.get("issba").kind.value == "data-poisoning"

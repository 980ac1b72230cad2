"""The runtime's device-resident K/V cache (the path CUDA takes, run here on CPU memory through the same
IOBinding code) and its default thread pools."""

from __future__ import annotations

import numpy as np
import pytest

from duet_export import GenerationSettings
from duet_export.errors import DuetError
from duet_export.runtimes import OnnxVLM

from conftest import PROMPTS, random_image

IMAGES = [random_image(1), random_image(2, size=80)]


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_device_cache_gives_the_numpy_loops_tokens_and_logits(bundles, target):
    """Same answers through two prompts in a row (the device buffers are reused, never reallocated)."""
    host = OnnxVLM(bundles / target, provider="cpu", device_cache=False)
    device = OnnxVLM(bundles / target, provider="cpu", device_cache=True)
    assert host.cache is None and device.cache is not None
    addresses = {name: v.data_ptr() for name, v in device.cache.cache.items()}
    settings = GenerationSettings(max_new_tokens=12)
    for images, prompts in ((IMAGES, PROMPTS), (IMAGES[::-1], PROMPTS[::-1])):
        logits = {}
        ids = {}
        for name, vlm in (("host", host), ("device", device)):
            logits[name] = []
            ids[name] = vlm.generate_ids(
                vlm._pad_batch(vlm.encode(images, prompts)), settings, logits_out=logits[name]
            )
        np.testing.assert_array_equal(ids["device"], ids["host"])
        assert len(logits["device"]) == len(logits["host"]) == 12
        for a, b in zip(logits["device"], logits["host"], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert {name: v.data_ptr() for name, v in device.cache.cache.items()} == addresses


def test_a_step_writes_only_the_new_tokens_slot(bundles):
    vlm = OnnxVLM(bundles / "cpu", provider="cpu")  # the default: device cache
    inputs = vlm._pad_batch(vlm.encode(IMAGES, PROMPTS))
    logits, state = vlm.prefill(inputs)
    before = [vlm.cache.read(i, "key") for i in range(len(vlm.layer_group))]
    masks_before = [m.numpy().copy() for m in vlm.cache.masks]
    vlm.step(logits.argmax(-1), state)
    for i, g in enumerate(vlm.layer_group):
        after = vlm.cache.read(i, "key")
        slot = vlm.group_lengths[g]  # the first free slot of the layer's group
        changed = np.nonzero((after != before[i]).any(axis=(0, 1, 3)))[0].tolist()
        assert changed == [slot]
    for g, mask in enumerate(vlm.cache.masks):
        diff = np.nonzero((mask.numpy() != masks_before[g]).any(axis=0))[0].tolist()
        assert diff == [vlm.group_lengths[g]]


def test_bytes_per_step_fall_from_the_whole_cache_to_ids_slots_and_logits(bundles):
    """Instrumented: what the numpy loop hands the step graph (all of it crosses to a GPU) against the
    device cache (token ids and slot numbers up, logits down)."""
    host = OnnxVLM(bundles / "cpu", provider="cpu", device_cache=False)
    device = OnnxVLM(bundles / "cpu", provider="cpu", device_cache=True)
    settings = GenerationSettings(max_new_tokens=6)
    for vlm in (host, device):
        vlm.generate(IMAGES, PROMPTS, settings)
    b, vocab = host.batch, host.vocab_size
    kv = host.manifest["kv"]
    per_token = 2 * kv["num_kv_heads"] * kv["head_dim"] * 4  # key + value, float32
    cache = sum(per_token * host.capacity[g] * b for g in host.layer_group)
    masks = sum(8 * b * c for c in host.capacity)
    new = per_token * b * len(host.layer_group)
    logits = 4 * b * vocab
    assert host.transfer_report()["per_step_bytes"] == 8 * b + masks + cache + new + logits
    assert device.transfer_report()["per_step_bytes"] == 8 * b + 8 * len(host.capacity) + logits
    assert device.transfer_report()["cache"] == "device" and host.transfer_report()["steps"] == 5


def test_a_decode_state_of_an_earlier_prompt_is_refused(bundles):
    vlm = OnnxVLM(bundles / "cpu", provider="cpu")
    inputs = vlm._pad_batch(vlm.encode(IMAGES, PROMPTS))
    first_logits, first = vlm.prefill(inputs)
    vlm.prefill(inputs)  # a new prompt takes the device cache
    with pytest.raises(DuetError, match="earlier prompt"):
        vlm.step(first_logits.argmax(-1), first)


def test_bundle_sessions_sleep_when_idle_by_default(bundles):
    vlm = OnnxVLM(bundles / "cpu", provider="cpu")
    for session in vlm.bundle.sessions.values():
        assert (
            session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
        )


def test_shared_weights_turn_prepacking_off_and_answer_the_same(bundles):
    """share_weights: the sessions read the memory-mapped weights in place; the answers do not change."""
    from duet_export.runtimes import ProviderSettings

    prepack = "session.disable_prepacking"
    plain = OnnxVLM(bundles / "cpu", provider="cpu")
    shared = OnnxVLM(bundles / "cpu", provider="cpu", settings=ProviderSettings(share_weights=True))
    for session in shared.bundle.sessions.values():
        assert session.get_session_options().get_session_config_entry(prepack) == "1"
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises for an entry never set
        next(iter(plain.bundle.sessions.values())).get_session_options().get_session_config_entry(prepack)
    settings = GenerationSettings(max_new_tokens=8)
    expected = [a.token_ids for a in plain.generate(IMAGES, PROMPTS, settings)]
    assert [a.token_ids for a in shared.generate(IMAGES, PROMPTS, settings)] == expected


def test_weights_are_shared_when_packed_copies_would_not_fit(bundles, monkeypatch):
    """On the CPU, a bundle whose packed weights would exceed the memory available opens with the weights
    shared (and says so); with room to spare, the sessions pack them as onnxruntime does by default."""
    from duet_export.runtimes import session as session_module

    prepack = "session.disable_prepacking"
    monkeypatch.setattr(session_module, "available_memory", lambda: 1024)
    notes: list[str] = []
    tight = OnnxVLM(bundles / "cpu", provider="cpu", on_note=notes.append)
    assert tight.bundle.settings.share_weights and any("share the mapped weights" in n for n in notes)
    for session in tight.bundle.sessions.values():
        assert session.get_session_options().get_session_config_entry(prepack) == "1"
    monkeypatch.setattr(session_module, "available_memory", lambda: 1 << 50)
    roomy = OnnxVLM(bundles / "cpu", provider="cpu")
    assert not roomy.bundle.settings.share_weights

"""Provider selection and token choice: pure logic, no bundle needed."""

from __future__ import annotations

import numpy as np
import pytest

from duet_export.answers import GenerationSettings
from duet_export.errors import DuetError
from duet_export.runtimes import generate, providers
from duet_export.runtimes.providers import ProviderSettings, select_providers


def _offer(monkeypatch, *names):
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: list(names))


def test_auto_prefers_migraphx_then_cuda_then_cpu(monkeypatch):
    _offer(monkeypatch, "CUDAExecutionProvider", "MIGraphXExecutionProvider", "CPUExecutionProvider")
    assert [p for p, _ in select_providers()] == ["MIGraphXExecutionProvider", "CPUExecutionProvider"]
    _offer(monkeypatch, "CUDAExecutionProvider", "CPUExecutionProvider")
    assert [p for p, _ in select_providers()] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    _offer(monkeypatch, "CPUExecutionProvider")
    assert select_providers() == [("CPUExecutionProvider", {})]


def test_provider_options(monkeypatch, tmp_path):
    monkeypatch.delenv("ORT_MIGRAPHX_MODEL_CACHE_PATH", raising=False)
    _offer(monkeypatch, "MIGraphXExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    settings = ProviderSettings(device_id=1, fp16=True, cache_dir=str(tmp_path / "cache"), cuda_graph=True)
    (_, opts), _ = select_providers("migraphx", settings)
    assert opts == {"device_id": "1", "migraphx_fp16_enable": "1"}
    assert (tmp_path / "cache").is_dir()
    assert providers.os.environ["ORT_MIGRAPHX_MODEL_CACHE_PATH"] == str(tmp_path / "cache")
    (_name, opts), _ = select_providers("cuda", settings)
    assert opts == {"device_id": "1", "enable_cuda_graph": "1", "use_tf32": "0"}


def test_absent_or_unknown_provider_is_a_clear_error(monkeypatch):
    _offer(monkeypatch, "CPUExecutionProvider")
    with pytest.raises(DuetError, match="install onnxruntime-gpu"):
        select_providers("cuda")
    with pytest.raises(DuetError, match="unknown provider"):
        select_providers("tpu")


def test_greedy_and_sampling_choices():
    rng = np.random.default_rng(0)
    logits = np.array([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]], np.float32)
    greedy = generate.choose_tokens(logits, GenerationSettings(), rng)
    assert greedy.tolist() == [1, 0]
    top1 = GenerationSettings(do_sample=True, top_k=1, seed=0)
    assert generate.choose_tokens(logits, top1, rng).tolist() == [1, 0]
    nucleus = GenerationSettings(do_sample=True, top_p=0.01, seed=0)
    assert generate.choose_tokens(logits, nucleus, rng).tolist() == [1, 0]
    hot = GenerationSettings(do_sample=True, temperature=100.0, seed=0)
    draws = {int(generate.choose_tokens(logits, hot, rng)[0]) for _ in range(50)}
    assert len(draws) > 2  # a high temperature spreads the choice

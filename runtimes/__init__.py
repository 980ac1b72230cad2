"""onnxruntime side: provider selection, sessions, and the generation loop over per-group KV caches."""

from duet_export.runtimes.generate import OnnxVLM, choose_tokens
from duet_export.runtimes.providers import ProviderSettings, available, select_providers
from duet_export.runtimes.session import Bundle

__all__ = ["Bundle", "OnnxVLM", "ProviderSettings", "available", "choose_tokens", "select_providers"]

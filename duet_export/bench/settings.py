"""What one benchmark run measures: its settings, its configurations (cases) and onnxruntime variants."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from duet_export.config import NEW_CONFIG_POSITIONS, DuetConfig
from duet_export.stages.budget import resolve_budget

ONNX = "onnxruntime"
EAGER = "eager"


@dataclass(frozen=True)
class BenchSettings:
    budgets: tuple[float, ...] = ()  # default: N/3 and N/9 (the paper's 192 and 64 of 576)
    repeats: int = 7
    warmup: int = 2
    decode_tokens: int = 8
    prompt_tokens: int = 32
    provider: str = "cpu"
    # onnxruntime is timed once per thread-pool setting (`runtimes.threads`); the first is the one the
    # ratios use, the others show what it changes (per-session: onnxruntime's spinning default, "before").
    thread_pools: tuple[str, ...] = ("no-spin", "per-session")
    threads: int = 0
    # also time (and measure the peak memory of) the first target and pool with the sessions reading the
    # memory-mapped weights in place (`ProviderSettings.share_weights`, no packed copy per session)
    share_weights: bool = False
    # export targets of the timed bundles, each its own onnxruntime backend (cuda: lowered, static, fused
    # attention; migraphx: the same without the fusion); the first is the one the ratios use
    targets: tuple[str, ...] = ("cpu",)
    cuda_graph: bool = False  # also time the step replayed as a CUDA graph
    dtype: str = "float32"  # weights of the bundles and of the eager model
    # the bundles' linear weights: "float" (the dtype), or "int8" / "int4" (MatMulNBits); eager keeps the
    # dtype's, so the comparison is then quantized onnxruntime against float eager, as the report says
    weights: str = "float"
    eager: bool = True
    eager_device: str = "cpu"
    # PyTorch's OpenMP threads wait by spinning ("active", its default) or sleeping ("passive", as
    # onnxruntime's no-spin). On a machine shared with other jobs the spinning team is stable only when
    # the cores are free (eager TTFT 0.35 s or 5 s on the mini shape, by the moment), so eager is timed
    # under each; the ratios take the faster of them, metric by metric.
    eager_omp: tuple[str, ...] = ("passive", "active")
    # Each backend's rounds are split over this many passes, the backends' processes taking turns
    # (onnxruntime, eager, onnxruntime, eager, ...): one process at a time still, but a change in the
    # machine's load during the run falls on every backend instead of on whichever ran then.
    passes: int = 2
    memory: bool = True
    overhead: bool = True
    sweep: bool = True
    sweep_prompts: tuple[int, ...] = (32, 256)
    sweep_sizes: tuple[int, ...] = (224, 336, 448)
    positions: str | None = None  # the compressed bundles' `positions` (None: NEW_CONFIG_POSITIONS)
    # Export, time and delete one configuration's bundle at a time (bundles of a large model on a small disk).
    discard_bundles: bool = False
    layers: int | None = None  # a named shape's decoder depth, if not its own

    def config(self, budget: float, adapter) -> DuetConfig:
        """A compressed case's config: `budget` resolved for `adapter`, with the run's `positions` (the new
        configs' default when it names none)."""
        config = resolve_budget(budget, adapter.geometry(), rules=adapter.rules)
        return replace(config, positions=self.positions or NEW_CONFIG_POSITIONS)


@dataclass
class Case:
    name: str
    config: DuetConfig | None
    bundles: dict[str, Path]  # export target -> bundle folder

    @property
    def bundle(self) -> Path:
        """The first target's bundle (stage profiles, memory, KV bytes)."""
        return next(iter(self.bundles.values()))


@dataclass(frozen=True)
class OnnxVariant:
    """One way of running the bundles on onnxruntime, timed as its own backend."""

    target: str
    thread_pool: str
    cuda_graph: bool = False
    share_weights: bool = False

    def label(self, settings: BenchSettings) -> str:
        parts = []
        if len(settings.targets) > 1:
            parts.append(f"{self.target} bundle")
        if self.thread_pool != settings.thread_pools[0]:
            parts.append(f"{self.thread_pool} pools")
        if self.cuda_graph:
            parts.append("CUDA graph")
        if self.share_weights:
            parts.append("shared weights")
        return ONNX + (f" ({', '.join(parts)})" if parts else "")


def onnx_variants(settings: BenchSettings) -> list[OnnxVariant]:
    """The first target under the first thread pool first (the ratios use it), then the others."""
    out = [OnnxVariant(t, pool) for t in settings.targets for pool in settings.thread_pools]
    if settings.cuda_graph:
        out += [OnnxVariant(t, settings.thread_pools[0], True) for t in settings.targets]
    if settings.share_weights:
        out.append(OnnxVariant(settings.targets[0], settings.thread_pools[0], share_weights=True))
    return out


def eager_label(omp: str) -> str:
    return f"PyTorch eager (OpenMP {omp})"

"""Fine-tune with DUET in the forward pass, on the Hugging Face Trainer.

The Trainer is the engine: multi-GPU (DDP, FSDP, DeepSpeed through `accelerate launch`), mixed precision,
checkpoints in safetensors and exact resumption all come from it. This module only supplies what is DUET's:
the batches (chat template, K_d + K_c placeholders per image, salient-query mask, labels on the answer
only), the compressed forward (`compress` before training), which parts train, and a progress line with
loss and tokens/s.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from duet_export.compression import compress, decompress
from duet_export.config import DuetConfig
from duet_export.data.records import TrainingExample
from duet_export.errors import DuetError, one_line
from duet_export.forward import IGNORE_INDEX
from duet_export.inputs import encode_prompts, placeholders_per_image
from duet_export.loading import LoadedModel, load_visual
from duet_export.prompts import encode_follow_up
from duet_export.training_output import restore_weights, save_final, training_folder

__all__ = [
    "PARTS",
    "TrainResult",
    "TrainSettings",
    "VQACollator",
    "parse_parts",
    "squeezed_positions",
    "train",
]

PARTS = ("vision", "projector", "llm")


def parse_parts(text: str) -> tuple[str, ...]:
    """`--train` / `--train-parts` text -> part names: "all", or a comma-separated subset of PARTS (checked
    when training starts, so that the error names what was given)."""
    return PARTS if text.strip() == "all" else tuple(p.strip() for p in text.split(",") if p.strip())


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    train: tuple[str, ...] = ("projector", "llm")  # the reference: vision tower frozen
    save_steps: int = 500
    seed: int = 0
    grad_accum: int = 1
    log_steps: int = 10
    resume: bool = False
    force: bool = False  # start over in an output folder that holds an earlier run
    progress: bool = True
    # Uncompressed training only: each example's visual positions are squeezed into a random span of
    # (1 - s)..1 times their number (several tokens share a position), so that the decoder cannot find an
    # image region by its tokens' place in the sequence, a place that compression renumbers.
    position_squeeze: float = 0.0
    stop_after: int | None = None  # stop (with a checkpoint) at this step, as an interrupted run would


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0
    stopped: bool = False  # stopped early by `stop_after`: no final model was written
    started: bool = False  # the first step began (a resumed run has restored its state by then)

    @property
    def median_step_seconds(self) -> float:
        return float(np.median(self.step_seconds)) if self.step_seconds else float("nan")


class VQACollator:
    """Examples (an image and one or more question/answer turns) -> a left-padded batch with labels on the
    answer tokens only and the salient-query mask on every question."""

    def __init__(self, loaded: LoadedModel, config: DuetConfig | None, position_squeeze: float = 0.0) -> None:
        if not 0.0 <= position_squeeze < 1.0:
            raise DuetError(f"--position-squeeze must be in [0, 1), got {position_squeeze}")
        if position_squeeze and (config is not None or "compact" not in loaded.adapter.position_modes):
            raise DuetError(
                "--position-squeeze applies to uncompressed training of a family whose compression "
                f"renumbers positions (LLaVA, Video-LLaVA), not to {loaded.adapter.family}"
                + (" with compression on" if config is not None else "")
            )
        self.position_squeeze = position_squeeze
        self.processor = loaded.processor
        self.image_token_id = loaded.adapter.image_token_id
        self.adapter = loaded.adapter
        self.tokens_per_image = placeholders_per_image(loaded.adapter, config)
        tok = loaded.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.eos = tok.eos_token_id

    def _answer_ids(self, answer: str) -> list[int]:
        ids = list(self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        return ids + ([self.eos] if self.eos is not None else [])

    def __call__(self, examples: Sequence[TrainingExample]) -> dict[str, torch.Tensor]:
        rows, pixels = [], []
        for ex in examples:
            image = load_visual(ex.image, self.adapter)
            enc = encode_prompts(
                self.processor, self.image_token_id, [image], [ex.question], self.tokens_per_image,
                media=self.adapter.media, frames=self.adapter.frames,
            )  # fmt: skip
            ids = enc.input_ids[0].tolist()
            query = enc.query_mask[0].tolist() if enc.query_mask is not None else [False] * len(ids)
            labels = [IGNORE_INDEX] * len(ids)
            for k, (question, answer) in enumerate(ex.turns):
                if k:
                    follow, follow_query = encode_follow_up(
                        self.processor, ex.turns[:k], question, media=self.adapter.media
                    )
                    ids, labels, query = (
                        ids + follow,
                        labels + [IGNORE_INDEX] * len(follow),
                        query + follow_query,
                    )
                answer_ids = self._answer_ids(answer)
                ids, labels, query = ids + answer_ids, labels + answer_ids, query + [False] * len(answer_ids)
            rows.append((ids, labels, query))
            pixels.append(enc.pixel_values)
        width = max(len(r[0]) for r in rows)
        b = len(rows)
        ids = torch.full((b, width), self.pad, dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        query = torch.zeros((b, width), dtype=torch.bool)
        for i, (r_ids, r_labels, r_query) in enumerate(rows):
            n = len(r_ids)
            ids[i, width - n :] = torch.tensor(r_ids)
            labels[i, width - n :] = torch.tensor(r_labels)
            mask[i, width - n :] = 1
            query[i, width - n :] = torch.tensor(r_query)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            **self.adapter.pixel_inputs(torch.from_numpy(np.concatenate(pixels))),
            "duet_query_mask": query,
        }
        if self.position_squeeze:
            batch["position_ids"] = squeezed_positions(
                ids == self.image_token_id, mask, self.position_squeeze
            )
        return batch


def squeezed_positions(visual: torch.Tensor, mask: torch.Tensor, squeeze: float) -> torch.Tensor:
    """Position ids (B, T) where each row's M visual tokens (`visual`, in order) take only K positions, K
    drawn uniformly from [ceil((1 - squeeze) M), M] with the global torch RNG (which the Trainer seeds and
    restores on resume): visual token j sits at floor(j K / M) past the block's start, and the text after
    the block continues from start + K, as it would after a compression that kept K tokens. Padding gets 0."""
    steps = mask.clone()
    for row in range(visual.shape[0]):
        where = visual[row].nonzero().flatten()
        m = len(where)
        if m < 2:
            continue
        k = int(torch.randint(math.ceil((1 - squeeze) * m), m + 1, ()))
        j = torch.arange(m)
        # 1 for the block's first token and wherever floor(j K / M) moves on; 0 where tokens share a place
        steps[row, where] = torch.where(j == 0, 1, (j * k) // m - ((j - 1) * k) // m)
        after = int(where[-1]) + 1
        if after < steps.shape[1]:
            steps[row, after] += k - 1 - ((m - 1) * k) // m
    return (steps.cumsum(-1) - 1).clamp(min=0) * mask


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _freeze(loaded: LoadedModel, parts: Sequence[str]) -> int:
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise DuetError(
            f"--train takes a comma-separated subset of {', '.join(PARTS)} (or all); got {list(parts)}"
        )
    trainable = 0
    for name, params in loaded.adapter.parameter_groups().items():
        for p in params:
            p.requires_grad_(name in parts)
            trainable += p.numel() if name in parts else 0
    return trainable


def _callbacks(result: TrainResult, stop_after: int | None):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Step times and tokens/s for the result and the log line (the Trainer draws the progress bar)."""

        def __init__(self) -> None:
            self.start = 0.0
            self.tokens = 0
            self.seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            result.started = True
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            result.step_seconds.append(time.perf_counter() - self.start)
            self.seconds += result.step_seconds[-1]
            if state.global_step == state.max_steps:
                control.should_log = True  # so that every run reports a final loss
            if stop_after is not None and state.global_step >= stop_after:
                control.should_save = True
                control.should_training_stop = True
                result.stopped = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None:
                return
            seen = state.num_input_tokens_seen or 0
            if "loss" in logs:
                result.losses.append(float(logs["loss"]))
                rate = (seen - self.tokens) / max(self.seconds, 1e-9)
                logs["tokens_per_s"] = round(rate, 1)
                result.tokens_per_second = rate
                self.tokens, self.seconds = seen, 0.0

    return [Progress()]


def train(
    loaded: LoadedModel,
    examples: Sequence[TrainingExample],
    output_dir: str | os.PathLike,
    config: DuetConfig | None,
    settings: TrainSettings | None = None,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train `loaded` on `examples` with `config` active (None: uncompressed); write a checkpoint to `output_dir`.

    Intermediate checkpoints (model, optimizer, scheduler, RNG) go to `output_dir/checkpoints`; `resume`
    continues from the last one exactly. The final model, processor and `duet_config.json` land in
    `output_dir` itself, which `compress`, `inspect`, `export` and `eval` then accept. What `output_dir` may
    hold, and when a run may be resumed or started over: `duet_export.training_output`.
    """
    settings = settings or TrainSettings()
    if settings.steps < 1 or settings.batch_size < 1 or settings.grad_accum < 1:
        raise DuetError("--steps, --batch-size and --grad-accum must be at least 1")
    reference = loaded.adapter.position_mode(None)
    with training_folder(
        output_dir, config, settings, inputs=[loaded.path], reference_positions=reference
    ) as out:
        return _train_into(loaded, examples, out, config, settings, echo)


def _train_into(loaded, examples, out: Path, config, settings: TrainSettings, echo) -> TrainResult:
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    checkpoints = out / "checkpoints"
    enabled = config if config is not None and config.enabled else None
    collator = VQACollator(loaded, enabled, settings.position_squeeze)  # checks the squeeze before any work
    model = loaded.model
    trainable = _freeze(loaded, settings.train)
    resume_from = restore_weights(model, checkpoints) if settings.resume else None
    if enabled is not None:
        compress(model, enabled)
    else:
        decompress(model)
    echo(
        f"training {trainable:,} parameters ({', '.join(settings.train)}), "
        + (config.describe() if config else "uncompressed")
    )
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=settings.log_steps,
        save_steps=settings.save_steps,
        save_strategy="steps",
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not settings.progress,
        include_num_input_tokens_seen=True,
        use_cpu=not torch.cuda.is_available(),
    )
    result = TrainResult(output_dir=out, steps=settings.steps)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_ListDataset(examples),
        data_collator=collator,
        callbacks=_callbacks(result, settings.stop_after),
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except Exception as e:
        if resume_from is None or result.started:
            raise
        # nothing ran yet: the Trainer failed to restore the optimizer, scheduler or RNG state
        raise DuetError(f"--resume: cannot restore {resume_from}: {one_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    if not result.stopped:
        save_final(loaded, out, config)
    return result

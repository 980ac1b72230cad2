"""Generation on onnxruntime over a KV cache whose layer groups hold different numbers of tokens.

Stage 2 makes later decoder layers keep fewer tokens, so no existing runtime (onnxruntime-genai keeps one
sequence length for every layer) can hold the cache. The loop here keeps one fixed-capacity numpy buffer
per layer: group g holds `group_lengths[g]` prompt tokens plus room for the new ones, and a per-group mask
says which slots are real. Every shape is fixed at export, so a static compiler never recompiles.

    from duet_export.runtimes import OnnxVLM
    vlm = OnnxVLM("bundle")
    print(vlm.answer("photo.png", "What is in the image?"))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from duet_export.answers import Answer, GenerationSettings, decode_answer
from duet_export.errors import DuetError
from duet_export.export.manifest import position_mode
from duet_export.images import open_image, to_rgb
from duet_export.prompts import EncodedPrompts, encode_prompts
from duet_export.runtimes.binding import BoundSession
from duet_export.runtimes.kv_cache import DeviceCache, Transfers
from duet_export.runtimes.providers import ProviderSettings
from duet_export.runtimes.session import Bundle, run_named
from duet_export.video import open_clip

__all__ = ["DecodeState", "OnnxVLM", "choose_tokens"]

ImageLike = str | os.PathLike | Image.Image


def choose_tokens(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator) -> np.ndarray:
    """[B, vocab] logits -> [B] token ids: argmax, or sampling with temperature / top-k / top-p."""
    if not settings.do_sample:
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64) / max(settings.temperature, 1e-6)
    if settings.top_k:
        kth = np.sort(scores, axis=-1)[:, -settings.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if settings.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p > settings.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


@dataclass
class DecodeState:
    """The cache between steps: one buffer per layer, one mask per layer group, the steps taken so far.

    Group g's next free slot is `group_lengths[g] + steps`: every group grows by one token per step. With a
    device cache (`OnnxVLM(device_cache=True)`) `keys`/`values` stay empty: the buffers live in the
    provider's memory (`OnnxVLM.cache`) and `masks` is the host's copy as of the prefill.
    """

    keys: list[np.ndarray]
    values: list[np.ndarray]
    masks: list[np.ndarray]  # [B, capacity_g] int64, 1 on real tokens
    steps: int = 0
    keep_index: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class OnnxVLM:
    """A bundle ready to answer prompts: `answer(image, prompt)`, `generate(images, prompts)`."""

    def __init__(
        self,
        bundle: str | os.PathLike | Bundle,
        provider: str = "auto",
        settings: ProviderSettings | None = None,
        *,
        on_note: Callable[[str], None] | None = None,
        io_binding: bool | None = None,
        device_cache: bool | None = None,
    ) -> None:
        self.bundle = (
            bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, provider, settings, on_note=on_note)
        )
        device = "cuda" if self.bundle.provider == "CUDAExecutionProvider" else "cpu"
        # The K/V cache in the provider's memory (`runtimes.kv_cache`), so that on CUDA it never crosses to
        # the host between steps. The CPU provider runs the same IOBinding code on host memory (measured
        # as fast as the numpy loop, or slightly faster: mini decode 12.4 vs 12.9 ms full, 9.6 vs 9.9 ms
        # budget 64). MIGraphX keeps the numpy loop: which OrtValue device its Python binding allocates on
        # was not checked without the hardware. `device_cache=False` gives the numpy loop anywhere.
        asked = device_cache
        if device_cache is None:
            device_cache = self.bundle.provider != "MIGraphXExecutionProvider"
        self.cache = None
        if device_cache:
            try:
                self.cache = DeviceCache(
                    self.bundle.sessions,
                    list(self.bundle.manifest["layer_group_of"]),
                    self.bundle.settings,
                    device,
                )
            except DuetError as e:  # a graph the device cache cannot hold: the numpy loop, unless asked for
                if asked:
                    raise
                (on_note or (lambda message: None))(f"K/V cache kept on the host: {e}")
        # Fixed buffers for the step graph: required for CUDA-graph replay (the device cache has its own).
        bind = self.bundle.settings.cuda_graph if io_binding is None else io_binding
        self._step_runner = (
            BoundSession(self.bundle.sessions["step"], device, self.bundle.settings.device_id)
            if bind and self.cache is None
            else None
        )
        self._host_transfers = Transfers()
        self.manifest = self.bundle.manifest
        self.processor = self.bundle.processor
        self.on_note = on_note or (lambda message: None)
        m = self.manifest
        self.batch = int(m["batch"])
        self.prompt_length = int(m["prompt_length"])
        self.capacity = [int(c) for c in m["cache_capacity"]]
        self.group_lengths = [int(t) for t in m["group_lengths"]]
        self.layer_group = [int(g) for g in m["layer_group_of"]]
        self.layer_groups = [tuple(g) for g in m["layer_groups"]]
        self.drop_layers = [int(x) for x in m["drop_layers"]]
        # "compact" or "keep": fixed at export, computed in the graphs (absent in older bundles: compact)
        self.position_mode = position_mode(m)
        self.max_new_tokens = int(m["options"]["max_new_tokens"])
        width = {o.name: o.shape for o in self.bundle.sessions["step"].get_outputs()}["logits"][-1]
        self.vocab_size = width if isinstance(width, int) else None
        self.float_dtype = self.bundle.pixel_dtype
        if hasattr(type(self.processor), "duet_image_size"):  # resizes every image to the bundle's size
            self.processor.duet_image_size = tuple(int(x) for x in m["image"]["size"])

    # ----------------------------------------------------------------------------------- inputs
    def load_image(self, image: ImageLike) -> Image.Image:
        """An RGB image; other sizes and modes are converted by the checkpoint's processor, with a note."""
        name = "the image"
        if not isinstance(image, Image.Image):
            name, image = str(image), open_image(image)
        mode = image.mode
        image = to_rgb(image, name)
        if mode != "RGB":
            self.on_note(f"image mode {mode} converted to RGB")
        h, w = self.manifest["image"]["size"]
        if image.size != (w, h):
            self.on_note(
                f"image {image.width}x{image.height} resized to the bundle's {w}x{h}: "
                f"{self.manifest['image'].get('preprocessing', 'by the checkpoint image processor')}"
            )
        return image

    def load_visual(self, item) -> Image.Image | list[Image.Image]:
        """One visual input: an image, or for a video bundle a clip (a folder of frames, a video file or a
        list of images) of exactly the bundle's frame count."""
        if self.manifest["image"].get("media", "image") != "video":
            return self.load_image(item)
        frames = int(self.manifest["image"]["frames"])
        if isinstance(item, (str, os.PathLike)):
            item = open_clip(item, frames)
        elif isinstance(item, Image.Image):
            raise DuetError(
                "a video bundle takes a clip (a list of frames, a folder of frames or a video file)"
            )
        return [self.load_image(frame) for frame in item]  # encode_prompts checks the frame count

    def encode(
        self, images: Sequence[ImageLike], prompts: Sequence[str], raw: bool = False
    ) -> EncodedPrompts:
        """Prompts -> fixed-width arrays (prompt_length wide, one image run of the bundle's token count)."""
        image = self.manifest["image"]
        if len(prompts) > self.batch:
            raise DuetError(f"{len(prompts)} prompts for a bundle exported with --batch {self.batch}")
        pil = [self.load_visual(im) for im in images]
        enc = encode_prompts(
            self.processor,
            int(image["image_token_id"]),
            pil,
            prompts,
            int(image["tokens_per_image"]),
            raw=raw,
            width=self.prompt_length,
            media=image.get("media", "image"),
            frames=int(image["frames"]),
        )
        rows = int(image.get("pixel_rows", 1))
        shape = image.get("pixel_shape") or [int(image["channels"]), *image["size"]]
        expected = (len(prompts) * int(image["frames"]) * rows, *shape)
        if enc.pixel_values.shape != expected:
            raise DuetError(
                f"the processor made pixels of shape {list(enc.pixel_values.shape)}; the bundle takes {list(expected)}"
            )
        return enc

    def _pad_batch(self, enc: EncodedPrompts) -> dict[str, np.ndarray]:
        """Fill the bundle's fixed batch by repeating the first prompt (its rows are discarded)."""
        n, b = enc.input_ids.shape[0], self.batch
        rows = list(range(n)) + [0] * (b - n)
        frames = int(self.manifest["image"]["frames"])
        per = int(self.manifest["image"].get("pixel_rows", 1))
        pixel_rows = [(r * frames + f) * per + k for r in rows for f in range(frames) for k in range(per)]
        query = enc.query_mask if enc.query_mask is not None else np.zeros_like(enc.input_ids, dtype=bool)
        return {
            "input_ids": enc.input_ids[rows],
            "attention_mask": enc.attention_mask[rows],
            "query_mask": query[rows],
            "pixel_values": enc.pixel_values[pixel_rows].astype(self.float_dtype),
        }

    # ----------------------------------------------------------------------------------- graphs
    def vision(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return run_named(self.bundle.sessions["vision"], {"pixel_values": pixel_values})

    def prefill_feed(
        self, inputs: dict[str, np.ndarray], vision: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The prefill graph's inputs: the prompt arrays and the vision graph's features, one row per prompt."""
        features = vision["image_features"]
        feed = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "image_features": features.reshape(self.batch, -1, features.shape[-1]),
            "query_mask": inputs["query_mask"],
        }
        if "stage1_kept" in vision:  # which patch each placeholder holds: M-RoPE positions
            feed["stage1_kept"] = vision["stage1_kept"].reshape(self.batch, -1)
        return feed

    def prefill(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, DecodeState]:
        """Vision + prefill -> (last logits [B, vocab], the cache laid out for the step graph)."""
        timings = {}
        start = time.perf_counter()
        vision = self.vision(inputs["pixel_values"])
        timings["vision"] = time.perf_counter() - start
        start = time.perf_counter()
        state = DecodeState(keys=[], values=[], masks=[], timings=timings)
        feed = self.prefill_feed(inputs, vision)
        if self.cache is not None:
            masks = lambda named: self._capacity_masks(inputs["attention_mask"], named)  # noqa: E731
            named = self.cache.prefill(feed, masks, owner=state)
            state.masks = masks(named)
        else:
            named = run_named(self.bundle.sessions["prefill"], feed)
            state.masks = self._capacity_masks(inputs["attention_mask"], named)
        timings["prefill"] = time.perf_counter() - start
        state.keep_index = {k: v for k, v in named.items() if k.startswith("keep_index.")}
        state.keep_index.update({k: v for k, v in vision.items() if k.startswith("stage1_")})
        if self.cache is not None:
            return named["logits"][:, -1], state
        for i, g in enumerate(self.layer_group):
            for kind, out in (("key", state.keys), ("value", state.values)):
                present = named[f"present.{i}.{kind}"]
                buf = np.zeros((*present.shape[:2], self.capacity[g], present.shape[3]), dtype=present.dtype)
                buf[:, :, : present.shape[2]] = present
                out.append(buf)
        return named["logits"][:, -1], state

    def _capacity_masks(self, attention_mask: np.ndarray, named: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Each group's mask over its whole cache capacity: the prompt's real tokens, then empty slots."""
        out = []
        for mask, cap in zip(self._group_masks(attention_mask, named), self.capacity, strict=True):
            buf = np.zeros((self.batch, cap), dtype=np.int64)
            buf[:, : mask.shape[1]] = mask
            out.append(buf)
        return out

    def _group_masks(self, attention_mask: np.ndarray, named: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Each group's padding mask: the previous group's, gathered through the drop layer's keep_index."""
        masks = [attention_mask]
        for start, _ in self.layer_groups[1:]:
            index = named.get(f"keep_index.{start}")
            masks.append(masks[-1] if index is None else np.take_along_axis(masks[-1], index, axis=1))
        return masks

    def step(self, tokens: np.ndarray, state: DecodeState) -> np.ndarray:
        """One decode step for [B] tokens; writes the new K/V into the cache, returns logits [B, vocab]."""
        if state.steps >= self.max_new_tokens:
            raise DuetError(
                f"the bundle's cache holds {self.max_new_tokens} new tokens (see --max-new-tokens)"
            )
        tokens = tokens.reshape(self.batch, 1).astype(np.int64)
        slots = [length + state.steps for length in self.group_lengths]
        if self.cache is not None:
            logits = self.cache.step(tokens, slots, owner=state)
            state.steps += 1
            return logits[:, -1]
        feed = {"input_ids": tokens}
        for g, mask in enumerate(state.masks):
            feed[f"past_mask.{g}"] = mask
        for i in range(len(self.layer_group)):
            feed[f"past.{i}.key"] = state.keys[i]
            feed[f"past.{i}.value"] = state.values[i]
        if self._step_runner is not None:
            outs = self._step_runner.run(feed)
        else:
            outs = run_named(self.bundle.sessions["step"], feed)
        # what this loop hands the provider and takes back: on a GPU, all of it crosses to the device
        self._host_transfers.step(sum(a.nbytes for a in feed.values()), sum(a.nbytes for a in outs.values()))
        for i, g in enumerate(self.layer_group):
            state.keys[i][:, :, slots[g]] = outs[f"new.{i}.key"][:, :, 0]
            state.values[i][:, :, slots[g]] = outs[f"new.{i}.value"][:, :, 0]
        for g, slot in enumerate(slots):
            state.masks[g][:, slot] = 1
        state.steps += 1
        return outs["logits"][:, -1]

    @property
    def transfers(self) -> Transfers:
        """Bytes handed between host and provider memory so far (instrumented; see `runtimes.kv_cache`)."""
        return self.cache.transfers if self.cache is not None else self._host_transfers

    def transfer_report(self) -> dict:
        """Per decode step: bytes between host and device, and where the cache lives."""
        t = self.transfers
        return {
            "cache": "device" if self.cache is not None else "host",
            "per_step_bytes": t.per_step(),
            "steps": t.steps,
        }

    # ----------------------------------------------------------------------------------- generation
    def generate(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        settings: GenerationSettings | None = None,
        *,
        raw: bool = False,
    ) -> list[Answer]:
        """One answer per (image, prompt); more prompts than the bundle's batch run in chunks."""
        settings = settings or GenerationSettings(max_new_tokens=self.max_new_tokens)
        settings.validate(most_new_tokens=self.max_new_tokens, vocab_size=self.vocab_size)
        if len(images) != len(prompts):
            raise DuetError(f"{len(images)} images for {len(prompts)} prompts")
        answers: list[Answer] = []
        rng = np.random.default_rng(settings.seed)
        for first in range(0, len(prompts), self.batch):
            chunk = slice(first, first + self.batch)
            answers += self._generate_chunk(list(images[chunk]), list(prompts[chunk]), settings, rng, raw)
        return answers

    def _generate_chunk(self, images, prompts, settings, rng, raw) -> list[Answer]:
        enc = self.encode(images, prompts, raw=raw)
        tokens = self.generate_ids(self._pad_batch(enc), settings, rng)[: len(prompts)]
        tok = self.processor.tokenizer
        answers = []
        for row, length in zip(tokens, enc.lengths, strict=True):
            text, ids = decode_answer(tok, row)
            answers.append(Answer(text=text, token_ids=ids, prompt_tokens=length, seconds=self.last_seconds))
        return answers

    def generate_ids(
        self,
        inputs: dict[str, np.ndarray],
        settings: GenerationSettings,
        rng: np.random.Generator | None = None,
        *,
        logits_out: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """The decoding loop on padded inputs -> [B, new] ids (EOS then padding once a row has finished)."""
        rng = rng or np.random.default_rng(settings.seed)
        eos = self.manifest["tokens"]["eos_token_id"]
        pad = self.manifest["tokens"]["pad_token_id"]
        pad = eos if pad is None else pad
        start = time.perf_counter()
        logits, state = self.prefill(inputs)
        finished = np.zeros(self.batch, dtype=bool)
        out = []
        for step in range(settings.max_new_tokens):
            if logits_out is not None:
                logits_out.append(logits)
            chosen = np.where(finished, pad, choose_tokens(logits, settings, rng))
            out.append(chosen)
            if eos is not None:
                finished |= chosen == eos
            if finished.all() or step == settings.max_new_tokens - 1:
                break
            logits = self.step(chosen, state)
        self.last_seconds = time.perf_counter() - start
        self.last_state = state
        return np.stack(out, axis=1)

    def answer(self, image: ImageLike, prompt: str, **settings) -> str:
        """The answer to one prompt about one image (settings as in `GenerationSettings`)."""
        if "max_new_tokens" not in settings:
            settings["max_new_tokens"] = self.max_new_tokens
        return self.generate([image], [prompt], GenerationSettings(**settings))[0].text

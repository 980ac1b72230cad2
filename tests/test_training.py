"""Data, training with DUET in the loop, resumption, and evaluation of models and bundles."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from duet_export.cli import cli
from duet_export.compression import compress
from duet_export.config import DuetConfig
from duet_export.data.griddigits import GridSpec, box_patches, build_griddigits
from duet_export.data.records import read_llava_json, read_questions
from duet_export.errors import DuetError
from duet_export.evaluation import evaluate, normalize_answer
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.forward import DuetTrace
from duet_export.loading import load
from duet_export.prompts import encode_follow_up
from duet_export.runtimes import OnnxVLM
from duet_export.training import TrainSettings, VQACollator, parse_parts, squeezed_positions, train

from conftest import bundle_config, check_conversation_batch
from loops import loop_decoder, loop_v2v, oracle_model, stock_clip_stage1_inputs

SPEC = GridSpec(rows=2, cols=2, cell=32, digit=24, train_images=12, test_images=4, seed=3)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "grid"
    build_griddigits(path, SPEC, echo=lambda m: None)
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_griddigits_is_deterministic_and_splits_are_disjoint(grid, tmp_path):
    again = tmp_path / "again"
    build_griddigits(again, SPEC, echo=lambda m: None)
    for name in ("train.json", "test.jsonl", "spec.json"):
        assert (grid / name).read_bytes() == (again / name).read_bytes(), name
    for image in sorted((grid / "images").iterdir())[:5]:
        assert image.read_bytes() == (again / "images" / image.name).read_bytes()
    splits = json.loads((grid / "spec.json").read_text())["splits"]
    assert not set(splits["train"]["scans"]) & set(splits["test"]["scans"])
    questions = read_questions(grid / "test.jsonl")
    assert {q.kind for q in questions} == {"region", "presence", "count"}
    presence = [q.answer for q in read_questions(grid / "test.jsonl") if q.kind == "presence"]
    assert set(presence) <= {"yes", "no"}
    layout = [json.loads(line) for line in (grid / "train_layout.jsonl").read_text().splitlines()]
    assert len(layout) == SPEC.train_images and all(len(box) == 4 for r in layout for box in r["digits"])
    examples = read_llava_json(grid / "train.json", split_turns=True)
    assert len(examples) == 6 * SPEC.train_images and all(e.image.is_file() for e in examples)
    echoes = [e for e in examples if e.question.startswith("Answer with ")]
    assert len(echoes) == SPEC.train_images
    for e in echoes:  # the answer is the question's own numbers
        assert e.answer.split() == [w.strip(",.") for w in e.question.split() if w.strip(",.").isdigit()]
    # The dense answers depend on the question: which row to read, which digits are present.
    reads = [e for e in examples if e.question.startswith("Read row ")]
    assert len(reads) == SPEC.train_images and all(len(e.answer.split()) == SPEC.cols for e in reads)
    assert sum(e.question == "Which digits are in the image?" for e in examples) == SPEC.train_images


def test_griddigits_augment_distorts_training_digits_only(grid, tmp_path):
    """`--augment`: training digits become distortions of their scans; the test split (questions, layout and
    every test image) stays byte for byte what it is without it."""
    augmented = tmp_path / "augmented"
    build_griddigits(augmented, replace(SPEC, augment=True), echo=lambda m: None)
    for name in ("test.jsonl", "test_layout.jsonl"):
        assert (augmented / name).read_bytes() == (grid / name).read_bytes(), name
    tests = sorted((grid / "images").glob("test_*.png"))
    assert len(tests) == SPEC.test_images
    assert all(p.read_bytes() == (augmented / "images" / p.name).read_bytes() for p in tests)
    trains = sorted((grid / "images").glob("train_*.png"))
    assert sum(p.read_bytes() != (augmented / "images" / p.name).read_bytes() for p in trains) == len(trains)


def test_griddigits_extra_training_counts_ask_about_shown_digits(grid, tmp_path):
    """`train_counts`: more count questions for training, each of a digit the image shows, answered with its
    true count; the test split stays the same."""
    build_griddigits(tmp_path / "counts", replace(SPEC, train_counts=3), echo=lambda m: None)
    assert (tmp_path / "counts" / "test.jsonl").read_bytes() == (grid / "test.jsonl").read_bytes()
    layout = [
        json.loads(line) for line in (tmp_path / "counts" / "train_layout.jsonl").read_text().splitlines()
    ]
    labels = {r["image"]: [box[3] for box in r["digits"]] for r in layout}
    examples = read_llava_json(tmp_path / "counts" / "train.json", split_turns=True)
    counts = [e for e in examples if e.question.startswith("How many cells show a ")]
    assert len(counts) > 2 * SPEC.train_images
    for e in counts:
        digit = int(e.question.split()[-1].rstrip("?"))
        assert int(e.answer) == labels[f"images/{e.image.name}"].count(digit)
    by_image: dict = {}
    for e in counts:
        by_image.setdefault(e.image.name, []).append(int(e.answer))
    assert all(min(answers[1:]) >= 1 for answers in by_image.values() if len(answers) > 1)


def test_griddigits_locate_lists_every_cell_of_a_shown_digit(grid, tmp_path):
    """`locate`: a training question per image, "Which cells show a d?" about a digit it shows, answered
    with every such cell (row and column, reading order); the test split stays the same."""
    build_griddigits(tmp_path / "loc", replace(SPEC, locate=True), echo=lambda m: None)
    assert (tmp_path / "loc" / "test.jsonl").read_bytes() == (grid / "test.jsonl").read_bytes()
    layout = [json.loads(line) for line in (tmp_path / "loc" / "train_layout.jsonl").read_text().splitlines()]
    boxes = {r["image"]: r["digits"] for r in layout}
    examples = read_llava_json(tmp_path / "loc" / "train.json", split_turns=True)
    located = [e for e in examples if e.question.startswith("Which cells show a ")]
    assert len(located) == SPEC.train_images
    for e in located:
        digit = int(e.question.split()[-1].rstrip("?"))
        cells = [f"{y // SPEC.cell + 1} {x // SPEC.cell + 1}" for y, x, _, label in boxes[f"images/{e.image.name}"]
                 if label == digit]  # fmt: skip
        assert cells and e.answer.split(" ; ") == cells


def test_box_patches():
    """A layout box's patches in raster order: one patch when it sits on the patch grid, four when it
    straddles a corner."""
    assert box_patches([8, 40, 8, 3], grid=16, patch=8) == [1 * 16 + 5]
    assert box_patches([4, 4, 8, 1], grid=16, patch=8) == [0, 1, 16, 17]
    assert box_patches([0, 0, 24, 7], grid=4, patch=8) == [0, 1, 2, 4, 5, 6, 8, 9, 10]


@pytest.fixture(scope="module")
def table():
    """benchmarks/accuracy_table.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "accuracy_table.py"
    spec = importlib.util.spec_from_file_location("accuracy_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("video", [False, True], ids=["images", "video"])
def test_accuracy_table_builds_the_published_data(table, video):
    """The table's data follow its recipe, not GridSpec's defaults: the published runs (docs/results/)
    drew each digit at one spot of its cell (jitter off); a table built with jittered digits has a full
    model that cannot answer region questions (70.8 % overall, region 27 %, against 95.3 % / 96.5 %)."""
    import json
    from pathlib import Path

    name = "accuracy-griddigits-video.json" if video else "accuracy-griddigits.json"
    published = json.loads((Path(__file__).parents[1] / "docs" / "results" / name).read_text())["args"]
    args, _ = table.parse_args(["--out", "unused", *(["--video"] if video else [])])
    spec = table.data_spec(args, table.VIDEO_DATA if video else table.DATA)
    assert spec.jitter is False
    chosen = (spec.jitter, spec.conversations, spec.augment, spec.train_counts, spec.locate)
    recorded = tuple(
        published[k] for k in ("jitter", "conversations", "augment_digits", "train_counts", "locate")
    )
    assert chosen == recorded
    assert (spec.train_images, spec.test_images, spec.seed) == (
        published["train_images"],
        published["test_images"],
        published["seed"],
    )


@pytest.fixture(scope="module")
def tower(table):
    """benchmarks/griddigits_tower.py, which the table script imports from beside itself."""
    import griddigits_tower

    return griddigits_tower


def test_tower_counting_targets(tower):
    """The accuracy table's counting tower objective: each patch a digit touches is labelled
    with how many cells of its image show that digit; background is ignored (-100)."""
    layout = [[[0, 0, 8, 7], [0, 16, 8, 7], [8, 8, 8, 3]], [[4, 4, 8, 7]]]
    tallies = tower._digit_tallies(layout, grid=4, patch=8)
    assert tallies[0].tolist() == [2, -100, 2, -100, -100, 1] + [-100] * 10
    assert tallies[1].tolist() == [1, 1, -100, -100, 1, 1] + [-100] * 10


def test_tower_saliency_trains_the_scores_stage1_ranks_by(tower, tiny):
    """The video recipe's CLS saliency loss: the attention the tower learns from is Stage 1's own score (the adapter's
    `vision_layer`, mean over heads), with gradients; its loss is 0 once it is (nearly) even over the digits."""
    adapter = tiny.adapter
    pixels = torch.randn(2, 3, adapter.image_size, adapter.image_size)
    features, attention = tower._tower_outputs(adapter, pixels, saliency=True)
    stage1 = adapter.vision_layer(pixels, need_scores=True)  # as compression calls it: scores only rank
    assert attention.requires_grad and not stage1.cls_attention.requires_grad
    heads = adapter.tower.encoder.layers[adapter.feature_layer_index].self_attn.num_heads
    torch.testing.assert_close(attention, stage1.cls_attention / heads)
    torch.testing.assert_close(features.detach(), stage1.hidden[:, 1:].detach())
    target = torch.full_like(attention, 10, dtype=torch.long)
    target[:, :4] = 3  # four digit patches
    tower._saliency_loss(attention, target).backward()
    assert adapter.tower.encoder.layers[adapter.feature_layer_index].self_attn.q_proj.weight.grad is not None
    even = torch.zeros_like(attention)
    even[:, :4] = 0.25
    spread = torch.full_like(attention, 1 / attention.shape[1])
    nearly = even * 0.95 + spread * 0.05  # 95 % on the digits: within the slack, no pull
    assert float(tower._saliency_loss(even, target)) == 0 and float(tower._saliency_loss(nearly, target)) == 0
    assert float(tower._saliency_loss(spread, target)) > 1  # log(N / 4) - slack


def test_table_defaults_follow_video(table, capsys):
    """Images: the counting tower without CLS saliency and 3,500 + 3,500 + 2,000 steps (the ~46-minute
    recipe); clips: the scans tower with it (full model 57.5 -> 64.5 %), 300 + 5,000 steps, no count steps.
    The recipe-search options are gone (docs/accuracy.md names the commit that has them)."""
    image, defaults = table.parse_args([])
    video, _ = table.parse_args(["--video"])
    assert (image.tower, image.cls_saliency, image.count_steps) == ("distorted-counts", False, 2000)
    assert (image.vision_steps, image.steps) == (3500, 3500)
    assert (video.tower, video.cls_saliency, video.count_steps) == ("scans", True, 0)
    assert (video.vision_steps, video.steps) == (300, 5000)
    assert defaults["cls_saliency"] is False and image.learning_rate == defaults["learning_rate"] == 5e-4
    for gone in (["--tower", "distorted"], ["--cls-saliency"], ["--position-squeeze", "0.5"], ["--jitter"]):
        with pytest.raises(SystemExit):
            table.parse_args(gone)
        assert "unrecognized arguments" in capsys.readouterr().err


def test_table_reuses_a_full_model_wherever_its_folder_now_is(table, tmp_path):
    """An earlier run's full model is reused when every argument that shapes it matches — not the folder's
    path (a copied run reuses it too), not the count steps or the fine-tunes' — and only then."""
    earlier, defaults = table.parse_args(["--out", str(tmp_path / "first"), "--only-full"])
    (tmp_path / "copy" / "full").mkdir(parents=True)
    (tmp_path / "copy" / "full" / "model.safetensors").write_bytes(b"")
    record = {
        "rows": [{"median_step_seconds": 0.25}],
        "args": table.recorded_args(earlier),
        "model": asdict(table.MODEL),
    }
    (tmp_path / "copy" / "results.json").write_text(json.dumps(record))

    def reused(*argv: str) -> float | None:
        args, _ = table.parse_args(["--out", str(tmp_path / "copy"), *argv])
        return table.trained_full_model(tmp_path / "copy", args, table.MODEL, defaults)

    assert reused() == 0.25 and reused("--count-steps", "500", "--finetune-steps", "3000") == 0.25
    assert reused("--video") is None and reused("--seed", "1") is None
    assert reused("--steps", "5000") is None and reused("--vision-steps", "4000") is None


@pytest.mark.parametrize(
    "argv", [["--steps", "0"], ["--finetune-steps", "0"], ["--vision-steps", "-1"], ["--count-steps", "-1"]]
)
def test_table_refuses_bad_step_counts(table, argv, capsys):
    """A step count out of range stops the run before it builds anything, with one line naming the flag."""
    with pytest.raises(SystemExit) as stop:
        table.parse_args(argv)
    assert stop.value.code == 2 and f"{argv[0]} must be at least" in capsys.readouterr().err


@pytest.fixture(scope="module")
def conversation_grid(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "conversations"
    build_griddigits(path, replace(SPEC, conversations=True, augment=True), echo=lambda m: None)
    return path


def test_griddigits_conversations_do_not_give_answers_away(conversation_grid):
    """One conversation per image: region, presence and count first (in random order), then the dense
    answers; the presence digit is never the region answer, the count digit never the presence digit."""
    conversations = read_llava_json(conversation_grid / "train.json")
    assert len(conversations) == SPEC.train_images and all(len(c.turns) == 6 for c in conversations)
    firsts = set()
    for c in conversations:
        kinds = {"What digit is in ": "region", "Is there a ": "presence", "How many cells show a ": "count"}
        asked = {kind: t for t in c.turns[:3] for start, kind in kinds.items() if t[0].startswith(start)}
        assert sorted(asked) == ["count", "presence", "region"]
        presence_digit = int(asked["presence"][0].split()[3])
        assert presence_digit != int(asked["region"][1])
        assert int(asked["count"][0].split()[-1].rstrip("?")) != presence_digit
        firsts.add(c.turns[0][0].split()[0])
    assert len(firsts) > 1  # every kind must also be learnt right after the image


def test_griddigits_clips(tmp_path):
    spec = GridSpec(rows=1, cols=2, cell=32, digit=16, frames=3, train_images=4, test_images=3, seed=1)
    build_griddigits(tmp_path / "clips", spec, echo=lambda m: None)
    questions = read_questions(tmp_path / "clips" / "test.jsonl")
    assert {q.kind for q in questions} == {"region", "presence", "count"}
    assert all(q.image.is_dir() and len(list(q.image.glob("*.png"))) == 3 for q in questions)
    counts = [int(q.answer) for q in questions if q.kind == "count"]
    assert all(0 <= c <= 3 for c in counts) and all(
        "frames" in q.text for q in questions if q.kind == "count"
    )
    region = next(q for q in questions if q.kind == "region")
    assert region.text.startswith("What digit is in frame ")
    examples = read_llava_json(tmp_path / "clips" / "train.json", split_turns=True)
    assert sum(e.question.startswith("Read frame ") for e in examples) == 4
    layout = (tmp_path / "clips" / "train_layout.jsonl").read_text().splitlines()
    assert len(layout) == 4 * 3  # one line per frame image


def test_griddigits_without_jitter_puts_every_digit_at_its_cells_middle_spot(tmp_path):
    spec = GridSpec(rows=2, cols=3, cell=32, digit=8, align=8, jitter=False, train_images=3, test_images=2)
    build_griddigits(tmp_path / "fixed", spec, echo=lambda m: None)
    boxes = [
        box
        for line in (tmp_path / "fixed" / "train_layout.jsonl").read_text().splitlines()
        for box in json.loads(line)["digits"]
    ]
    assert boxes and {(y % 32, x % 32) for y, x, _size, _label in boxes} == {(8, 8)}


def test_a_conversation_trains_as_one_sequence(tiny, conversation_grid):
    conversation = read_llava_json(conversation_grid / "train.json")[0]

    def letters(text):  # the word-level tokenizer decodes "row 1, column 2" as "row 1 , column 2"
        return "".join(ch for ch in text.lower() if ch.isalnum())

    text = letters(check_conversation_batch(tiny, conversation))
    positions = [text.find(letters(q)) for q, _ in conversation.turns]
    assert all(p >= 0 for p in positions) and positions == sorted(positions)


def test_a_conversation_without_a_chat_template_is_a_one_line_error(tiny, conversation_grid):
    conversation = read_llava_json(conversation_grid / "train.json")[0]
    tiny.processor.chat_template = None
    with pytest.raises(DuetError, match="--split-turns"):
        encode_follow_up(tiny.processor, conversation.turns[:1], conversation.turns[1][0])


@pytest.mark.parametrize("query", ["salient", "all"])
def test_a_training_forward_keeps_what_a_loop_keeps_querying_only_the_instruction(
    tiny_dir, conversation_grid, query
):
    """Kept indices, logits and loss of a training forward (labels given) against `loop_decoder` on the
    stock modules: only label-ignored text after the image queries (the final prompt token being the one
    before the first answer), and the labels of dropped tokens are dropped with them."""
    loaded = load(tiny_dir)
    cfg = DuetConfig(dominant=20, contextual=6, drop_layers=(4, 6), keep_ratios=(0.5, 0.25), query=query)
    compress(loaded.model, cfg)
    batch = VQACollator(loaded, cfg)(read_llava_json(conversation_grid / "train.json")[:2])
    assert (batch["labels"] != -100).any(dim=1).all()  # answers to learn: the labels rule applies
    trace = DuetTrace()
    with torch.no_grad():
        out = loaded.model(**batch, duet_trace=trace, use_cache=False)
    oracle = oracle_model(tiny_dir)
    v = cfg.dominant + cfg.contextual
    schedule = {4: v // 2, 6: v // 4}
    total, count = torch.zeros(()), 0
    with torch.no_grad():
        hidden, scores, keys = stock_clip_stage1_inputs(
            oracle.model.vision_tower, batch["pixel_values"], oracle.config.vision_feature_layer
        )
        for b in range(2):
            tokens, *_ = loop_v2v(
                hidden[b], scores[b], keys[b], cfg.dominant, cfg.contextual, cfg.cluster_width
            )
            real = batch["attention_mask"][b].bool()
            ids, labels = batch["input_ids"][b][real], batch["labels"][b][real]
            visual = ids == loaded.adapter.image_token_id
            embeds = oracle.model.language_model.embed_tokens(ids).clone()
            embeds[visual] = oracle.model.multi_modal_projector(tokens)
            kept, logits, kept_labels = loop_decoder(
                oracle, embeds, torch.arange(len(ids)), visual, batch["duet_query_mask"][b][real], schedule,
                query, recompact=True, labels=labels.tolist(),
            )  # fmt: skip
            for layer, indices in kept.items():
                assert trace.stage2[layer][b].tolist() == indices, f"sample {b}, drop before layer {layer}"
            torch.testing.assert_close(out.logits[b][-len(logits) :], logits, atol=1e-4, rtol=1e-5)
            shifted = torch.tensor(kept_labels[1:])
            total += torch.nn.functional.cross_entropy(
                logits[:-1], shifted, ignore_index=-100, reduction="sum"
            )
            count += int((shifted != -100).sum())
    torch.testing.assert_close(out.loss, total / count, atol=1e-5, rtol=1e-5)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tiny_dir, conversation_grid, tmp_path):
    loaded = load(tiny_dir)
    examples = read_llava_json(conversation_grid / "train.json")[:8]  # conversations of 6 turns
    settings = TrainSettings(
        steps=20, batch_size=4, learning_rate=3e-3, warmup_steps=0, log_steps=5, progress=False
    )
    result = train(loaded, examples, tmp_path / "run", bundle_config(loaded), settings, echo=lambda m: None)
    assert len(result.losses) == 4 and result.losses[-1] < result.losses[0]
    assert len(result.step_seconds) == 20
    reloaded = load(tmp_path / "run")  # a normal HF checkpoint directory
    assert reloaded.adapter.family == "llava"
    assert json.loads((tmp_path / "run" / "duet_config.json").read_text())["drop_layers"] == [4, 6]


def _changed_parts(tiny_dir, grid, out, parts: str) -> dict[str, list[bool]]:
    """Train one step with `--train parts`; per part, whether each of its parameter tensors changed."""
    loaded = load(tiny_dir)
    groups = loaded.adapter.parameter_groups()
    before = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
    settings = TrainSettings(steps=1, batch_size=2, warmup_steps=0, progress=False, train=parse_parts(parts))
    train(loaded, read_llava_json(grid / "train.json")[:4], out, None, settings, echo=lambda m: None)
    return {
        name: [not torch.equal(b, p.detach()) for b, p in zip(before[name], params, strict=True)]
        for name, params in groups.items()
    }


def test_frozen_parts_do_not_change(tiny_dir, grid, tmp_path):
    """The default `--train projector,llm`: the vision tower stays as it was, every projector and decoder
    tensor moves."""
    assert TrainSettings().train == ("projector", "llm")
    changed = _changed_parts(tiny_dir, grid, tmp_path / "run", "projector,llm")
    assert not any(changed["vision"])
    assert all(changed["projector"]) and all(changed["llm"])


def test_train_vision_or_all(tiny_dir, grid, tmp_path):
    """`--train vision` moves the tower (the layers up to the feature layer) and nothing else; `--train all`
    moves all three parts."""
    changed = _changed_parts(tiny_dir, grid, tmp_path / "vision", "vision")
    assert any(changed["vision"]) and not any(changed["projector"]) and not any(changed["llm"])
    changed = _changed_parts(tiny_dir, grid, tmp_path / "all", "all")
    assert any(changed["vision"]) and all(changed["projector"]) and all(changed["llm"])


def test_squeezed_positions_give_the_visual_block_a_random_shorter_span():
    visual = torch.zeros(3, 20, dtype=torch.bool)
    visual[:, 4:16] = True  # 12 visual tokens after 4 text tokens, 4 text tokens after
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[2, :2] = 0  # left padding
    visual[2, :2] = False
    assert torch.equal(squeezed_positions(visual, mask, 0.0)[0], torch.arange(20))
    torch.manual_seed(0)
    spans = set()
    for _ in range(40):
        pos = squeezed_positions(visual, mask, 0.75)
        for row in range(3):
            real = pos[row][mask[row].bool()]
            block = pos[row, 4:16]
            span = int(block.unique().numel())
            assert 3 <= span <= 12  # ceil(0.25 * 12) .. 12 places
            assert torch.equal(block.unique(), torch.arange(int(block[0]), int(block[0]) + span))
            assert torch.all(real.diff() >= 0) and torch.all(real.diff()[block.numel() :] <= 1)
            assert int(pos[row, 16]) == int(block[0]) + span  # text resumes where a K-token block ends
            assert torch.equal(pos[row, 16:] - pos[row, 16], torch.arange(4))
            spans.add(span)
        assert torch.all(pos[2, :2] == 0) and int(pos[2, 2]) == 0
    assert len(spans) > 5  # drawn, not fixed


def test_position_squeeze_reaches_the_model_and_only_when_uncompressed(tiny, grid):
    examples = read_llava_json(grid / "train.json")[:4]
    plain = VQACollator(tiny, None)(examples)
    torch.manual_seed(1)
    squeezed = VQACollator(tiny, None, position_squeeze=0.9)(examples)
    assert "position_ids" not in plain and squeezed["position_ids"].shape == squeezed["input_ids"].shape
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(plain[key], squeezed[key])
    visual = squeezed["input_ids"] == tiny.adapter.image_token_id
    places = [int(squeezed["position_ids"][r][visual[r]].unique().numel()) for r in range(4)]
    assert all(p <= int(visual[r].sum()) for r, p in enumerate(places)) and min(places) < int(visual[0].sum())
    with torch.no_grad():
        losses = [float(tiny.model(**{k: v for k, v in b.items() if k != "duet_query_mask"}).loss)
                  for b in (plain, squeezed)]  # fmt: skip
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)  # the positions are used, not dropped
    with pytest.raises(DuetError, match="uncompressed"):
        VQACollator(tiny, bundle_config(tiny), position_squeeze=0.5)
    with pytest.raises(DuetError, match=r"\[0, 1\)"):
        VQACollator(tiny, None, position_squeeze=1.0)


def test_resume_equals_uninterrupted(tiny_dir, grid, tmp_path):
    examples = read_llava_json(grid / "train.json")[:12]
    cfg = bundle_config(load(tiny_dir))
    base = dict(
        steps=6, batch_size=2, learning_rate=1e-3, warmup_steps=2, save_steps=3, progress=False, log_steps=1
    )
    train(load(tiny_dir), examples, tmp_path / "straight", cfg, TrainSettings(**base), echo=lambda m: None)
    first = train(
        load(tiny_dir),
        examples,
        tmp_path / "resumed",
        cfg,
        TrainSettings(**base, stop_after=3),
        echo=lambda m: None,
    )
    assert first.stopped and not (tmp_path / "resumed" / "model.safetensors").exists()
    train(
        load(tiny_dir),
        examples,
        tmp_path / "resumed",
        cfg,
        TrainSettings(**base, resume=True),
        echo=lambda m: None,
    )
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_eval_of_bundle_equals_eval_of_pytorch_model(tiny_dir, grid, tmp_path):
    loaded = load(tiny_dir)
    cfg = bundle_config(loaded)
    questions = read_questions(grid / "test.jsonl")
    pytorch = evaluate(loaded, questions, cfg, batch_size=4, max_new_tokens=3)
    export_bundle(loaded, tmp_path / "b", cfg, ExportOptions("cpu", 32, 3, 2), echo=lambda m: None)
    onnx = evaluate(OnnxVLM(tmp_path / "b", "cpu"), questions, None, max_new_tokens=3)
    assert [a["answer"] for a in onnx.answers] == [a["answer"] for a in pytorch.answers]
    assert onnx.accuracy == pytorch.accuracy
    assert onnx.average_tokens == pytorch.average_tokens and 0.6 < onnx.reduction < 0.7


def test_normalize_answer():
    assert normalize_answer(" Seven.") == "7"
    assert normalize_answer("Yes, there is") == "yes"
    assert normalize_answer("") == ""


def test_train_and_eval_cli(tiny_dir, grid, conversation_grid, tmp_path):
    out = tmp_path / "ckpt"
    for squeeze, compression in (("1.5", ["--no-compress"]), ("0.5", ["--budget", "21"])):
        result = run(
            "train", tiny_dir, grid, "-o", out, *compression, "--position-squeeze", squeeze, "--steps", 2
        )
        assert result.exit_code != 0 and "--position-squeeze" in result.output and not out.exists()
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = run(
        "train", tiny_dir, conversation_grid, "-o", out, "--budget", 21, "--steps", 2, "--batch-size", 2, "--save-steps", 1,
        "--split-turns",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"on {6 * SPEC.train_images} examples" in result.output  # a conversation per image, split: 6 each
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "checkpoint-2").is_dir()
    answers = tmp_path / "answers.jsonl"
    result = run("eval", out, grid / "test.jsonl", "--budget", 21, "--answers", answers, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["total"] == 3 * SPEC.test_images and 0 <= info["accuracy"] <= 1
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == info["total"] and {"question_id", "answer", "expected", "correct"} <= rows[0].keys()
    result = run("train", tiny_dir, grid, "-o", out, "--budget", 21, "--steps", 2)
    assert result.exit_code == 2 and "--resume" in result.stderr


def _bad(tmp_path, grid, records):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records) if not isinstance(records, str) else records)
    return run("train", "unused-model", path, "-o", tmp_path / "o", "--budget", 21, "--image-folder", grid)


@pytest.mark.parametrize(
    "records, message",
    [
        ("{oops", "is not valid JSON"),
        ({"id": 1}, "expected a JSON list"),
        ([{"id": "a", "image": "images/train_00000.png"}], "record 0 (id 'a'): needs"),
        (
            [{"id": "b", "image": "missing.png", "conversations": []}],
            "record 0 (id 'b'): image",
        ),
        (
            [
                {
                    "id": "c",
                    "image": "images/train_00000.png",
                    "conversations": [{"from": "human", "value": "hi"}],
                }
            ],
            "alternate",
        ),
        (
            [
                {
                    "id": "d",
                    "image": "images/train_00000.png",
                    "conversations": [
                        {"from": "human", "value": "no placeholder"},
                        {"from": "gpt", "value": "7"},
                    ],
                }
            ],
            "must hold <image>",
        ),
    ],
)
def test_malformed_training_data(tmp_path, grid, records, message):
    result = _bad(tmp_path, grid, records)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_malformed_questions(tiny_dir, tmp_path, grid):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "image": "images/test_00000.png", "text": "hi"}\n{broken\n')
    result = run("eval", tiny_dir, path, "--budget", 21, "--image-folder", grid)
    assert result.exit_code == 2 and "q.jsonl line 2 is not valid JSON" in result.stderr
    path.write_text('{"question_id": 1, "image": "nope.png", "text": "hi"}\n')
    result = run("eval", tiny_dir, path, "--budget", 21, "--image-folder", grid)
    assert result.exit_code == 2 and "line 1: image" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("video", [False, True], ids=["images", "clips"])
def test_accuracy_table_quick(tmp_path, video):
    """The table's whole pipeline on a few steps (`pytest -m slow`): data, vision pre-training, balanced
    initialisation, training, the five settings at both reductions, table, plot and answers; images and
    clips. For images the full model comes from an earlier `--only-full` run, which the table reuses."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "accuracy_table.py"
    args = [sys.executable, str(script), "--out", str(tmp_path), "--quick", *(["--video"] if video else [])]
    if not video:
        proc = subprocess.run([*args, "--only-full"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        full_only = json.loads((tmp_path / "results.json").read_text())["rows"]
        assert len(full_only) == 1
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert len(result["rows"]) == 9 and (tmp_path / "accuracy.png").is_file()
    assert len(list((tmp_path / "answers").glob("*.jsonl"))) == 9
    answers = (tmp_path / "answers" / "full-model.jsonl").read_text().splitlines()
    assert len(answers) == 24 and all("expected" in json.loads(a) for a in answers)
    if not video:
        assert "reusing the full model" in proc.stdout
        probe = Path(__file__).parents[1] / "benchmarks" / "count_attention.py"
        proc = subprocess.run(
            [sys.executable, str(probe), str(tmp_path / "full"), str(tmp_path / "data")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        layers = [line for line in proc.stdout.splitlines() if line.strip().startswith("layer ")]
        assert layers and all(len(line.split(":")[1].split()) == 4 for line in layers)  # 4 heads
        for line in layers:  # three shares of one head's attention over the visual tokens: at most 1
            assert all(sum(map(float, head.split("/"))) <= 1.01 for head in line.split(":")[1].split())
        for key in ("accuracy", "by_kind", "median_step_seconds"):
            assert result["rows"][0][key] == full_only[0][key]
        again = subprocess.run(args, capture_output=True, text=True)  # a finished --out runs again
        assert again.returncode == 0 and "reusing the full model" in again.stdout, again.stderr[-3000:]
    assert result["family"] == ("video-llava" if video else "llava")
    assert "DUET trained" in (tmp_path / "table.md").read_text()
    if video:  # the same run's settings again with positions=keep (benchmarks/positions_table.py)
        keep = tmp_path.parent / f"{tmp_path.name}-keep"
        tool = [sys.executable, str(script.parent / "positions_table.py"), "--from", str(tmp_path), "--out"]
        proc = subprocess.run([*tool, str(keep)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = json.loads((keep / "results.json").read_text())["rows"]
        assert [r["positions"] for r in rows] == ["compact"] * 9 + ["keep"] * 8
        assert all(r["config"]["positions"] == "keep" for r in rows[9:])
        assert (keep / "accuracy.png").is_file() and len(list((keep / "answers").glob("*.jsonl"))) == 8
        inside = subprocess.run([*tool, str(tmp_path / "keep")], capture_output=True, text=True)
        assert inside.returncode == 2 and "outside --from" in inside.stderr

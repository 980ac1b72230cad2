import pytest
import torch

from duet_export.config import DuetConfig
from duet_export.errors import DuetError
from duet_export.inputs import prepare_inputs, render_prompt
from duet_export.stages.salient import salient_words, token_mask_from_spans


def test_salient_words_keep_question_words_and_content():
    words = salient_words("What digit is in row 2, column 3?", use_spacy=False)
    assert words == ["What", "digit", "row", "2", "column", "3", "?"]
    assert salient_words("Is there a cat on the table: yes or no", use_spacy=False) == [
        "cat",
        "table",
        ":",
        "yes",
    ]


def test_token_mask_from_offsets():
    assert token_mask_from_spans([(0, 4), (5, 7), (8, 11), (0, 0)], [(5, 7)]) == [False, True, False, False]


def test_prepare_inputs_shrinks_image_runs_and_marks_salient_tokens(tiny, images, prompts):
    config = DuetConfig(dominant=10, contextual=2)
    full = prepare_inputs(tiny.processor, tiny.adapter, images, prompts)
    small = prepare_inputs(tiny.processor, tiny.adapter, images, prompts, config)
    image_id = tiny.adapter.image_token_id
    assert ((full["input_ids"] == image_id).sum(1) == 64).all()
    assert ((small["input_ids"] == image_id).sum(1) == 12).all()
    assert "duet_query_mask" not in full
    tok = tiny.tokenizer
    marked = tok.convert_ids_to_tokens(small["input_ids"][0][small["duet_query_mask"][0]])
    assert marked == ["what", "digit", "row", "2", "column", "3", "?"]
    # left padding: the shorter prompt starts with pads
    assert small["attention_mask"][:, -1].all()
    assert small["pixel_values"].shape == (2, 3, 64, 64)


def test_chat_template_and_raw_prompts(tiny):
    text, start = render_prompt(tiny.processor, "What is this?")
    assert text.startswith("USER: <image>") and text.endswith("ASSISTANT:")
    assert text[start:].startswith("What is this?")
    raw, _ = render_prompt(tiny.processor, "<image> describe", raw=True)
    assert raw == "<image> describe"
    with pytest.raises(DuetError, match="0 <image> placeholder"):
        render_prompt(tiny.processor, "describe", raw=True)
    with pytest.raises(DuetError, match="already holds <image>"):
        render_prompt(tiny.processor, "<image> describe")


def test_mismatched_images_and_prompts(tiny, images):
    with pytest.raises(DuetError, match="2 images for 1 prompts"):
        prepare_inputs(tiny.processor, tiny.adapter, images, ["one"])


def test_forward_rejects_wrong_placeholder_count(tiny, images, prompts):
    from duet_export.compression import compress

    config = DuetConfig(dominant=10, contextual=2)
    compress(tiny.model, config)
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images[:1], prompts[:1], config)
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # drop one token: still 12 placeholders, fine
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    inputs["duet_query_mask"] = inputs["duet_query_mask"][:, 1:]
    tiny.model(**inputs)
    image_id = tiny.adapter.image_token_id
    cut = inputs["input_ids"].tolist()[0]
    cut.remove(image_id)
    with pytest.raises(DuetError, match="holds 11 image tokens per image"):
        tiny.model(input_ids=torch.tensor([cut]), pixel_values=inputs["pixel_values"])

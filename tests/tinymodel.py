"""A tiny random Llava model (CLIP vision tower + Llama text model), built and saved locally.

It lets the transformers backend and the CLI run for real (load, chat template, batched
generate) in a few seconds on a CPU, with nothing downloaded. Its answers are gibberish.
"""

from __future__ import annotations

from pathlib import Path

import pytest

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN]
IMAGE_SIZE = 32
PATCH_SIZE = 8

# A llava-1.5 style template: an optional system line, "USER: <image>\n{text}", "ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Words a photo tagger says, plus the JSON punctuation of an answer, so that the trained
# vocabulary covers the prompt and the shape of a reply.
_WORD_TEXT = """
tags description photo image picture cat dog bird horse person woman man child people face
portrait landscape mountain river lake sea beach sky cloud sun sunset night city street road
car bus train bicycle boat house building bridge tree forest flower grass garden field snow
rain water food coffee cup table chair book phone computer astronaut rocket space moon star
red green blue yellow black white brown grey orange pink purple dark bright light colour
indoor outdoor close up wide small large old new one two three four five the a an of in on
with and is are this that there it at by for to from near behind front left right top
bottom centre background foreground sitting standing walking running looking holding
answer only json object list string keys exactly short sentence describe return give
english words lowercase singular noun nouns adjective user assistant system you your
"""
_JSON = ['{"tags": [', '"cat", "animal"', '], "description": "', '."}', "{", "}", "[", "]"]


def _corpus() -> list[str]:
    words = _WORD_TEXT.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += _JSON
    lines += [
        f'{{"tags": ["{a}", "{b}"], "description": "a {a} {b}."}}'
        for a, b in zip(words, words[1:], strict=False)
    ]
    return lines


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_tiny_vlm(dest: Path, seed: int = 0) -> Path:
    """Build a random Llava model with its processor and save both into `dest`; return `dest`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,  # chaotic enough that each photo gets its own answer
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding a tiny random Llava model, built once per test session."""
    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-llava")

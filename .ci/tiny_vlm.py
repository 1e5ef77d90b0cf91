"""Make tiny Qwen2-VL models in GGUF for llama-server, offline, byte-for-byte reproducible.

No weights can be downloaded here, so the models are built from nothing: a byte-level
BPE tokenizer trained on a few sentences with Qwen2's pre-tokenizer rules, special tokens
and chat template, and a Qwen2-VL of a few hundred thousand parameters (seed fixed).
llama.cpp's own convert_hf_to_gguf.py turns each into a text GGUF and a vision projector.

Two models come out:

  random/   random weights: the text is gibberish, but llama-server constrains it to our
            JSON schema by grammar, so answers are valid objects of any length (and a long
            one runs into max_tokens, which is worth testing).
  crafted/  attention and MLP outputs zeroed, so each position sees only its own token;
            the embeddings and lm_head then hold a bigram table that walks one fixed chain
            of tokens: the model always answers ANSWER, whatever the picture.

Usage: python tiny_vlm.py OUT_DIR CONVERT_DIR   (CONVERT_DIR holds convert_hf_to_gguf.py)
       python tiny_vlm.py --cache CONVERT_DIR    made once per machine, under the same cache
                                                 as llama-server; prints the folder
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# What the crafted model answers, cut into pieces that become tokens of their own; each
# piece appears once, so "the next token" depends on the current one only.
ANSWER_PIECES = (
    '{"tags": ["tabby cat", ',
    '"red sofa", "window"], ',
    '"description": "A tabby cat sleeps on a red sofa by a window."}',
)
ANSWER = "".join(ANSWER_PIECES)

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template (images as <|vision_start|><|image_pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Look at this photo and write tags and a description for searching a photo library.",
    'Answer ONLY with the JSON object, no other text: {"tags": ["cat", "dog"], "description": "..."}',
    "a cat, a dog, a tree, the sky, one person, crowd, no people, red, green, blue, indoor",
    "outdoor, landscape, portrait, street, beach, mountain, city, night, sunset, food, car",
    "一只猫 一只狗 树 天空 红色 城市 海滩 山 夜晚 日落 食物 汽车 室内 室外 人物 风景",
    "The quick brown fox jumps over the lazy dog. 0123456789 +-*/=<>()[]{}:;,.!?'\"",
]

VOCAB_SIZE = 1024
HIDDEN = 256
SEED = 1234


def make_tokenizer(folder: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Qwen2's pre-tokenizer: its split regex, then byte-level without a prefix space.
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL) - len(ANSWER_PIECES),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.add_tokens(list(ANSWER_PIECES))
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 3136,
        "max_pixels": 1003520,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))


def make_model(folder: Path, *, crafted: bool) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL + list(ANSWER_PIECES)}
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(SEED)
    text = {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    # llama.cpp needs a vision depth of at least 3.
    vision = {
        "depth": 3,
        "embed_dim": 64,
        "hidden_size": HIDDEN,
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **{k: v for k, v in text.items() if k not in ("tie_word_embeddings",)},
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    if crafted:
        craft(model, ids, vocab)
    model.save_pretrained(folder, safe_serialization=True)
    # The converter reads `architectures` at the top level; some transformers versions
    # write it only inside text_config.
    saved = json.loads((folder / "config.json").read_text())
    saved["architectures"] = ["Qwen2VLForConditionalGeneration"]
    saved.setdefault("vocab_size", vocab)
    (folder / "config.json").write_text(json.dumps(saved, indent=1, sort_keys=True))


def craft(model, ids: dict[str, int], vocab: int) -> None:
    """Zero what mixes positions and make a bigram walk: anything -> piece 1 -> piece 2 ->
    ... -> <|im_end|>."""
    import torch

    with torch.no_grad():
        language = model.model.language_model
        for layer in language.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        language.norm.weight.fill_(1.0)
        embed = language.embed_tokens.weight
        head = model.lm_head.weight
        embed.zero_()
        head.zero_()
        chain = [ids[piece] for piece in ANSWER_PIECES] + [ids["<|im_end|>"]]
        # Every token that is not in the chain (the whole prompt) points at the first piece.
        embed[:, 0] = 1.0
        head[chain[0], 0] = 20.0
        for step, token in enumerate(chain[:-1], start=1):
            embed[token].zero_()
            embed[token, step] = 1.0
            head[chain[step], step] = 20.0
        del vocab


def convert(folder: Path, out: Path, convert_dir: Path, *, mmproj: bool) -> None:
    # The converter refuses a tokenizer whose fingerprint it does not know; ours follows
    # Qwen2's rules, so it is told so. It also tries sentencepiece first, which is not
    # installed (and would find nothing): ours is a byte-level BPE, GPT-2 style.
    program = (
        "import sys\n"
        f"sys.path.insert(0, {str(convert_dir)!r})\n"
        f"sys.path.insert(1, {str(convert_dir / 'gguf-py')!r})\n"
        "import conversion.base as base\n"
        "import conversion.qwenvl as qwenvl\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        "qwenvl.Qwen2VLModel.set_vocab = lambda self: self._set_vocab_gpt2()\n"
        "import convert_hf_to_gguf\n"
        "convert_hf_to_gguf.main()\n"
    )
    argv = [str(folder), "--outfile", str(out), "--outtype", "f32"]
    if mmproj:
        argv.append("--mmproj")
    # Its progress goes to stderr, so that --cache prints only the folder on stdout.
    subprocess.run(
        [sys.executable, "-c", program, *argv],
        check=True,
        cwd=convert_dir,
        stdout=sys.stderr,
    )


def cache_root() -> Path:
    given = os.environ.get("VLMTAG_CI_CACHE")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlmtag-ci"


def cache_key(convert_dir: Path) -> str:
    """Whatever changes the files: this script, the converter, the libraries that build."""
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update((convert_dir / "convert_hf_to_gguf.py").read_bytes())
    for module in (transformers, tokenizers, torch):
        digest.update(module.__version__.encode())
    return digest.hexdigest()[:16]


def cached(convert_dir: Path) -> Path:
    folder = cache_root() / f"tiny-vlm-{cache_key(convert_dir)}"
    if (folder / "answer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tiny-vlm.", dir=folder.parent))
    try:
        make_all(work, convert_dir)
        for kind in ("random", "crafted"):
            shutil.rmtree(work / kind / "hf")  # the GGUF files are what the tests use
        shutil.rmtree(folder, ignore_errors=True)
        work.rename(folder)  # in one step: a half-made folder never looks finished
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def main() -> None:
    if sys.argv[1] == "--cache":
        convert_dir = Path(sys.argv[2])
        with open(os.devnull, "w") as quiet:
            saved, sys.stdout = sys.stdout, quiet
            try:
                folder = cached(convert_dir)
            finally:
                sys.stdout = saved
        print(folder)
        return
    make_all(Path(sys.argv[1]), Path(sys.argv[2]))


def make_all(out: Path, convert_dir: Path) -> None:
    for kind in ("random", "crafted"):
        hf = out / kind / "hf"
        hf.mkdir(parents=True, exist_ok=True)
        make_tokenizer(hf)
        make_model(hf, crafted=kind == "crafted")
        convert(hf, out / kind / "model.gguf", convert_dir, mmproj=False)
        convert(hf, out / kind / "mmproj.gguf", convert_dir, mmproj=True)
    (out / "answer.json").write_text(ANSWER)


if __name__ == "__main__":
    main()

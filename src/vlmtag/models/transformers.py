"""In-process Hugging Face Transformers backend: a local vision-language model, batched greedy.

The model loads once in start() from a folder or a hub id already in the local cache (never
the network); each batch is one generate() call in a worker thread so the event loop goes on.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from vlmtag.errors import InferenceError, SetupError
from vlmtag.models.base import BackendOptions
from vlmtag.models.inprocess import InProcessBackend, cores, error_line, installed, pixels_of
from vlmtag.types import PreparedImage, Reply, Request

CPU_BATCH_SIZE = 4
CUDA_BATCH_SIZE = 8
EXTRA_HINT = "the transformers backend needs its extra: pip install 'vlmtag[transformers]'"
# "owner/name" as the hub spells it; anything else that is not a folder is a mistake.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The files save_pretrained writes the weights to (one file, or shards with an index).
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
# Sampling knobs a model's generation_config may carry; greedy decoding must not see them.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p")


class TransformersBackend(InProcessBackend):
    """A vision-language model run in this process with transformers."""

    name = "transformers"
    wants_pixels = True
    default_workers = 1
    input_box: tuple[int, int] | None = None

    def __init__(self, options: BackendOptions):
        self._options = options
        self._source = _model_source(options)
        self.model = _model_name(self._source) if self._source else options.model
        self._device = options.device
        self._load_lock = asyncio.Lock()
        # One generate() at a time: concurrent calls would only fight over the same cores/GPU.
        self._run_lock = threading.Lock()
        self._loaded: _Loaded | None = None

    @property
    def device(self) -> str:
        # Found on first use, so that a wrong --model-path fails before torch is imported.
        if self._device is None:
            self._device = _default_device()
        return self._device

    @property
    def batch_size(self) -> int:
        if self._options.batch_size:
            return self._options.batch_size
        return CUDA_BATCH_SIZE if self.device.startswith("cuda") else CPU_BATCH_SIZE

    async def start(self) -> None:
        """Check the model folder and the extra; the model loads with the first image, so a
        rerun with nothing to do never imports torch."""
        _resolve(self._source)  # a wrong path fails at once, before any slow import
        if not installed("torch", "transformers"):
            raise SetupError(EXTRA_HINT)

    async def load(self) -> None:
        async with self._load_lock:
            if self._loaded is None:
                where = _resolve(self._source)
                self._loaded = await asyncio.to_thread(_load, where, self.device)

    async def infer_batch(
        self, images: list[PreparedImage], request: Request
    ) -> list[Reply | Exception]:
        await self.load()
        return await asyncio.to_thread(self._run_batch, images, request)

    async def close(self) -> None:
        was_loaded, self._loaded = self._loaded is not None, None
        if was_loaded and self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _run_batch(self, images: list[PreparedImage], request: Request) -> list[Reply | Exception]:
        loaded = self._loaded
        if loaded is None:
            raise InferenceError("the transformers backend was closed; start it again")
        results: list[Reply | Exception] = [InferenceError("not run")] * len(images)
        pixels: dict[int, Any] = {}
        for i, image in enumerate(images):
            try:
                pixels[i] = pixels_of(image)
            except InferenceError as exc:
                results[i] = exc
        with self._run_lock:
            for i, result in _generate_each(loaded, pixels, request).items():
                results[i] = result
        return results


def _generate_each(
    loaded: _Loaded, pixels: dict[int, Any], request: Request
) -> dict[int, Reply | Exception]:
    """Answers by position: the whole batch at once, or one by one if the batch fails."""
    order = list(pixels)
    if len(order) > 1:
        try:
            replies = loaded.generate([pixels[i] for i in order], request)
            return dict(zip(order, replies, strict=True))
        except Exception:
            # One bad image must not fail its neighbours: retry each on its own.
            loaded.release_memory()
    answers: dict[int, Reply | Exception] = {}
    for i in order:
        try:
            answers[i] = loaded.generate([pixels[i]], request)[0]
        except Exception as exc:
            loaded.release_memory()
            answers[i] = InferenceError(f"generation failed: {error_line(exc)}")
    return answers


class _Loaded:
    """A loaded model and processor, and how to run one batch through them."""

    def __init__(self, model: Any, processor: Any, device: str, dtype: Any):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        tokenizer = processor.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Decoder-only models continue from the last position: pad on the left.
        tokenizer.padding_side = "right" if self.encoder_decoder else "left"
        self.pad_id = tokenizer.pad_token_id
        self.generation_config = _greedy(model.generation_config, self.pad_id)

    def generate(self, pixels: list[Any], request: Request) -> list[Reply]:
        import torch

        prompt = self._prompt(request)  # the same for every image: the image is a placeholder
        # A template that writes BOS itself must not get a second one from the tokenizer.
        bos = self.processor.tokenizer.bos_token
        extra = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}
        inputs = self.processor(
            text=[prompt] * len(pixels),
            images=[[image] for image in pixels],
            padding=True,
            return_tensors="pt",
            **extra,
        ).to(self.device, dtype=self.dtype)
        started = time.perf_counter()
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = request.max_tokens
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=config)
        share = (time.perf_counter() - started) / len(pixels)
        new = output if self.encoder_decoder else output[:, inputs["input_ids"].shape[1] :]
        answers = self.processor.batch_decode(new, skip_special_tokens=True)
        prompt_counts = inputs["attention_mask"].sum(dim=1).tolist()
        new_counts = (new != self.pad_id).sum(dim=1).tolist() if self.pad_id is not None else []
        replies = []
        for i, answer in enumerate(answers):
            timings = {"total_duration": share, "prompt_eval_count": float(prompt_counts[i])}
            if new_counts:
                timings["eval_count"] = float(new_counts[i])
            replies.append(Reply(text=answer.strip(), timings=timings))
        return replies

    def _prompt(self, request: Request) -> str:
        if not request.system:
            return self._render([_user_turn(request.prompt)])
        system = {"role": "system", "content": [{"type": "text", "text": request.system}]}
        try:
            return self._render([system, _user_turn(request.prompt)])
        except Exception:
            # Some templates refuse a system turn; then it goes before the user's text.
            return self._render([_user_turn(f"{request.system}\n\n{request.prompt}")])

    def _render(self, messages: list[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def release_memory(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _user_turn(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def _model_source(options: BackendOptions) -> str | None:
    """The folder or hub id to load, or None when the user named neither."""
    if options.model_path:
        return options.model_path
    if options.model and _HUB_ID.match(options.model):
        return options.model
    return None


def _model_name(source: str) -> str:
    path = Path(source).expanduser()
    return path.resolve().name if path.exists() else source


def _default_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"  # start() reports the missing extra
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(where: str, device: str) -> _Loaded:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise SetupError(EXTRA_HINT) from exc
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # the user's choice wins
        torch.set_num_threads(cores())
    processor = _load_processor(transformers, where)
    model = _load_model(transformers, where, dtype)
    if getattr(processor, "chat_template", None) is None:
        raise SetupError(
            f"{where} has no chat template (chat_template.jinja or chat_template.json); "
            "use an instruction-tuned vision-language model"
        )
    try:
        model.to(device)
    except Exception as exc:
        raise SetupError(f"cannot move {where} to {device}: {error_line(exc)}") from exc
    model.eval()
    return _Loaded(model, processor, device, dtype)


def _resolve(source: str | None) -> str:
    """A model folder, or a hub id found in the local cache; SetupError with the fix otherwise."""
    if source is None:
        raise SetupError(
            "the transformers backend needs a model: pass --model-path DIR (a folder saved with "
            "save_pretrained); vlmtag never downloads models: `hf download OWNER/NAME` does"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SetupError(
                f"{path} is not a Hugging Face model folder: it has no config.json; pass "
                "--model-path a folder with config.json, the weights, the processor and tokenizer"
            )
        if not any(next(path.glob(pattern), None) for pattern in _WEIGHTS):
            raise SetupError(
                f"{path} has no weights (model.safetensors or pytorch_model.bin); copy the "
                "whole folder that save_pretrained wrote"
            )
        return str(path)
    if path.exists():
        raise SetupError(f"{path} is a file; pass --model-path the model's folder")
    if not _HUB_ID.match(source):
        raise SetupError(f"{path} does not exist; pass --model-path an existing model folder")
    # Not a folder but shaped like a hub id: use it only if it is already downloaded.
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as exc:
        raise SetupError(EXTRA_HINT) from exc

    if not isinstance(try_to_load_from_cache(source, "config.json"), str):
        raise SetupError(
            f"{source} is neither a folder nor a model in the local Hugging Face cache, and "
            f"vlmtag never downloads: run `hf download {source}` or pass --model-path DIR"
        )
    return source


def _load_processor(transformers: Any, where: str) -> Any:
    try:
        return transformers.AutoProcessor.from_pretrained(where, local_files_only=True)
    except Exception as exc:
        raise SetupError(
            f"cannot load the processor of {where} ({error_line(exc)}); the model needs "
            "processor_config.json or preprocessor_config.json and its tokenizer files"
        ) from exc


def _load_model(transformers: Any, where: str, dtype: Any) -> Any:
    # Vision-language models register under different Auto classes across versions.
    names = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")
    classes = [getattr(transformers, n) for n in names if hasattr(transformers, n)]
    kwargs = {"local_files_only": True, _dtype_keyword(transformers.__version__): dtype}
    last: Exception | None = None
    for cls in classes:
        try:
            return cls.from_pretrained(where, **kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise SetupError(f"cannot load {where}: {error_line(exc)}") from exc
            last = exc
        except Exception as exc:
            raise SetupError(
                f"cannot load {where} ({error_line(exc)}); the folder needs config.json and "
                "the weights (model.safetensors or pytorch_model.bin)"
            ) from exc
    raise SetupError(
        f"{where} is not a model transformers can generate text from images with "
        f"({error_line(last)}); use an image-text-to-text model"
    )


def _dtype_keyword(version: str) -> str:
    """transformers 4.56 renamed from_pretrained's torch_dtype to dtype."""
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _greedy(config: Any, pad_id: int | None) -> Any:
    config = copy.deepcopy(config)
    config.do_sample = False
    config.num_beams = 1
    for field in _SAMPLING_FIELDS:
        if hasattr(config, field):
            setattr(config, field, None)
    if config.pad_token_id is None:
        config.pad_token_id = pad_id
    return config

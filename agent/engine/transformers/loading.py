"""Loading a Hugging Face model for the transformers engine: dtype, device, quantization, attention, processor.

Every combination this machine cannot run fails with `ModelLoadError` naming the alternative; nothing falls back
silently (ARCHITECTURE "Model loading").
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agent.config import Attention, DType, Quantization
from agent.engine.errors import ModelLoadError
from agent.engine.spec import EngineSpec

log = logging.getLogger(__name__)

# Vision-language model types the engine serves: their M-RoPE positions are computed per row by the scheduler
# (hf_scheduler) and their processor can be built without torchvision. Other VLMs are refused at load.
_QWEN_VL_TYPES = {"qwen3_vl", "qwen3_vl_moe"}


def _no_video_processor_class() -> type:
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class NoVideoQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without its video processor (which needs torchvision, unusable beside CPU torch here).

        `AutoProcessor.from_pretrained` silently returns only the tokenizer when torchvision is missing, so this
        class must be used both to build and to load the processor. Images only; videos are refused.
        """

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
            self.video_processor = None

        @classmethod
        def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path: Any, processor_dict=None, **kwargs):
            from transformers import AutoTokenizer
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            # The PIL image processor needs no torchvision; the checkpoint may name the torchvision ("fast") one.
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(pretrained_model_name_or_path)
            return [image_processor, AutoTokenizer.from_pretrained(pretrained_model_name_or_path)]

    return NoVideoQwen3VLProcessor


NoVideoQwen3VLProcessor = _no_video_processor_class()


@dataclass
class LoadedModel:
    """What the engine needs from a loaded checkpoint."""

    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any  # always a tokenizer (the processor's, for vision models)
    processor: Any | None  # the multimodal processor (vision models only)
    is_vision: bool
    uses_mrope: bool  # Qwen-VL style 3D rotary positions (explicit [4, B, L] position ids)
    dtype: torch.dtype
    context_length: int
    eos_token_ids: frozenset[int]
    # HF fast tokenizers are not safe to use from two threads at once ("Already borrowed"): the event loop's
    # executor tokenizes prompts while the worker thread detokenizes, so both take this lock.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)


def resolve_dtype(spec: EngineSpec) -> torch.dtype:
    """auto -> bfloat16 (CPU and CUDA: measured faster than fp32 on this CPU); float16 is CUDA only."""
    if spec.dtype == DType.float16 and spec.device != "cuda":
        raise ModelLoadError("DTYPE=float16 needs a CUDA device; use DTYPE=bfloat16 (or float32) on CPU")
    return {
        DType.auto: torch.bfloat16,
        DType.bfloat16: torch.bfloat16,
        DType.float32: torch.float32,
        DType.float16: torch.float16,
    }[spec.dtype]


def _check_attention(spec: EngineSpec) -> str:
    if spec.attention == Attention.flash_attention_2:
        if spec.device != "cuda" or not torch.cuda.is_available():
            raise ModelLoadError("ATTENTION_IMPL=flash_attention_2 needs a CUDA GPU; use ATTENTION_IMPL=sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError("ATTENTION_IMPL=flash_attention_2 needs the flash-attn package; use sdpa")
    return str(spec.attention)


def _quantization_kwargs(spec: EngineSpec, config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained kwargs for QUANTIZATION_TYPE, refusing what cannot run here."""
    existing = getattr(config, "quantization_config", None)
    method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
    existing_method = str(getattr(method, "value", method) or "").lower()
    q = spec.quantization
    if q == Quantization.none:
        return {}
    if q in (Quantization.awq, Quantization.gptq):
        if existing_method != q.value:
            raise ModelLoadError(
                f"QUANTIZATION_TYPE={q.value} needs a checkpoint quantized with {q.value.upper()}; "
                "use QUANTIZATION_TYPE=none or int4"
            )
        return {}  # the checkpoint's own quantization_config is applied by from_pretrained
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"QUANTIZATION_TYPE={q.value} needs the bitsandbytes package (pip install bitsandbytes); "
            "or use QUANTIZATION_TYPE=none"
        )
    from transformers import BitsAndBytesConfig

    if q == Quantization.int4:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
        # bitsandbytes logs "inputs will be cast ... to float16" on every 8-bit matmul: once per token is noise.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return {"quantization_config": bnb}


def _is_vision_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_vision_processor(folder: Path) -> Any:
    """The multimodal processor of a vision-language checkpoint, without torchvision where it is missing."""
    model_type = _model_type(folder)
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder)
        if hasattr(processor, "image_processor"):
            return processor
    if model_type not in _QWEN_VL_TYPES:
        raise ModelLoadError(
            f"{folder.name}: cannot build the image processor of a {model_type!r} model without torchvision; "
            "supported here: Qwen3-VL"
        )
    return NoVideoQwen3VLProcessor.from_pretrained(folder)


def _model_type(folder: Path) -> str:
    from transformers import AutoConfig

    return str(AutoConfig.from_pretrained(folder).model_type)


def set_pixel_budget(processor: Any, min_pixels: int, max_pixels: int) -> None:
    """Set the pixel budget ON the image processor (from_pretrained kwargs are silently ignored by some versions)."""
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(image_processor, name):
            setattr(image_processor, name, int(value))


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _context_length(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "max_position_embeddings", 0) or 2048)


def load_model(spec: EngineSpec) -> LoadedModel:
    """Load model + tokenizer/processor from `spec.folder` (blocking: call it off the event loop)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE=cuda but no CUDA GPU is visible; use DEVICE=cpu")
    dtype = resolve_dtype(spec)
    attention = _check_attention(spec)
    try:
        config = AutoConfig.from_pretrained(spec.folder)
    except Exception as exc:
        raise ModelLoadError(f"{spec.folder}: not a loadable model config ({exc})") from exc
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "sliding_attention" in (getattr(text_config, "layer_types", None) or ()):
        # The scheduler pads and concatenates KV caches across requests; sliding-window layers cannot be merged.
        raise ModelLoadError(
            f"{spec.name}: sliding-window attention layers are not supported by the transformers engine; "
            "use LOADING_STRATEGY=vllm"
        )
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    kwargs.update(_quantization_kwargs(spec, config, dtype))
    if kwargs.get("quantization_config") is not None or spec.device == "cuda":
        kwargs["device_map"] = spec.device
    is_vision = _is_vision_config(config)
    if is_vision and str(config.model_type) not in _QWEN_VL_TYPES:
        raise ModelLoadError(
            f"{spec.name}: the transformers engine serves Qwen3-VL vision models, not {config.model_type!r}; "
            "use a Qwen3-VL checkpoint or LOADING_STRATEGY=vllm on a GPU"
        )
    try:
        if is_vision:
            processor = load_vision_processor(spec.folder)
            set_pixel_budget(processor, spec.image_min_pixels, spec.image_max_pixels)
            tokenizer = processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(spec.folder, **kwargs)
        else:
            processor = None
            tokenizer = AutoTokenizer.from_pretrained(spec.folder)
            model = AutoModelForCausalLM.from_pretrained(spec.folder, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupt weights, unsupported architecture, bitsandbytes failing on this machine
        raise ModelLoadError(f"{spec.name}: cannot load ({type(exc).__name__}: {exc})") from exc
    if "device_map" not in kwargs:
        model.to(spec.device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        is_vision=is_vision,
        uses_mrope=is_vision,
        dtype=dtype,
        context_length=_context_length(config),
        eos_token_ids=_eos_ids(model, tokenizer),
    )

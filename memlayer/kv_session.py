"""`KVSession`: a HF causal LM that reads a stream far longer than its window and answers from it.

The stream's KV cache is paged (see `memlayer.kvretrieval`): each step attends to sink
tokens, the top-k pages chosen by a selector, and a local window, so the attention span
and the model's positions stay bounded whatever the stream's length.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from memlayer.errors import (
    ClosedError,
    InvalidInputError,
    ModelMismatchError,
    NotFoundError,
)
from memlayer.optional import require

if TYPE_CHECKING:
    from memlayer.kv_context import KVContext
    from memlayer.kvretrieval.selectors import PageSelector

_PLACEHOLDER = "\x00memlayer\x00"


class KVSession:
    """Stream text into a model's paged KV memory; ask questions that reuse it.

    >>> session = KVSession()                      # SmolLM2-135M-Instruct, offline
    >>> session.feed(open("book.txt").read())      # any length, chunked, with a progress bar
    >>> session.ask("Who wrote the letter?")

    On a fixed context (`KVSession(context=ctx)`, see `KVContext`) the session starts where
    the context ended, without running the model over it: the context's pages and sinks are
    shared read-only, its trailing window is copied, and its selector, chat framing and KV
    config are the session's. `close()` (or leaving a `with` block) frees what the session
    added and nothing of the context.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        context: KVContext | None = None,
        selector: str | PageSelector | None = None,
        chat: bool | None = None,
        progress: bool = True,
        **config: Any,
    ):
        require("transformers", "kv")
        import torch

        from memlayer.kv_context import KVContext
        from memlayer.kvretrieval.cache import PagedKVCache
        from memlayer.kvretrieval.config import KVConfig
        from memlayer.kvretrieval.layer_memory import HeadGeometry
        from memlayer.kvretrieval.model import AttentionRoute, fingerprint, load_smollm2
        from memlayer.kvretrieval.rope import Rotary, find_rotary
        from memlayer.kvretrieval.selectors import PageSelector, resolve_selector

        if selector is not None and not isinstance(selector, (str, PageSelector)):
            raise InvalidInputError("selector", "must be a name or a PageSelector", selector)
        if "repr_topk" in config:  # a KVConfig field until 0.2.0
            raise InvalidInputError(
                "repr_topk", "is InfLLM's option: selector=InfLLMSelector(repr_topk=...)"
            )
        if context is not None and not isinstance(context, KVContext):
            raise InvalidInputError("context", "must be a KVContext", context)
        if context is not None:
            model, tokenizer, selector, chat, config = context.session_settings(
                model, tokenizer, selector, chat, config
            )
        self.context = context
        self.chat = True if chat is None else chat
        self.selector = resolve_selector("infllm" if selector is None else selector)
        self.config = KVConfig.build(selector=self.selector.name, **config)
        if model is None:
            model, tokenizer = load_smollm2()
        self._route = AttentionRoute(model)
        self.model = model
        self.tokenizer = tokenizer
        self.progress = progress
        param = next(model.parameters())
        geometry = HeadGeometry.of(model.config)
        self._rotary = Rotary(find_rotary(model), geometry.head_dim, param.device, param.dtype)
        self.cache = PagedKVCache(
            geometry,
            self.config,
            self.selector,
            self._rotary,
            dtype=param.dtype,
            device=param.device,
            context=context.attach(self) if context is not None else None,
            # a context checked the model already (`session_settings`): its fingerprint
            fingerprint=context.fingerprint if context is not None else fingerprint(model),
        )
        self._layers = geometry.layers
        self._device = param.device
        self._torch = torch
        self._prefix, self._suffix = (
            self._chat_frame() if self.chat and tokenizer is not None else ("", "")
        )
        self._opened = context.opened if context is not None else False
        self._last_logits: Any = context.last_logits if context is not None else None
        self.tokens_fed = context.tokens if context is not None else 0
        self._timing = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}
        self._closed = False

    def _chat_frame(self) -> tuple[str, str]:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            return "", ""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True, tokenize=False
        )
        prefix, _, suffix = text.partition(_PLACEHOLDER)
        return prefix, suffix

    # -- feeding --------------------------------------------------------------------------

    def feed(self, text: str | Sequence[int]) -> int:
        """Append text (or token ids) to the session's memory; returns the tokens added."""
        self._check_open()
        ids = self._ids(text, "text")
        if not self._opened and self._prefix:
            ids = self._encode(self._prefix) + ids
        self._opened = True
        self._last_logits = self._forward(ids, progress=self.progress)
        return len(ids)

    def _ids(self, text: str | Sequence[int], field: str) -> list[int]:
        if isinstance(text, str):
            if not text.strip():
                raise InvalidInputError(field, "must not be empty")
            if self.tokenizer is None:
                raise InvalidInputError(field, "needs a tokenizer; pass token ids instead")
            return self._encode(text)
        ids = list(text)
        if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise InvalidInputError(field, "must be a non-empty string or list of token ids")
        return ids

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _forward(
        self,
        ids: Sequence[int],
        *,
        phase: Literal["prefill", "decode"] = "prefill",
        progress: bool = False,
        all_logits: bool = False,
    ) -> Any:
        """Run ids through the model chunk by chunk; logits of the last token (or of all).

        The time and tokens count towards `phase` in `stats()`: "prefill" for fed text and
        prompts, "decode" for the one-token forwards of generated tokens.
        """
        from tqdm.auto import tqdm

        from memlayer.kvretrieval.model import routed_forward

        torch = self._torch
        size = self.config.chunk_size
        outputs = []
        started = time.perf_counter()
        with (
            torch.no_grad(),
            tqdm(
                total=len(ids), unit="tok", desc="feed", disable=not progress or len(ids) <= size
            ) as bar,
        ):
            for start in range(0, len(ids), size):
                chunk = torch.tensor([ids[start : start + size]], device=self._device)
                logits = routed_forward(
                    self.model,
                    self._route,
                    self.cache,
                    layers=self._layers,
                    input_ids=chunk,
                    logits_to_keep=0 if all_logits else 1,
                )
                outputs.append(logits[0])
                bar.update(chunk.shape[1])
        self.tokens_fed += len(ids)
        self._timing[f"{phase}_s"] += time.perf_counter() - started
        self._timing[f"{phase}_tokens"] += len(ids)
        return torch.cat(outputs) if all_logits else outputs[-1][-1]

    # -- answering ------------------------------------------------------------------------

    def ask(self, question: str, *, max_new_tokens: int = 32) -> str:
        """Answer `question` from the fed memory; the memory is left exactly as it was."""
        if self.tokens_fed == 0:
            raise InvalidInputError("question", "feed the session before asking")
        return self._answer(self._question_ids(question), max_new_tokens)

    def _question_ids(self, question: str) -> list[int]:
        """The ids `ask` runs for `question`: a newline, the question, the chat suffix."""
        ids = self._ids(question, "question")
        return self._encode("\n") + ids + (self._encode(self._suffix) if self._suffix else [])

    def generate(
        self, prompt: str | Sequence[int] | None = None, *, max_new_tokens: int = 32
    ) -> str:
        """Continue the stream (after an optional prompt); the memory is left as it was."""
        if self.tokens_fed == 0 and prompt is None:
            raise InvalidInputError("prompt", "feed the session or give a prompt first")
        ids = self._ids(prompt, "prompt") if prompt is not None else []
        return self._answer(ids, max_new_tokens)

    def _answer(self, ids: list[int], max_new_tokens: int) -> str:
        if self.tokenizer is None:
            raise InvalidInputError("tokenizer", "is needed for text answers; use continue_ids")
        tokens = self.continue_ids(ids, max_new_tokens)
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()

    def _greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        logits = self._forward(ids) if ids else self._last_logits
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer else None
        out: list[int] = []
        for _ in range(max_new_tokens):
            if logits is None:
                raise InvalidInputError("prompt", "nothing to continue from")
            token = int(logits.argmax())
            if token == eos:
                break
            out.append(token)
            logits = self._forward([token], phase="decode")
        return out

    def continue_ids(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy token ids continuing the memory after `ids`; the memory is left as it was."""
        self._check_open()
        if isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InvalidInputError("max_new_tokens", "must be at least 1", max_new_tokens)
        state = self.cache.checkpoint()
        fed = self.tokens_fed
        try:
            with self._question_pages(list(ids)):
                return self._greedy(list(ids), max_new_tokens)
        finally:
            self.cache.restore(state)
            self.tokens_fed = fed

    def _question_pages(self, ids: list[int]) -> AbstractContextManager[None]:
        """For a selector that chooses pages once per question (RetroLM): a retrieval pass
        over `ids`, then those pages pinned in every layer for the block; else nothing."""
        from memlayer.kvretrieval.question_pages import question_pages

        return question_pages(
            self.cache, self.selector, (lambda: self._forward(ids)) if ids else None
        )

    # -- inspection and persistence -------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Pages, bytes, selection counts, time in selection vs attention, prefill vs decode.

        `prefill_tokens` / `prefill_s`: tokens fed and prompts or questions run before
        generating, and the time their forwards took; `decode_tokens` / `decode_s`: the
        one-token forwards of generated tokens. Every forward counts in exactly one of the two.

        `selection_hit_rate`: the share of selected pages already in the front tier (GPU, or
        RAM on CPU) when a step gathered them; the rest came up from a slower tier.
        """
        return {
            "tokens": self.tokens_fed,
            **self.cache.stats(),
            "attention_span": self.config.span,
            **self._timing,
        }

    def close(self) -> None:
        """Free the session's memory: its own pages leave the store (a fixed context's stay
        as they are, for the other sessions on it). Later calls raise ClosedError."""
        if self._closed:
            return
        self._closed = True
        self.cache.close()
        if self.context is not None:
            self.context.detach(self)

    def __enter__(self) -> KVSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("KV session")

    def save(self, target: str | Path, *, name: str | None = None) -> None:
        """Persist the session's memory (every layer's pages, sinks and window).

        `target` is a folder, or a database URL (SQLite or PostgreSQL, SQLAlchemy form) with a
        `name` for the session: any host that reaches the database can then `load` it. A save
        to a database replaces an earlier save of the name whole, or not at all.
        """
        from memlayer.kvretrieval.model import fingerprint

        self._check_open()
        meta = {
            "fingerprint": fingerprint(self.model),
            "config": self.config.model_dump(mode="json"),
            "selector_options": self.selector.options(),
            "tokens_fed": self.tokens_fed,
            "opened": self._opened,
        }
        if _is_url(target):
            self._save_to_database(str(target), _named(name), meta)
        else:
            self._save_to_folder(Path(target), meta)

    def _save_to_folder(self, folder: Path, meta: dict[str, Any]) -> None:
        from memlayer.stores import DiskTier

        if folder.exists() and not folder.is_dir():
            raise InvalidInputError("path", "must be a folder, not a file", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        saved_pages = DiskTier(folder / "pages", sync=False)
        try:
            layers = [memory.save(saved_pages) for memory in self.cache.memories]
            saved_pages.flush()
        finally:
            saved_pages.close()
        self._torch.save(layers, folder / "layers.pt")
        (folder / "session.json").write_text(json.dumps(meta))

    def _save_to_database(self, url: str, name: str, meta: dict[str, Any]) -> None:
        from memlayer.stores.saved_sessions import SavedSessions

        with SavedSessions(url) as saved:
            generation, pages = saved.new_generation(name)
            layers = [memory.save(pages) for memory in self.cache.memories]
            state = io.BytesIO()
            self._torch.save(layers, state)
            saved.commit(name, generation, meta=meta, state=state.getvalue())

    @classmethod
    def load(
        cls,
        target: str | Path,
        model: Any = None,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        **kwargs: Any,
    ) -> KVSession:
        """Reopen a session saved to a folder, or to a database URL under `name`, on the same
        model (ModelMismatchError otherwise).

        A selector registered by name is rebuilt with its saved options; an unregistered
        one is passed again as `selector=`.
        """
        from memlayer.stores import DiskTier
        from memlayer.stores.saved_sessions import SavedSessions

        torch = require("torch", "kv")
        if _is_url(target):
            with SavedSessions(str(target)) as saved:
                stored = saved.open(_named(name))
                layers = torch.load(io.BytesIO(stored.state), weights_only=True)
                return cls._rebuilt(stored.meta, layers, stored.pages, model, tokenizer, kwargs)
        folder = Path(target)
        if not (folder / "session.json").is_file():
            raise NotFoundError("saved KV session", str(folder))
        meta = json.loads((folder / "session.json").read_text())
        layers = torch.load(folder / "layers.pt", weights_only=True)
        saved_pages = DiskTier(folder / "pages")
        try:
            return cls._rebuilt(meta, layers, saved_pages, model, tokenizer, kwargs)
        finally:
            saved_pages.close()

    @classmethod
    def _rebuilt(
        cls,
        meta: dict[str, Any],
        layers: list[dict[str, Any]],
        pages: Any,
        model: Any,
        tokenizer: Any,
        kwargs: dict[str, Any],
    ) -> KVSession:
        """A session on `model` holding what a save stored (its metadata, layers, pages)."""
        from memlayer.kvretrieval.model import fingerprint, load_smollm2
        from memlayer.kvretrieval.selectors import resolve_selector

        if model is None:
            model, tokenizer = load_smollm2()
        if fingerprint(model) != meta["fingerprint"]:
            raise ModelMismatchError("the saved session was saved from a different model")
        config = dict(meta["config"])
        selector_name = config.pop("selector")
        options = meta.get("selector_options")
        if "repr_topk" in config:  # saved by 0.2.0, when the config held InfLLM's option
            repr_topk = config.pop("repr_topk")
            options = {"repr_topk": repr_topk} if selector_name == "infllm" else {}
        selector = kwargs.pop("selector", None) or resolve_selector(selector_name, options)
        session = cls(model, tokenizer, selector=selector, **{**config, **kwargs})
        for memory, saved in zip(session.cache.memories, layers, strict=True):
            memory.load(saved, pages)
        session.tokens_fed = meta["tokens_fed"]
        session._opened = meta["opened"]
        return session


def _is_url(target: str | Path) -> bool:
    """A database URL ('postgresql+psycopg://...', 'sqlite:///...') rather than a folder."""
    return isinstance(target, str) and "://" in target


def _named(name: str | None) -> str:
    if name is None:
        raise InvalidInputError("name", "must be given when the target is a database URL", name)
    return name

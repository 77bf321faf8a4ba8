"""`KVContext`: one long fixed context (a manual, a code base) encoded once, shared by sessions.

`KVContext.encode` runs the context through the model once with the paged KV memory of
`KVSession` and persists what it built: every layer's pages (in a disk tier under the folder,
or in a database), summaries, sinks, trailing window and selector state. `KVContext.open`
reopens it in any process without running the model: it loads the small tensors, and the
pages come up on demand from the folder or database through a front tier (RAM, or GPU on
CUDA) with an optional budget. Any number of `KVSession(context=ctx)` then append their own
conversations to it: they share the context's pages, sinks and front tier read-only, each
with a copy of the small trailing window, and their own pages never enter the context.
"""

from __future__ import annotations

import io
import json
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memlayer.errors import (
    ClosedError,
    InvalidInputError,
    ModelMismatchError,
    NotFoundError,
)
from memlayer.optional import require

if TYPE_CHECKING:
    from memlayer.kv_session import KVSession
    from memlayer.kvretrieval.config import KVConfig
    from memlayer.kvretrieval.fixed_context import FixedContext
    from memlayer.kvretrieval.selectors import PageSelector

FORMAT = "memlayer-kv-context/1"
# tokens each calibration question generates: its decode steps' queries count too, as a
# short answer's would
CALIBRATION_NEW_TOKENS = 8
# where pages live: chosen by each process that opens the context, never saved with it
PLACEMENT = ("gpu_budget", "ram_budget", "offload_path", "prefetch")


class KVContext:
    """A fixed context's paged KV memory, opened in this process; sessions share it.

    >>> ctx = KVContext.encode(manual, path="./manual-kv")    # once: runs the model
    >>> ctx = KVContext.open("./manual-kv")                   # any process: no model run
    >>> with KVSession(context=ctx) as session:
    ...     session.ask("How do I reset the device?")
    """

    def __init__(
        self,
        fixed: FixedContext,
        *,
        model: Any,
        tokenizer: Any,
        config: KVConfig,
        selector: PageSelector,
        meta: dict[str, Any],
        last_logits: Any,
        stored: _Stored,
        open_s: float,
    ):
        self._fixed = fixed
        self._stored = stored
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.selector = selector
        self.tokens: int = meta["tokens"]
        self.chat: bool = meta["chat"]
        self.opened: bool = meta["opened"]
        self.fingerprint: str = meta["fingerprint"]
        self.last_logits = last_logits
        self.where = stored.where  # the folder or "url#name" it was opened from
        self.open_s = open_s  # seconds `open` took
        self._sessions: weakref.WeakSet[KVSession] = weakref.WeakSet()
        self._closed = False

    # -- encoding -------------------------------------------------------------------------

    @classmethod
    def encode(
        cls,
        text: str | Sequence[int],
        model: Any = None,
        tokenizer: Any = None,
        *,
        path: str | Path,
        name: str | None = None,
        selector: str | PageSelector = "infllm",
        chat: bool = True,
        progress: bool = True,
        calibration: Sequence[str | Sequence[int]] | None = None,
        **kv_config: Any,
    ) -> KVContext:
        """Encode `text` (or token ids) once and persist it at `path`; returns it opened.

        `path` is a new (or empty) folder, or a database URL with a `name` (as
        `KVSession.save`; a context saved under a name replaces the earlier one whole).
        `selector`, `chat` and `kv_config` (block_size, n_init, n_local, topk, chunk_size,
        positions) are fixed for every session on the context; the placement options
        (gpu_budget, ram_budget, offload_path, prefetch) apply to the encoding and to the
        context returned, and each later `open` chooses its own.

        `calibration`: sample questions (text, framed as `ask` frames a question, or token
        ids, run as given) for a selector that calibrates on them (`squeezed`: its share
        thresholds, per layer and KV head, in place of `threshold` or the top-k fallback).
        Each is answered (a few tokens) once the context is fed and laid out; the thresholds
        are saved with the context, so every `open` and session uses them. Questions like
        the ones users will ask make the best sample. Bad input (not a list of questions,
        an empty one, a selector that does not calibrate) is an InvalidInputError naming
        `calibration`, raised before anything is written.
        """
        from memlayer.kv_session import KVSession, _is_url, _named

        target = _target(path, name)
        if not _is_url(path):
            _check_new_folder(Path(path))
        elif name is None:
            _named(name)
        samples = _calibration_samples(calibration)
        session = KVSession(
            model, tokenizer, selector=selector, chat=chat, progress=progress, **kv_config
        )
        try:
            questions = _calibration_ids(session, samples)  # checked before the model runs
            session.feed(text)
            session.cache.regroup()  # a clustering selector (squeezed) lays the pages out
            if questions:
                with session.cache.calibrating():  # sets the thresholds that are saved
                    for ids in questions:
                        session.continue_ids(ids, CALIBRATION_NEW_TOKENS)
            meta = _meta(session, chat)
            if isinstance(target, Path):
                _write_folder(session, target, meta)
            else:
                _write_database(session, *target, meta)
        finally:
            session.close()
        placement = {key: kv_config[key] for key in PLACEMENT if key in kv_config}
        given = selector if not isinstance(selector, str) else None
        return cls.open(
            path, session.model, session.tokenizer, name=name, selector=given, **placement
        )

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        model: Any = None,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        selector: PageSelector | None = None,
        **placement: Any,
    ) -> KVContext:
        """Reopen a context encoded at `path` (a folder, or a database URL with `name`).

        Loads the small tensors only; pages come up from the folder or database as sessions
        select them, through a front tier bounded by `gpu_budget` / `ram_budget` (pages
        pushed out go to `offload_path`, a temporary folder when not given). A context
        encoded with another model is refused (ModelMismatchError); a registered selector
        comes back with its saved options, an unregistered one is passed again as `selector`.
        """
        require("transformers", "kv")

        from memlayer.kv_session import _is_url
        from memlayer.kvretrieval.config import KVConfig
        from memlayer.kvretrieval.fixed_context import FixedContext
        from memlayer.kvretrieval.layer_memory import HeadGeometry
        from memlayer.kvretrieval.model import fingerprint, load_smollm2
        from memlayer.kvretrieval.selectors import PageSelector, resolve_selector

        started = time.perf_counter()
        for key in placement:
            if key not in PLACEMENT:
                raise InvalidInputError(key, f"is not a placement option: one of {PLACEMENT}")
        if selector is not None and not isinstance(selector, PageSelector):
            raise InvalidInputError("selector", "must be a PageSelector instance", selector)
        stored = _open_database(str(path), name) if _is_url(path) else _open_folder(Path(path))
        try:
            meta = stored.meta
            if model is None:
                model, tokenizer = load_smollm2()
            if fingerprint(model) != meta["fingerprint"]:
                raise ModelMismatchError("the KV context was encoded with a different model")
            param = next(model.parameters())
            if str(param.dtype) != meta["dtype"]:
                raise ModelMismatchError(
                    f"the KV context holds {meta['dtype']} pages; the model is {param.dtype}"
                )
            config = KVConfig.build(**{**meta["config"], **placement})
            if selector is None:
                selector = resolve_selector(config.selector, meta.get("selector_options"))
            elif selector.name != config.selector:
                raise InvalidInputError(
                    "selector", f"the context was encoded with {config.selector!r}", selector
                )
            state = stored.state()
            fixed = FixedContext.open(
                state["layers"],
                stored.open_pages,
                config=config,
                selector=selector,
                geometry=HeadGeometry.of(model.config),
                dtype=param.dtype,
                device=param.device,
            )
        except BaseException:
            stored.close()
            raise
        last = state.get("last_logits")
        return cls(
            fixed,
            model=model,
            tokenizer=tokenizer,
            config=config,
            selector=selector,
            meta=meta,
            last_logits=None if last is None else last.to(param.device),
            stored=stored,
            open_s=time.perf_counter() - started,
        )

    # -- sessions -------------------------------------------------------------------------

    def session(self, **options: Any) -> KVSession:
        """A new `KVSession` on this context (`options` as `KVSession` takes them)."""
        from memlayer.kv_session import KVSession

        return KVSession(context=self, **options)

    def session_settings(
        self,
        model: Any,
        tokenizer: Any,
        selector: str | PageSelector | None,
        chat: bool | None,
        config: dict[str, Any],
    ) -> tuple[Any, Any, PageSelector, bool, dict[str, Any]]:
        """What a session on this context runs with: the context's model (or an equal one),
        selector, chat framing and KV config. A setting that differs from the context's is
        an InvalidInputError naming it; a model of other weights a ModelMismatchError."""
        from memlayer.kvretrieval.config import KVConfig
        from memlayer.kvretrieval.model import fingerprint
        from memlayer.kvretrieval.selectors import resolve_selector

        self._check_open()
        if model is None:
            model = self.model
        elif model is not self.model:
            if fingerprint(model) != self.fingerprint:
                raise ModelMismatchError("the session's model is not the context's")
            device = next(model.parameters()).device
            if device != next(self.model.parameters()).device:
                raise InvalidInputError("model", "must be on the context's device", str(device))
        if tokenizer is None:
            tokenizer = self.tokenizer
        if selector is not None:
            given = resolve_selector(selector)
            if type(given) is not type(self.selector) or given.options() != self.selector.options():
                raise InvalidInputError(
                    "selector", f"is fixed by the context ({self.selector!r})", selector
                )
        if chat is not None and chat != self.chat:
            raise InvalidInputError("chat", f"is fixed by the context ({self.chat})", chat)
        fixed = self.config.model_dump()
        for key, value in config.items():
            wanted = KVConfig.build(**{**fixed, key: value})  # names a bad field or value
            if getattr(wanted, key) != fixed[key]:
                raise InvalidInputError(
                    key, f"is fixed by the context ({fixed[key]!r}): open it with another", value
                )
        del fixed["selector"]
        return model, tokenizer, self.selector, self.chat, fixed

    def attach(self, session: KVSession) -> FixedContext:
        """Register a session built on this context; the shared state it opens on."""
        self._check_open()
        self._sessions.add(session)
        return self._fixed

    def detach(self, session: KVSession) -> None:
        """A session on this context was closed."""
        self._sessions.discard(session)

    # -- inspection and lifetime ----------------------------------------------------------

    def preload(self) -> None:
        """Bring every page of the context up to the front tier now (else they come up as
        sessions select them); with an unbounded front tier, steps then read no value back
        to the host. CapacityError when a budget cannot hold them."""
        self._check_open()
        self._fixed.preload()

    def stats(self) -> dict[str, Any]:
        """Tokens, pages, open sessions, bytes per tier, and how much of the context was read.

        `bytes`: per tier of the shared store (the front tier holds the context's pages
        brought up and the sessions' own pages; `context` is the pages where they were
        persisted) and `resident`, the sinks, windows and summaries kept in memory.
        `touched_fraction`: the share of the context's pages some session has read.
        """
        self._check_open()
        fixed = self._fixed
        store = fixed.store.stats()
        pages = fixed.page_count
        touched = fixed.pages_touched()
        tiers = store["tiers"]
        return {
            "tokens": self.tokens,
            "pages": pages,
            "sessions": len(self._sessions),
            "tiers": tiers,
            "moved": store["moved"],
            "bytes": {
                **{n: t["bytes"] for n, t in tiers.items()},
                "resident": fixed.resident_bytes,
            },
            "pages_touched": touched,
            "touched_fraction": touched / pages if pages else 0.0,
            "open_s": self.open_s,
        }

    def close(self) -> None:
        """Close every session on the context, then its store; later calls: ClosedError."""
        if self._closed:
            return
        for session in list(self._sessions):
            session.close()
        self._closed = True
        self._fixed.close()
        self._stored.close()

    def __enter__(self) -> KVContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("KV context")


# -- persistence ----------------------------------------------------------------------------


class _Stored:
    """A persisted context being opened: its metadata now; its state and pages once the
    model was checked (`state`, `open_pages`), so a refused open reads and changes nothing."""

    def __init__(
        self,
        meta: dict[str, Any],
        where: str,
        load_state: Callable[[], Any],
        open_pages: Callable[[], Any],
        close: Callable[[], None],
    ):
        self.meta = meta
        self.where = where
        self._load_state = load_state
        self._open_pages = open_pages
        self._close = close

    def state(self) -> dict[str, Any]:
        """The layers' tensors and the last logits."""
        state = self._load_state()
        if not isinstance(state, dict) or not isinstance(state.get("layers"), list):
            raise InvalidInputError("path", f"{self.where} holds no KV context state")
        return state

    def open_pages(self, ids: Sequence[str]) -> Any:
        """Where the pages `ids` are read from; InvalidInputError when some are missing."""
        pages = self._open_pages()
        if hasattr(pages, "ids"):  # a disk tier knows its ids: check them all (no I/O)
            missing = [page_id for page_id in ids if page_id not in pages]
            if missing:
                raise InvalidInputError(
                    "path", f"{len(missing)} of the context's pages are missing", missing[0]
                )
        return pages

    def close(self) -> None:
        self._close()


def _target(path: str | Path, name: str | None) -> Path | tuple[str, str]:
    from memlayer.kv_session import _is_url, _named
    from memlayer.stores.saved_sessions import check_name

    if _is_url(path):
        return str(path), check_name(_named(name))
    if not isinstance(path, (str, Path)):
        raise InvalidInputError("path", "must be a folder or a database URL", path)
    return Path(path)


def _check_new_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError("path", "must be a folder, not a file", str(folder))
    if folder.is_dir() and any(folder.iterdir()):
        raise InvalidInputError("path", "must be a new or empty folder", str(folder))


def _calibration_samples(
    calibration: Sequence[str | Sequence[int]] | None,
) -> list[str | list[int]]:
    """`calibration` as a list of questions (text, or token ids); [] for None.
    InvalidInputError naming `calibration` for anything else."""
    if calibration is None:
        return []
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, (list, tuple)):
        raise InvalidInputError(
            "calibration", "must be a list of sample questions (text or token ids)", calibration
        )
    if not calibration:
        raise InvalidInputError("calibration", "must hold at least one question (or be None)")
    samples: list[str | list[int]] = []
    for i, item in enumerate(calibration):
        if isinstance(item, str) and item.strip():
            samples.append(item)
        elif (
            isinstance(item, (list, tuple))
            and item
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)
        ):
            samples.append(list(item))
        else:
            raise InvalidInputError(
                "calibration",
                f"question {i} must be a non-empty string or list of token ids",
                item,
            )
    return samples


def _calibration_ids(session: KVSession, samples: list[str | list[int]]) -> list[list[int]]:
    """The ids each calibration question runs, checked against the session before the model
    runs: its selector must calibrate, text needs a tokenizer, ids must be in the
    vocabulary."""
    if not samples:
        return []
    selector = session.selector
    if not selector.calibrates:
        raise InvalidInputError(
            "calibration", f"the selector {selector.name!r} does not calibrate (squeezed does)"
        )
    vocab = session.model.config.get_text_config().vocab_size
    questions = []
    for i, sample in enumerate(samples):
        if isinstance(sample, str):
            if session.tokenizer is None:
                raise InvalidInputError(
                    "calibration", f"question {i} is text: it needs a tokenizer (or pass ids)"
                )
            questions.append(session._question_ids(sample))
        elif max(sample) >= vocab:
            raise InvalidInputError(
                "calibration", f"question {i} holds ids outside the vocabulary (< {vocab})"
            )
        else:
            questions.append(sample)
    return questions


def _meta(session: KVSession, chat: bool) -> dict[str, Any]:
    from memlayer.kvretrieval.model import fingerprint

    config = session.config.model_dump(mode="json")
    for key in PLACEMENT:
        config[key] = type(session.config).model_fields[key].default
    return {
        "format": FORMAT,
        "fingerprint": fingerprint(session.model),
        "dtype": str(next(session.model.parameters()).dtype),
        "config": config,
        "selector_options": session.selector.options(),
        "tokens": session.tokens_fed,
        "opened": session._opened,
        "chat": chat,
        "pages": session.stats()["pages"],
    }


def _state(session: KVSession, pages: Any) -> dict[str, Any]:
    last = session._last_logits
    return {
        "layers": [memory.save(pages) for memory in session.cache.memories],
        "last_logits": None if last is None else last.detach().cpu(),
    }


def _write_folder(session: KVSession, folder: Path, meta: dict[str, Any]) -> None:
    """pages/ (a disk tier, fsync'ed once), state.pt, then context.json: a folder without
    context.json is an unfinished encoding and never opens."""
    import torch

    from memlayer.stores import DiskTier

    folder.mkdir(parents=True, exist_ok=True)
    pages = DiskTier(folder / "pages", sync=False)
    try:
        state = _state(session, pages)
        pages.flush()
    finally:
        pages.close()
    torch.save(state, folder / "state.pt")
    (folder / "context.json").write_text(json.dumps(meta))


def _write_database(session: KVSession, url: str, name: str, meta: dict[str, Any]) -> None:
    import torch

    from memlayer.stores.saved_sessions import SavedSessions

    with SavedSessions(url) as saved:
        generation, pages = saved.new_generation(name)
        state = io.BytesIO()
        torch.save(_state(session, pages), state)
        saved.commit(name, generation, meta=meta, state=state.getvalue())


def _check_meta(meta: object, where: str) -> dict[str, Any]:
    keys = ("fingerprint", "dtype", "config", "tokens", "opened", "chat")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidInputError("path", f"{where} is not a KV context (saved by KVContext)")
    if any(key not in meta for key in keys):
        raise InvalidInputError("path", f"{where}: the context's metadata is incomplete")
    return meta


def _open_folder(folder: Path) -> _Stored:
    import torch

    from memlayer.stores import DiskTier

    if not folder.exists():
        raise NotFoundError("KV context", str(folder))
    if not folder.is_dir():
        raise InvalidInputError("path", "must be a folder, not a file", str(folder))
    if not (folder / "context.json").is_file():
        if (folder / "session.json").is_file():
            raise InvalidInputError("path", "holds a saved KVSession (KVSession.load)", str(folder))
        raise NotFoundError("KV context", str(folder))
    try:
        meta = json.loads((folder / "context.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError("path", f"context.json is unreadable: {exc}", str(folder)) from exc
    meta = _check_meta(meta, str(folder))
    for part in ("state.pt", "pages"):
        if not (folder / part).exists():
            raise InvalidInputError("path", f"the context lacks {part}", str(folder))

    tier: list[Any] = []

    def load_state() -> Any:
        try:
            return torch.load(folder / "state.pt", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged file
            raise InvalidInputError("path", f"state.pt is unreadable: {exc}") from exc

    def open_pages() -> Any:
        tier.append(DiskTier(folder / "pages"))
        return tier[0]

    def close() -> None:
        if tier:
            tier[0].close()

    return _Stored(meta, str(folder), load_state, open_pages, close)


def _open_database(url: str, name: str | None) -> _Stored:
    import torch

    from memlayer.kv_session import _named
    from memlayer.stores.saved_sessions import SavedSessions

    saved = SavedSessions(url)
    try:
        stored = saved.open(_named(name))
        where = f"{url}#{name}"
        meta = _check_meta(stored.meta, where)
    except BaseException:
        saved.close()
        raise

    def load_state() -> Any:
        try:
            return torch.load(io.BytesIO(stored.state), weights_only=True)
        except Exception as exc:
            raise InvalidInputError("name", f"the saved state is unreadable: {exc}") from exc

    return _Stored(meta, where, load_state, lambda: stored.pages, saved.close)

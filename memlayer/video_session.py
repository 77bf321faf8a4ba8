"""`VideoSession`: a video (or any stream of timestamped frames) read into a model's paged KV
memory, and questions answered at any time from the frames they retrieve (ReKV).

Frames are encoded in chunks with sliding-window attention (the system prompt as sink
tokens, the last `n_local` tokens as the window); each frame's keys and values become one
page (`ReKVSelector`: its summary is the mean key) in the tiered page store, so the front
tier stays bounded and older frames go to RAM and disk. A question scores the frame
summaries with its own queries in every layer (or takes the frames an external retriever
names), reads those frames in time order at positions the model has seen, and answers;
the answer cites the timestamps of the frames it read.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from memlayer.errors import (
    InvalidInputError,
    ModelMismatchError,
    NotFoundError,
    UnsupportedModelError,
)
from memlayer.frame_retrievers import FrameRetriever
from memlayer.optional import require
from memlayer.video_input import Frame, clock, read_video, sample

if TYPE_CHECKING:
    from memlayer.kvretrieval.selectors import PageSelector

_PLACEHOLDER = "\x00memlayer-video\x00"
_DEFAULT_LOCAL_FRAMES = 16


@dataclass(frozen=True)
class CitedFrame:
    """A frame an answer read: its index in the stream, its time, how many layers chose it,
    the share of the question's attention it drew (summed over the layers that read it,
    averaged over heads and question tokens) and `read`, the share of the answer's
    attention it drew (the same, over the queries that produced the answer's tokens: the
    question's last token and each answer token fed back)."""

    index: int
    timestamp: float
    layers: int
    attention: float
    read: float = 0.0


@dataclass(frozen=True)
class VideoAnswer:
    """The model's answer and the frames it read.

    `frames`: the retrieved frames in time order; `citations`: their timestamps, the frame
    the answer read most first; `window`: the recent frames [first, end) read from
    the local window. The sink frames (the session's first `sink_frames`) are read by every
    answer and never cited. `str(answer)` is the text followed by its three leading citations.
    """

    text: str
    frames: tuple[CitedFrame, ...]
    window: tuple[int, int]
    first_token_s: float
    seconds: float
    tokens: tuple[int, ...] = field(repr=False)

    @property
    def citations(self) -> list[float]:
        """Timestamps of the retrieved frames, the one the answer read most first (`read`:
        the attention of the queries that produced its tokens; ties: earlier first)."""
        ranked = sorted(self.frames, key=lambda f: (-f.read, f.index))
        return [frame.timestamp for frame in ranked]

    def __str__(self) -> str:
        cited = ", ".join(clock(t) for t in self.citations[:3])
        return f"{self.text} [{cited}]" if cited else self.text


class VideoSession:
    """Stream frames into a model's paged KV memory; ask questions answered from retrieved frames.

    The model is a LLaVA-OneVision, Qwen2-VL or Qwen2.5-VL (image frames) or any causal LM
    (text frames); see `from_pretrained`.

    >>> session = VideoSession.from_pretrained("./llava-onevision-qwen2-0.5b-ov-hf")
    >>> session.feed("match.mp4")                  # decoded at 1 frame/s, chunk by chunk
    >>> print(session.ask("When was the goal scored?", retrieve=16))
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        system: str | None = None,
        chat: bool = True,
        selector: str | PageSelector = "rekv",
        retriever: FrameRetriever | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        progress: bool = True,
        **config: Any,
    ):
        require("transformers", "kv")
        import torch

        from memlayer.kvretrieval.cache import PagedKVCache
        from memlayer.kvretrieval.config import KVConfig, VideoConfig
        from memlayer.kvretrieval.frame_encoders import GridImageFrames, TextFrames, image_frames
        from memlayer.kvretrieval.layer_memory import HeadGeometry
        from memlayer.kvretrieval.model import AttentionRoute, fingerprint, load_smollm2
        from memlayer.kvretrieval.rope import Rotary, find_rotary
        from memlayer.kvretrieval.selectors import PageSelector, resolve_selector

        if not isinstance(selector, (str, PageSelector)):
            raise InvalidInputError("selector", "must be a name or a PageSelector", selector)
        if retriever is not None and not isinstance(retriever, FrameRetriever):
            raise InvalidInputError("retriever", "must have dim, embed_frames and embed_query")
        self.config = VideoConfig.build(**config)
        self.selector = resolve_selector(selector)
        if model is None:
            model, tokenizer = load_smollm2()
        self.model, self.tokenizer = model, tokenizer
        self.system, self.chat, self.progress = system, chat, progress
        self._torch = torch
        self._route = AttentionRoute(model)
        param = next(model.parameters())
        self._device = param.device
        geometry = HeadGeometry.of(model.config)
        self._layers = geometry.layers
        self._images = image_frames(
            model, mean=image_mean, std=image_std, size=self.config.frame_size
        )
        self._image_norm = (
            (self._images.mean, self._images.std)
            if self._images is not None
            else (image_mean, image_std)
        )
        tokens = self._images.tokens if self._images is not None else self.config.frame_tokens
        self.frame_tokens = tokens
        self._texts = (
            TextFrames(model, tokenizer, tokens, self._encode("\n")[0])
            if tokenizer is not None
            else None
        )
        self._prefix, self._suffix = self._prompt_frame()
        prefix_ids = self._encode(self._prefix) if self._prefix else []
        local = self.config.n_local or _DEFAULT_LOCAL_FRAMES * tokens
        self.sink_frames = self.config.sink_frames  # with the system prompt: the sinks
        self.kv_config = KVConfig.build(
            selector=self.selector.name,
            n_init=len(prefix_ids) + self.sink_frames * tokens,
            n_local=math.ceil(local / tokens) * tokens,
            block_size=tokens,
            topk=self.config.retrieve,
            chunk_size=self.config.chunk_frames * tokens,
            positions=self.config.positions,
            gpu_budget=self.config.gpu_budget,
            ram_budget=self.config.ram_budget,
            offload_path=self.config.offload_path,
            page_dtype=self.config.page_dtype,
        )
        rotary = Rotary(find_rotary(model), geometry.head_dim, param.device, param.dtype)
        self._rotary = rotary
        # multimodal RoPE: a frame's token t, placed at 1-D position start + t, is turned to
        # (start, start + row, start + column), the frame's own grid (`TokenLayout`)
        self._frame_offsets = None
        if isinstance(self._images, GridImageFrames):
            if not rotary.multimodal:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: a grid vision side needs multimodal RoPE"
                )
            self._frame_offsets = self._images.positions - torch.arange(tokens)
        self.cache = PagedKVCache(
            geometry,
            self.kv_config,
            self.selector,
            rotary,
            dtype=param.dtype,
            device=param.device,
            fingerprint=fingerprint(model),
        )
        for memory in self.cache.memories:
            memory.labels = self._labels
        self._prefix_ids = prefix_ids
        self.retriever = retriever
        self._index: Any = None
        if retriever is not None:
            from memlayer.retrievers.vector_index import VectorIndex

            self._index = VectorIndex(retriever.dim)
        self.timestamps: list[float] = []
        self._opened = False
        self._timing = {"encode_s": 0.0, "answer_s": 0.0, "questions": 0}

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: str = "auto", device: str | None = None, **options: Any
    ) -> VideoSession:
        """A session on the model in a local folder: a LLaVA-OneVision (e.g.
        llava-onevision-qwen2-0.5b-ov-hf), Qwen2-VL or Qwen2.5-VL checkpoint (e.g.
        Qwen2-VL-2B-Instruct) for image frames, or any causal LM for text frames.
        Normalisation comes from the folder's (video) preprocessor config. Never downloads."""
        require("transformers", "kv")
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoTokenizer,
        )

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise NotFoundError("model folder (config.json)", str(folder))
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        loader = (
            AutoModelForImageTextToText
            if hasattr(config, "vision_config")
            else AutoModelForCausalLM
        )
        model = loader.from_pretrained(folder, local_files_only=True, dtype=dtype).eval()
        if device is not None:
            model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (folder / name).is_file() and "image_mean" not in options:
                processor = json.loads((folder / name).read_text())
                options.setdefault("image_mean", processor.get("image_mean"))
                options.setdefault("image_std", processor.get("image_std"))
        return cls(model, tokenizer, **options)

    def _prompt_frame(self) -> tuple[str, str]:
        """Text before the frames (the system prompt: the sink tokens) and after a question."""
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer else None
        if not (self.chat and template):
            return (self.system + "\n" if self.system else ""), ""
        messages = [{"role": "user", "content": _PLACEHOLDER}]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        prefix, _, suffix = text.partition(_PLACEHOLDER)
        return prefix, suffix

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidInputError("tokenizer", "is needed for text (system prompt, questions)")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _labels(self, first: int, count: int) -> list[dict[str, Any]]:
        """Metadata of pages first .. first + count - 1 (page i is frame sink_frames + i)."""
        frames = range(self.sink_frames + first, self.sink_frames + first + count)
        return [{"frame": i, "timestamp": self.timestamps[i]} for i in frames]

    # -- streaming --------------------------------------------------------------------------

    def feed(self, source: str | Path | Iterable[tuple[float, Frame]]) -> int:
        """Encode a video file or an iterable of (seconds, frame) pairs; the frames added."""
        before = len(self.timestamps)
        for _ in self.stream(source):
            pass
        return len(self.timestamps) - before

    def stream(self, source: str | Path | Iterable[tuple[float, Frame]]) -> Iterator[int]:
        """Encode `source` chunk by chunk, yielding the frames encoded so far after each chunk
        (ask questions there while the stream goes on). A file is decoded with PyAV at `fps`
        and resized to the vision tower's size while decoding; an iterable (a live camera, an
        event log) is sampled at `fps` (None keeps every frame). Frames are RGB uint8 arrays
        [H, W, 3] or text; a text frame is written as `text_format` says ("[H:MM:SS] text"
        by default) and padded to `frame_tokens`."""
        from tqdm.auto import tqdm

        fps = self.config.fps
        if isinstance(source, (str, Path)):
            size = self._images.size if self._images is not None else None
            frames: Iterable[tuple[float, Any]] = read_video(source, fps=fps, size=size)
        else:
            frames = sample(source, fps)
        last = self.timestamps[-1] if self.timestamps else -math.inf
        with tqdm(unit="frame", desc="video", disable=not self.progress) as bar:
            batch: list[tuple[float, Any]] = []
            for time_s, frame in frames:
                if time_s <= last:
                    raise InvalidInputError("timestamp", f"must increase (after {last})", time_s)
                last = time_s
                batch.append((time_s, frame))
                if len(batch) == self.config.chunk_frames:
                    self._encode_chunk(batch)
                    bar.update(len(batch))
                    batch = []
                    yield len(self.timestamps)
            if batch:
                self._encode_chunk(batch)
                bar.update(len(batch))
                yield len(self.timestamps)

    def _embed_frames(self, frames: Sequence[Any]) -> Any:
        """Embeddings [n * frame_tokens, hidden] of one chunk's frames (all text or all images)."""
        if all(isinstance(frame, str) for frame in frames):
            if self._texts is None:
                raise InvalidInputError("frame", "text frames need the model's tokenizer")
            return self._texts.embed(frames).flatten(0, 1)
        if any(isinstance(frame, str) for frame in frames):
            raise InvalidInputError("frame", "a chunk mixes text and image frames")
        if self._images is None:
            raise InvalidInputError(
                "frame", f"{type(self.model).__name__} reads text frames only (no vision side)"
            )
        return self._images.embed([np.asarray(frame) for frame in frames]).flatten(0, 1)

    def _encode_chunk(self, batch: list[tuple[float, Any]]) -> None:
        from memlayer.kvretrieval.model import routed_forward

        torch = self._torch
        started = time.perf_counter()
        times = [time_s for time_s, _ in batch]
        text_format = self.config.text_format
        frames = [
            text_format.format(time=clock(time_s), text=frame) if isinstance(frame, str) else frame
            for time_s, frame in batch
        ]
        embeds = self._embed_frames(frames)
        prefix = self._prefix_ids if not self._opened else []
        if prefix:
            embeds = torch.cat([self._embed_ids(prefix), embeds])
        layout = None
        if self._frame_offsets is not None and not isinstance(frames[0], str):
            offsets = torch.cat(
                [torch.zeros(3, len(prefix), dtype=torch.long)]
                + [self._frame_offsets] * len(frames),
                dim=1,
            )
            layout = self._rotary.layout(offsets)
        vectors = self.retriever.embed_frames(frames) if self.retriever is not None else None
        first = len(self.timestamps)
        self.timestamps.extend(times)  # before the forward: sealed pages are labelled from it
        with (
            torch.no_grad(),
            self.cache.selecting(self.config.encode_topk),
            self.cache.laid_out(layout),
        ):
            routed_forward(
                self.model, self._route, self.cache, layers=self._layers, inputs_embeds=embeds[None]
            )
        self._opened = True
        if vectors is not None:
            self._index.add(np.arange(first, first + len(batch)), vectors)
        self._timing["encode_s"] += time.perf_counter() - started

    def _embed_ids(self, ids: Sequence[int]) -> Any:
        embedding = self.model.get_input_embeddings()
        with self._torch.no_grad():
            return embedding(self._torch.tensor(list(ids), device=embedding.weight.device))

    # -- answering --------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = 32,
        retrieve: int | None = None,
        run: int | None = None,
        by: Literal["model", "retriever"] = "model",
    ) -> VideoAnswer:
        """Answer `question` from `retrieve` frames (default `config.retrieve`) per layer, in
        runs of `run` contiguous frames, chosen by the model's own queries (`by="model"`) or
        by the external frame retriever (`by="retriever"`), plus the local window. The
        video's memory is left as it was: streaming may go on."""
        from memlayer.kvretrieval.frames import FrameContextCache

        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("question", "must be a non-empty string")
        if not self.timestamps:
            raise InvalidInputError("question", "stream frames before asking")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise InvalidInputError("max_new_tokens", "must be an integer", max_new_tokens)
        if max_new_tokens < 1:
            raise InvalidInputError("max_new_tokens", "must be at least 1", max_new_tokens)
        k = self.config.retrieve if retrieve is None else retrieve
        runs = self.config.run if run is None else run
        for name, value in (("retrieve", k), ("run", runs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(name, "must be a positive integer", value)
        if by not in ("model", "retriever"):
            raise InvalidInputError("by", "must be 'model' or 'retriever'", by)
        chosen = self._retrieved_externally(question, k) if by == "retriever" else None
        started = time.perf_counter()
        cache = FrameContextCache(self.cache.memories, retrieve=k, run=runs, chosen=chosen)
        ids = self._encode("\n" + question + self._suffix)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        tokens: list[int] = []
        first_token_s = 0.0
        with self._torch.no_grad():
            logits = self._step(cache, ids)
            for _ in range(max_new_tokens):
                token = int(logits.argmax())
                if not tokens:
                    first_token_s = time.perf_counter() - started
                if token == eos:
                    break
                tokens.append(token)
                if len(tokens) == max_new_tokens:
                    break
                logits = self._step(cache, [token])
        seconds = time.perf_counter() - started
        self._timing["answer_s"] += seconds
        self._timing["questions"] += 1
        text = str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()
        return VideoAnswer(
            text=text,
            frames=self._cited(cache.chosen(), cache.attention(), cache.answer_attention()),
            window=(self._window_start, len(self.timestamps)),
            first_token_s=first_token_s,
            seconds=seconds,
            tokens=tuple(tokens),
        )

    def _step(self, cache: Any, ids: Sequence[int]) -> Any:
        """Logits [vocab] of the last of `ids`, run over the answer's context."""
        from memlayer.kvretrieval.model import routed_forward

        logits = routed_forward(
            self.model,
            self._route,
            cache,
            layers=self._layers,
            inputs_embeds=self._embed_ids(ids)[None],
        )
        return logits[0, -1]

    def _retrieved_externally(self, question: str, k: int) -> list[int]:
        """The pages of the k frames (among those already paged out of the window) the
        external retriever ranks best for the question, in time order."""
        if self.retriever is None:
            raise InvalidInputError("by", "'retriever' needs a session built with retriever=")
        pages = self.pages
        if not pages:
            return []
        query = np.asarray(self.retriever.embed_query(question), dtype=np.float32)[None]
        first = self.sink_frames
        allowed = np.arange(first, first + pages)
        _, ids = self._index.search(query, min(k, pages), allowed=allowed)
        return sorted(int(i) - first for i in ids[0] if i >= 0)

    def _cited(
        self, chosen: list[list[int]], attention: list[list[float]], read: list[list[float]]
    ) -> tuple[CitedFrame, ...]:
        votes: Counter[int] = Counter()
        mass: dict[int, float] = {}
        answer: dict[int, float] = {}
        for pages, shares, reads in zip(chosen, attention, read, strict=True):
            for page, share, got in zip(pages, shares, reads, strict=True):
                index = self.sink_frames + page
                votes[index] += 1
                mass[index] = mass.get(index, 0.0) + share
                answer[index] = answer.get(index, 0.0) + got
        return tuple(
            CitedFrame(index, self.timestamps[index], votes[index], mass[index], answer[index])
            for index in sorted(votes)
        )

    # -- inspection and persistence ---------------------------------------------------------

    @property
    def pages(self) -> int:
        """Frames sealed into pages (every frame but the sink frames and those still in the
        local window)."""
        return self.cache.memories[0].pages.count

    @property
    def _window_start(self) -> int:
        """The first frame still in the local window."""
        memory = self.cache.memories[0]
        sunk = max(0, memory.sinks.count - len(self._prefix_ids)) // self.frame_tokens
        return sunk + self.pages

    def stats(self) -> dict[str, Any]:
        """Frames, pages, the page store's tiers (pages, bytes) and moves, the bytes held
        resident beside the store (sinks, windows, summaries), encoding and answer time."""
        store = self.cache.store.stats()
        resident = sum(
            m.window.raw_keys().nbytes * 2
            + m.window.values().nbytes
            + m.sinks.keys().nbytes
            + m.sinks.values().nbytes
            + m.pages.summaries[: m.pages.count].nbytes
            for m in self.cache.memories
        )
        frames = len(self.timestamps)
        encode_s = self._timing["encode_s"]
        return {
            "frames": frames,
            "pages": self.pages,
            "frame_tokens": self.frame_tokens,
            "tiers": store["tiers"],
            "moved": store["moved"],
            "resident_bytes": resident,
            "frames_per_s": frames / encode_s if encode_s else 0.0,
            **self._timing,
        }

    def save(self, path: str | Path, *, url: str | None = None) -> None:
        """Persist the session to a folder: its pages through a disk tier under `path/pages`
        (fsync'ed once), or through an SQL tier at `url` (one table per saved session); the
        windows, sinks, summaries, timestamps and the external retriever's index beside."""
        from memlayer.kvretrieval.model import fingerprint
        from memlayer.stores import DiskTier, SQLTier, Tier

        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise InvalidInputError("path", "must be a folder, not a file", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        table = f"memlayer_video_{uuid.uuid4().hex[:12]}" if url else None
        tier: Tier = SQLTier(url, table=table) if url and table else DiskTier(folder / "pages")
        try:
            layers = [memory.save(tier) for memory in self.cache.memories]
            if isinstance(tier, DiskTier):
                tier.flush()
        finally:
            tier.close()
        self._torch.save(layers, folder / "layers.pt")
        if self._index is not None:
            self._index.save(folder / "frames.index", len(self.timestamps))
        meta = {
            "fingerprint": fingerprint(self.model),
            "config": self.config.model_dump(mode="json"),
            "selector": self.selector.name,
            "selector_options": self.selector.options(),
            "system": self.system,
            "chat": self.chat,
            "image_norm": self._image_norm,
            "timestamps": self.timestamps,
            "opened": self._opened,
            "table": table,
        }
        staged = folder / "session.json.tmp"
        staged.write_text(json.dumps(meta))
        os.replace(staged, folder / "session.json")

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: Any = None,
        tokenizer: Any = None,
        *,
        url: str | None = None,
        retriever: FrameRetriever | None = None,
        **options: Any,
    ) -> VideoSession:
        """Reopen a saved session on the same model (ModelMismatchError otherwise), in this
        process or another; `url` again when it was saved to a database. Its frames can be
        asked about at once, and streaming may go on."""
        from memlayer.kvretrieval.model import fingerprint, load_smollm2
        from memlayer.kvretrieval.selectors import SELECTORS, resolve_selector
        from memlayer.stores import DiskTier, SQLTier, Tier

        torch = require("torch", "kv")
        folder = Path(path)
        if not (folder / "session.json").is_file():
            raise NotFoundError("saved video session", str(folder))
        meta = json.loads((folder / "session.json").read_text())
        if model is None:
            model, tokenizer = load_smollm2()
        if fingerprint(model) != meta["fingerprint"]:
            raise ModelMismatchError(f"{folder} was saved from a different model")
        selector = options.pop("selector", None)
        if selector is None:
            if meta["selector"] not in SELECTORS:
                raise InvalidInputError("selector", "unregistered: pass it again", meta["selector"])
            selector = resolve_selector(meta["selector"], meta["selector_options"])
        mean, std = meta["image_norm"]
        meta["config"].setdefault("sink_frames", 0)  # saved before sink frames existed
        session = cls(
            model,
            tokenizer,
            system=meta["system"],
            chat=meta["chat"],
            selector=selector,
            retriever=retriever,
            image_mean=mean,
            image_std=std,
            **{**meta["config"], **options},
        )
        table = meta["table"]
        if table and not url:
            raise InvalidInputError(
                "url", "the session's pages were saved to a database: pass url="
            )
        tier: Tier = SQLTier(url, table=table) if table and url else DiskTier(folder / "pages")
        try:
            for memory, saved in zip(
                session.cache.memories,
                torch.load(folder / "layers.pt", weights_only=True),
                strict=True,
            ):
                memory.load(saved, tier)
        finally:
            tier.close()
        session.timestamps = list(meta["timestamps"])
        session._opened = meta["opened"]
        if retriever is not None and (folder / "frames.index").is_file():
            from memlayer.retrievers.vector_index import VectorIndex

            session._index = VectorIndex.load(folder / "frames.index")[0]
        return session

"""Video input, frame retrieval and bounded memory of `VideoSession` on tiny random models.

Videos are real MPEG-4 files written with PyAV by the tests (moving coloured squares, one
planted white frame).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from video_models import (
    byte_tokenizer,
    tiny_clip,
    tiny_llava,
    tiny_qwen_vl,
    tiny_text_lm,
    write_video,
)

from memlayer import InvalidInputError, VideoSession
from memlayer.frame_retrievers import ClipFrameRetriever, TextFrameRetriever
from memlayer.kvretrieval.frames import select_frames
from memlayer.stores import Tier
from memlayer.types import Page
from memlayer.video_input import clock, read_video, sample


@pytest.fixture
def video(tmp_path: Path) -> Path:
    return write_video(tmp_path / "shapes.mp4", seconds=6.0, rate=10, planted=3.0)


def session(**options: object) -> VideoSession:
    """A tiny LLaVA session; no sink frames unless asked (frame i is page i)."""
    defaults: dict[str, object] = dict(
        progress=False, fps=2, chunk_frames=4, n_local=8, sink_frames=0
    )
    return VideoSession(tiny_llava(), byte_tokenizer(), **{**defaults, **options})


# -- input ------------------------------------------------------------------------------------


def test_decoding_gives_the_expected_frames_and_timestamps(video: Path) -> None:
    every = list(read_video(video, fps=None))
    assert len(every) == 60
    assert [t for t, _ in every[:3]] == pytest.approx([0.0, 0.1, 0.2])
    sampled = list(read_video(video, fps=2, size=32))
    assert [t for t, _ in sampled] == pytest.approx([i / 2 for i in range(12)])
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for _, image in sampled)
    brightest = max(every, key=lambda pair: float(pair[1].mean()))
    assert brightest[0] == pytest.approx(3.0)  # the planted frame, at its time
    assert next(iter(read_video(video, fps=1, size=(48, 24))))[1].shape == (24, 48, 3)


def test_live_iterators_are_sampled_like_files() -> None:
    live = ((i / 30, f"frame {i}") for i in range(90))  # 3 s of a 30 fps camera
    assert [t for t, _ in sample(live, 1.0)] == pytest.approx([0.0, 1.0, 2.0])
    with pytest.raises(InvalidInputError) as error:
        list(sample([(1.0, "a"), (0.5, "b")], None))
    assert error.value.field == "timestamp"
    assert clock(3725.5) == "1:02:05.5" and clock(59) == "0:00:59"


def test_a_live_source_streams_like_a_file(video: Path) -> None:
    from_file = session()
    from_file.feed(video)
    live = session()
    for encoded in live.stream(iter(list(read_video(video, fps=None, size=56)))):
        assert encoded % 4 == 0 or encoded == 12  # one yield per chunk
    assert live.timestamps == from_file.timestamps
    a = from_file.ask("what?", max_new_tokens=3, retrieve=2)
    b = live.ask("what?", max_new_tokens=3, retrieve=2)
    assert (a.tokens, a.frames) == (b.tokens, b.frames)


# -- retrieval --------------------------------------------------------------------------------


def test_select_frames_top_k_and_contiguous_runs() -> None:
    scores = torch.tensor([0.0, 5.0, 1.0, 0.0, 4.0, 4.5, 0.0, 3.0])
    assert select_frames(scores, 3) == [1, 4, 5]
    assert select_frames(scores, 20) == list(range(8))
    # runs of 2 by mean score: (4, 5) 4.25, then (1, 2) 3.0; a fifth frame is the best single
    assert select_frames(scores, 4, run=2) == [1, 2, 4, 5]
    assert select_frames(scores, 5, run=2) == [1, 2, 4, 5, 7]


class Recording:
    """Wraps each layer's selector to record the memory queries a question scores with."""

    def __init__(self, s: VideoSession):
        self.queries: list[torch.Tensor] = []
        for memory in s.cache.memories:
            inner = memory.selector.score

            def score(q: torch.Tensor, summaries: torch.Tensor, inner=inner) -> torch.Tensor:
                self.queries.append(q)
                return inner(q, summaries)

            memory.selector.score = score  # type: ignore[method-assign]


def _match_question(s: VideoSession, recording: Recording, target: int) -> None:
    """In every layer, page `target`'s keys become the recorded question's mean query, scaled
    up: the page the question's queries match best."""
    for memory, queries in zip(s.cache.memories, recording.queries, strict=True):
        kv_heads, dim = memory.window.heads, queries.shape[-1]
        direction = queries[0].float().mean(dim=1).reshape(kv_heads, -1, dim).mean(dim=1)
        keys = (50 * direction / direction.norm(dim=-1, keepdim=True)).to(queries.dtype)
        page_keys = keys[:, None].expand(-1, s.frame_tokens, -1).contiguous()
        page_id = memory.pages.page_id(target)
        old = memory.pages.store.get([page_id])[0]
        kept = page_keys.to(old.payload["k"].dtype)  # in the pages' dtype: one slab
        memory.pages.store.put(Page(page_id, {"k": kept, "v": old.payload["v"]}))
        memory.pages.summaries[target] = memory.selector.summarize(page_keys[None], queries[0])


def test_a_frame_whose_keys_match_the_question_is_retrieved(video: Path) -> None:
    s = session(retrieve=2)
    s.feed(video)
    recording = Recording(s)
    before = s.ask("Where is the red bar?", max_new_tokens=1)
    chosen = {frame.index for frame in before.frames}
    target = next(i for i in range(s.pages) if i not in chosen)
    _match_question(s, recording, target)
    after = s.ask("Where is the red bar?", max_new_tokens=1)
    assert [f.index for f in after.frames if f.layers == 2] == [target]
    assert after.citations[0] == s.timestamps[target]


def test_the_first_frames_are_sinks_read_by_every_answer_never_retrieved(video: Path) -> None:
    s = session(retrieve=100, sink_frames=2)  # retrieve: more than every paged frame
    s.feed(video)
    assert s.kv_config.n_init == 2 * s.frame_tokens  # no system prompt: the sinks are frames
    assert s.pages == 12 - 2 - 2  # the sink frames and the window's 2 frames are not pages
    memory = s.cache.memories[0]
    assert memory.pages.store.get([memory.pages.page_id(0)])[0].metadata == {
        "frame": 2,
        "timestamp": 1.0,
    }
    answer = s.ask("what?", max_new_tokens=2)
    assert [f.index for f in answer.frames] == list(range(2, 10))  # cited: never frames 0, 1
    assert sorted(answer.citations) == s.timestamps[2:10]
    assert answer.window == (10, 12)
    # the sink frames are read: changing frame 0's keys in every layer changes the answer
    for layer in s.cache.memories:
        layer.sinks.keys()[:, :4] *= -1
    changed = s.ask("what?", max_new_tokens=2)
    assert changed.tokens != answer.tokens or changed.frames != answer.frames
    # a frame whose keys match the question is retrieved and cited by its own index and time
    recording = Recording(s)
    s.ask("Where is the red bar?", max_new_tokens=1, retrieve=1)
    target = 5  # page 5: frame 7
    _match_question(s, recording, target)
    after = s.ask("Where is the red bar?", max_new_tokens=1, retrieve=1)
    assert [f.index for f in after.frames] == [7]
    assert after.citations == [s.timestamps[7]] == [3.5]


def test_asking_leaves_the_memory_as_it_was_and_the_stream_goes_on(video: Path) -> None:
    frames = list(read_video(video, fps=2, size=56))
    s = session()
    s.feed(frames[:8])
    first = s.ask("what?", max_new_tokens=4)
    assert s.ask("what?", max_new_tokens=4).tokens == first.tokens
    s.feed(frames[8:])
    whole = session()
    whole.feed(frames)
    assert s.ask("what?", max_new_tokens=4).tokens == whole.ask("what?", max_new_tokens=4).tokens


def test_external_clip_retriever_picks_frames_by_embedding(video: Path, tmp_path: Path) -> None:
    retriever = ClipFrameRetriever(tiny_clip(tmp_path / "clip"))
    s = session(retrieve=3)
    s_with = VideoSession(
        s.model,
        s.tokenizer,
        retriever=retriever,
        progress=False,
        fps=2,
        chunk_frames=4,
        n_local=8,
        sink_frames=1,
    )
    s_with.feed(video)
    answer = s_with.ask("a white screen", max_new_tokens=2, retrieve=3, by="retriever")
    images = [image for _, image in read_video(video, fps=2, size=56)][1 : 1 + s_with.pages]
    similarity = retriever.embed_frames(images) @ retriever.embed_query("a white screen")
    expected = sorted(1 + i for i in np.argsort(-similarity)[:3].tolist())  # after the sink
    assert [f.index for f in answer.frames] == expected
    assert all(f.layers == 2 for f in answer.frames)  # every layer read the retriever's frames
    with pytest.raises(InvalidInputError) as error:
        session().ask("x", by="retriever")
    assert error.value.field == "question"  # nothing streamed yet: refused before anything


def test_text_frames_with_a_text_retriever(tmp_path: Path) -> None:
    events = [(10.0 * i, f"car {i} passes") for i in range(30)]
    events[17] = (170.0, "a red van parks at gate B")
    s = VideoSession(
        tiny_text_lm(),
        byte_tokenizer(),
        retriever=TextFrameRetriever("hash"),
        progress=False,
        fps=None,
        frame_tokens=40,
        chunk_frames=8,
        n_local=80,
        sink_frames=0,
    )
    s.feed(events)
    assert s.pages == 28 and s.frame_tokens == 40
    answer = s.ask("when did the red van park?", max_new_tokens=2, retrieve=1, by="retriever")
    assert answer.citations == [170.0]
    assert str(answer).endswith("[0:02:50]")
    with pytest.raises(InvalidInputError) as error:
        s.feed([(400.0, "x" * 60)])  # over frame_tokens
    assert error.value.field == "frame"


def test_keyword_terms_find_the_frame_a_time_names() -> None:
    """Frames that differ only in their time and code: a semantic embedder that cannot tell
    them apart ranks them all alike; with keyword terms the time in the question ranks its
    frame first. Vectors stay unit length whatever the weights."""
    frames = [
        f"[0:{m:02d}:{s:02d}] The code at 0:{m:02d}:{s:02d} is K-{m}{s}."
        for m, s in [(m, s) for m in range(5) for s in range(0, 60, 7)]
    ]
    blind = TextFrameRetriever(lambda texts: np.ones((len(texts), 8)))
    hybrid = TextFrameRetriever(lambda texts: np.ones((len(texts), 8)), terms=0.5)
    question = "The code at 0:03:21 is"
    target = frames.index("[0:03:21] The code at 0:03:21 is K-321.")
    scores = blind.embed_frames(frames) @ blind.embed_query(question)
    assert np.allclose(scores, scores[0])  # no ranking at all
    vectors = hybrid.embed_frames(frames)
    assert vectors.shape == (len(frames), 8 + 4096) and hybrid.dim == 8 + 4096
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert int(np.argmax(vectors @ hybrid.embed_query(question))) == target
    alone = TextFrameRetriever(terms=1)
    assert alone.dim == 4096 and alone.name == "text:hash-4096"
    assert int(np.argmax(alone.embed_frames(frames) @ alone.embed_query(question))) == target
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(InvalidInputError) as error:
            TextFrameRetriever("hash", terms=bad)  # type: ignore[arg-type]
        assert error.value.field == "terms"


# -- bounded memory ---------------------------------------------------------------------------


def test_front_tier_stays_flat_while_the_offload_tier_grows(video: Path, tmp_path: Path) -> None:
    frames = list(read_video(video, fps=None, size=56))[:40]
    page_bytes = 2 * 2 * 4 * 16 * 2  # k and v: kv heads x frame tokens x head dim x bfloat16
    budget = 8 * page_bytes
    bounded = session(fps=None, retrieve=4, ram_budget=budget, offload_path=tmp_path / "off")
    ram, disk, resident = [], [], []
    for _ in bounded.stream(frames):
        tiers = bounded.stats()["tiers"]
        ram.append(tiers["ram"]["bytes"])
        disk.append(tiers["disk"]["bytes"])
        stats = bounded.stats()
        summaries = stats["pages"] * 2 * 2 * 16 * 4  # one mean key per page, kv head, layer
        resident.append(stats["resident_bytes"] - summaries)
    assert max(ram) <= budget and ram[-4:] == [budget] * 4  # full, and flat
    assert all(b > a for a, b in itertools.pairwise(disk))  # grows every chunk
    offloaded = bounded.stats()["tiers"]["disk"]
    assert offloaded["pages"] == bounded.pages * 2  # every page of both layers, on disk
    assert disk[-1] >= bounded.pages * 2 * page_bytes  # (records add a header each)
    assert len(set(resident[1:])) == 1  # sinks and windows: constant
    unbounded = session(fps=None, retrieve=4)
    unbounded.feed(frames)
    a = bounded.ask("what?", max_new_tokens=4)
    b = unbounded.ask("what?", max_new_tokens=4)
    assert (a.tokens, a.frames) == (b.tokens, b.frames)  # the tiers change nothing but where
    assert bounded.stats()["moved"].get("disk->ram", {}).get("pages", 0) > 0


def test_citations_rank_frames_by_what_the_answer_read(
    video: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first citation is the frame the queries that produced the answer (the question's
    last token, then the answer's tokens) attended to most, not the one the question's
    earlier tokens looked at: here every layer's question tokens but the last put 0.9 of
    their attention on the earliest chosen frame, the last token and the answer's tokens on
    the latest."""
    from memlayer.kvretrieval.frames import FrameContextLayer

    def shares(
        self: FrameContextLayer, q: torch.Tensor, lse: torch.Tensor, scale: float
    ) -> torch.Tensor:
        out = torch.zeros(q.shape[2], len(self._spans))
        out[:, 0] = 0.9
        out[-1] = 0.0
        out[-1, -1] = 0.5
        return out

    monkeypatch.setattr(FrameContextLayer, "_attention_on_frames", shares)
    s = session(retrieve=3)
    s.feed(video)
    answer = s.ask("Where is the red bar?", max_new_tokens=3)
    earliest, latest = answer.frames[0], answer.frames[-1]
    assert earliest.attention > latest.attention  # what the whole question looked at
    assert latest.read > earliest.read == 0.0  # what the answer read
    assert answer.citations[0] == max(answer.frames, key=lambda f: f.read).timestamp
    assert answer.citations[0] != earliest.timestamp


def test_an_answer_reads_at_most_all_of_its_attention_from_frames(video: Path) -> None:
    s = session(retrieve=3)
    s.feed(video)
    answer = s.ask("Where is the red bar?", max_new_tokens=3)
    layers = len(s.cache.memories)
    assert 0.0 < sum(f.read for f in answer.frames) <= layers + 1e-4
    assert all(0.0 < f.read <= f.layers + 1e-4 for f in answer.frames)


def test_pages_carry_frame_index_and_timestamp(video: Path) -> None:
    s = session()
    s.feed(video)
    memory = s.cache.memories[1]
    page = memory.pages.store.get([memory.pages.page_id(5)])[0]
    assert page.metadata == {"frame": 5, "timestamp": 2.5}
    assert isinstance(memory.pages.store.tiers[0], Tier)


def test_bad_input_is_refused_naming_the_field(video: Path) -> None:
    for options, field in (
        ({"fps": 0}, "fps"),
        ({"chunk_frames": 0}, "chunk_frames"),
        ({"retrieve": 0}, "retrieve"),
        ({"selector": 3}, "selector"),
    ):
        with pytest.raises(InvalidInputError) as error:
            session(**options)
        assert error.value.field == field
    s = session()
    with pytest.raises(InvalidInputError) as error:
        s.ask("what?")
    assert error.value.field == "question"
    s.feed(video)
    for kwargs, field in (
        ({"retrieve": 0}, "retrieve"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"by": "oracle"}, "by"),
    ):
        with pytest.raises(InvalidInputError) as error:
            s.ask("what?", **kwargs)  # type: ignore[arg-type]
        assert error.value.field == field
    with pytest.raises(InvalidInputError) as error:
        s.feed([(1.0, np.zeros((56, 56, 3), np.uint8))])  # before the last frame's time
    assert error.value.field == "timestamp"


def test_frame_size_is_checked_against_the_vision_side() -> None:
    for model, size, rule in (
        (tiny_llava(), 112, "image_size (56)"),
        (tiny_qwen_vl(), 60, "multiple of 28"),
        (tiny_text_lm(), 56, "reads text frames"),
    ):
        with pytest.raises(InvalidInputError) as error:
            VideoSession(model, byte_tokenizer(), progress=False, frame_size=size)
        assert error.value.field == "frame_size"
        assert rule in str(error.value)
    assert VideoSession(tiny_qwen_vl(), byte_tokenizer(), progress=False).frame_tokens == 196


def test_a_qwen2_vl_folder_loads_with_its_processor_normalisation(tmp_path: Path) -> None:
    """The real-checkpoint path: `from_pretrained` on a Qwen2-VL folder reads its image
    normalisation from the folder's preprocessor config and answers about a video."""
    import json

    folder = tmp_path / "qwen2-vl"
    tiny_qwen_vl().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    mean, std = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std})
    )
    session = VideoSession.from_pretrained(folder, frame_size=56, progress=False, fps=2)
    assert session._images is not None
    assert (session._images.mean, session._images.std, session.frame_tokens) == (mean, std, 4)
    video = write_video(tmp_path / "shapes.mp4", seconds=3.0, rate=10, planted=1.0)
    assert session.feed(video) == 6
    assert type(session.model).__name__ == "Qwen2VLForConditionalGeneration"
    answer = session.ask("What moved?", max_new_tokens=3, retrieve=2)
    assert answer.window[1] == 6
    assert {frame.index for frame in answer.frames} <= set(range(6))

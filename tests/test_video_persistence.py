"""A video session saved by one process is answered by another, through the disk or SQL tier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from video_models import byte_tokenizer, tiny_clip, tiny_llava, tiny_vlm, write_video

from memlayer import InvalidInputError, ModelMismatchError, VideoSession
from memlayer.frame_retrievers import ClipFrameRetriever

ANSWER = """
import json, sys
sys.path.insert(0, {tests!r})
from video_models import byte_tokenizer, tiny_vlm
from memlayer import VideoSession
from memlayer.frame_retrievers import ClipFrameRetriever

retriever = ClipFrameRetriever({clip!r}) if {clip!r} else None
session = VideoSession.load({path!r}, tiny_vlm({family!r}), byte_tokenizer(), url={url!r},
                            retriever=retriever, progress=False)
answers = []
for by in ("model", "retriever") if retriever else ("model",):
    answer = session.ask("What moved?", max_new_tokens=5, retrieve=3, by=by)
    answers.append([list(answer.tokens), [[f.index, f.timestamp, f.layers] for f in answer.frames]])
print(json.dumps({{"answers": answers, "frames": len(session.timestamps), "pages": session.pages}}))
"""


def answer_in_another_process(
    path: Path, url: str | None, clip: str | None, family: str = "llava"
) -> dict:
    code = ANSWER.format(
        tests=str(Path(__file__).parent), path=str(path), url=url, clip=clip, family=family
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tier", "family"), [("disk", "llava"), ("sql", "llava"), ("disk", "qwen2_vl")]
)
def test_saved_in_one_process_answered_in_another(tmp_path: Path, tier: str, family: str) -> None:
    video = write_video(tmp_path / "shapes.mp4", seconds=6.0, rate=10, planted=3.0)
    clip = str(tiny_clip(tmp_path / "clip")) if (tier, family) == ("disk", "llava") else None
    retriever = ClipFrameRetriever(clip) if clip else None
    session = VideoSession(
        tiny_vlm(family),
        byte_tokenizer(),
        system="Watch.",
        retriever=retriever,
        progress=False,
        fps=2,
        chunk_frames=4,
        n_local=8,
        sink_frames=2,  # the first two frames saved and reloaded with the sinks
        ram_budget=16 * 1024,  # most pages already on the offload tier when saved
        frame_size=None if family == "llava" else 56,
    )
    session.feed(video)
    url = f"sqlite:///{tmp_path / 'pages.db'}" if tier == "sql" else None
    session.save(tmp_path / "saved", url=url)
    expected = []
    for by in ("model", "retriever") if clip else ("model",):
        answer = session.ask("What moved?", max_new_tokens=5, retrieve=3, by=by)  # type: ignore[arg-type]
        expected.append(
            [list(answer.tokens), [[f.index, f.timestamp, f.layers] for f in answer.frames]]
        )
    got = answer_in_another_process(tmp_path / "saved", url, clip, family)
    assert got == {"answers": expected, "frames": 12, "pages": 8}
    if tier == "disk":
        assert not any(tmp_path.glob("*.db"))
    else:
        assert not (tmp_path / "saved" / "pages").exists()


def test_load_refuses_another_model_and_a_missing_url(tmp_path: Path) -> None:
    video = write_video(tmp_path / "shapes.mp4", seconds=2.0, rate=5)
    session = VideoSession(tiny_llava(), byte_tokenizer(), progress=False, fps=2, n_local=4)
    session.feed(video)
    session.save(tmp_path / "disk")
    session.save(tmp_path / "sql", url=f"sqlite:///{tmp_path / 'pages.db'}")
    with pytest.raises(ModelMismatchError):
        VideoSession.load(tmp_path / "disk", tiny_llava(seed=1), byte_tokenizer())
    with pytest.raises(InvalidInputError) as error:
        VideoSession.load(tmp_path / "sql", tiny_llava(), byte_tokenizer())
    assert error.value.field == "url"
    again = VideoSession.load(tmp_path / "disk", tiny_llava(), byte_tokenizer(), progress=False)
    assert again.timestamps == session.timestamps
    a = again.ask("what?", max_new_tokens=3)
    b = session.ask("what?", max_new_tokens=3)
    assert (a.tokens, a.frames) == (b.tokens, b.frames)
    again.feed([(9.0, np.full((56, 56, 3), 128, np.uint8))])  # the stream goes on after loading
    assert len(again.timestamps) == len(session.timestamps) + 1

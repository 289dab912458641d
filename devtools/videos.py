"""Synthetic videos for the tests and benchmarks: the synthetic set's shapes moving on known paths
over a fixed background, encoded with PyAV (H.264), with the ground truth of every frame; and a
COCO-format training set of still frames of the same scene (the model the video tests train).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

SCENE = (640, 360)
PERSON = (1, "ellipse", (220, 40, 40), (50, 70))  # COCO id, shape, colour, (w, h)
CAR = (3, "rectangle", (40, 80, 220), (80, 50))


@dataclass(frozen=True)
class Mover:
    """One object moving in a straight line from ``start`` to ``end`` (centres, pixels) over
    frames ``first``..``last``; drawn in list order (later ones occlude earlier ones)."""

    kind: tuple
    start: tuple[float, float]
    end: tuple[float, float]
    first: int
    last: int

    @property
    def coco_id(self) -> int:
        return self.kind[0]

    def box(self, frame: int) -> tuple[float, float, float, float] | None:
        if not self.first <= frame <= self.last:
            return None
        a = (frame - self.first) / max(1, self.last - self.first)
        cx = self.start[0] + a * (self.end[0] - self.start[0])
        cy = self.start[1] + a * (self.end[1] - self.start[1])
        w, h = self.kind[3]
        return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


# 75 frames (3 s at 25 fps). Counting line: y = 180 across the frame, from (0, 180) to (640, 180).
# The first person walks down across it (out), the car drives up across it (in); the second
# person appears at frame 10 and walks left along y = 262, below the line: it passes in front of
# the car about frame 15 (hiding most of it for a few frames) and just in front of the first
# person's lower part about frame 57 (same class and size: a quarter of it hidden), after which
# the first person leaves (frame 60).
COUNTING_LINE = (0.0, 180.0, 640.0, 180.0)
TEST_SCENE = (
    Mover(PERSON, (170, 40), (170, 330), 0, 60),
    Mover(CAR, (470, 320), (470, 40), 0, 74),
    Mover(PERSON, (506, 262), (49, 262), 10, 74),
)


def background(seed: int = 0, size: tuple[int, int] = SCENE) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(80, 180, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def draw(img: Image.Image, kind: tuple, box: tuple[float, float, float, float]) -> None:
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (round(v) for v in box)
    if kind[1] == "ellipse":
        d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=kind[2])
    else:
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=kind[2])


def render(movers: tuple[Mover, ...], frame: int, bg: Image.Image) -> Image.Image:
    img = bg.copy()
    for m in movers:
        box = m.box(frame)
        if box is not None:
            draw(img, m.kind, box)
    return img


def _video_stream(
    path: Path, codec: str, rate: int, size: tuple[int, int], fmt: str | None = None
) -> tuple[av.container.OutputContainer, av.video.stream.VideoStream]:
    """A file to write and its video stream (4:2:0; ``fmt``: the container, else from the
    file's suffix)."""
    container = av.open(str(path), "w", format=fmt)
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    return container, stream


def _encode_all(container: av.container.OutputContainer, stream, frames: Iterable) -> None:
    """Every frame encoded and muxed, the encoder flushed, the file closed."""
    for frame in frames:
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def write_clip(
    path: Path,
    movers: tuple[Mover, ...] = TEST_SCENE,
    frames: int = 75,
    fps: int = 25,
    seed: int = 0,
    size: tuple[int, int] = SCENE,
    codec: str = "libx264",
) -> list[list[tuple[int, int, tuple]]]:
    """Encodes the scene; returns per frame the visible objects (mover index, coco id, box)."""
    bg = background(seed, size)
    truth = []

    def pictures() -> Iterator[av.VideoFrame]:
        for f in range(frames):
            truth.append([(i, m.coco_id, m.box(f)) for i, m in enumerate(movers) if m.box(f)])
            yield av.VideoFrame.from_image(render(movers, f, bg))

    _encode_all(*_video_stream(path, codec, fps, size), pictures())
    return truth


def scene_hls(
    folder: Path, segments: int = 3, per_segment: int = 25, fps: int = 25
) -> tuple[list[Path], str]:
    """The test scene as HLS: MPEG-TS segments of ``per_segment`` frames (each starting with a
    key frame, timestamps running on from one to the next) and a playlist that ends (VOD)."""
    from fractions import Fraction

    folder.mkdir(parents=True, exist_ok=True)
    bg = background(0)
    paths = []
    for k in range(segments):
        path = folder / f"scene{k}.ts"

        def pictures(k: int = k) -> Iterator[av.VideoFrame]:
            for f in range(k * per_segment, (k + 1) * per_segment):
                frame = av.VideoFrame.from_image(render(TEST_SCENE, f, bg))
                frame.pts, frame.time_base = f, Fraction(1, fps)
                yield frame

        _encode_all(*_video_stream(path, "libx264", fps, SCENE, fmt="mpegts"), pictures())
        paths.append(path)
    seconds = per_segment / fps
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{math.ceil(seconds)}",
             "#EXT-X-MEDIA-SEQUENCE:0"]  # fmt: skip
    for path in paths:
        lines += [f"#EXTINF:{seconds:.3f},", path.name]
    return paths, "\n".join([*lines, "#EXT-X-ENDLIST"]) + "\n"


def scene_y4m(path: Path, frames: int = 75, fps: int = 25) -> Path:
    """The test scene as raw YUV 4:2:0 in a .y4m file: what Chromium plays as a fake camera
    (``--use-file-for-fake-video-capture``)."""
    bg = background(0)
    pictures = (av.VideoFrame.from_image(render(TEST_SCENE, f, bg)) for f in range(frames))
    _encode_all(*_video_stream(path, "rawvideo", fps, SCENE, fmt="yuv4mpegpipe"), pictures)
    return path


def scene_training_set(root: Path, count: int = 48, seed: int = 1) -> Path:
    """COCO 2017 layout: ``count`` stills of the scene's background with 1-4 people and cars at
    random places and sizes (+-15 %), overlapping at times; the validation split is the same."""
    from training.synthetic import categories

    rng = np.random.default_rng(seed)
    bg = background(0)
    folder = root / "train2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        img = bg.copy()
        for _ in range(int(rng.integers(1, 5))):
            kind = (PERSON, CAR)[int(rng.integers(0, 2))]
            s = rng.uniform(0.85, 1.15)
            w, h = kind[3][0] * s, kind[3][1] * s
            x0 = rng.uniform(0, SCENE[0] - w)
            y0 = rng.uniform(0, SCENE[1] - h)
            box = (x0, y0, x0 + w, y0 + h)
            draw(img, kind, box)
            bx0, by0 = round(x0), round(y0)
            bw, bh = round(x0 + w) - bx0, round(y0 + h) - by0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": kind[0],
                    "bbox": [bx0, by0, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        name = f"{i + 1:012d}.jpg"
        img.save(folder / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": SCENE[0], "height": SCENE[1]})
    (root / "annotations").mkdir(exist_ok=True)
    doc = {"images": images, "annotations": annotations, "categories": categories()}
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    if not (root / "val2017").exists():
        (root / "val2017").symlink_to("train2017")
    return root


def plain_clip(
    path: Path, size: tuple[int, int] = (64, 48), frames: int = 10, fps: int = 25, codec="libx264"
) -> Path:
    """A clip of moving noise of any size and length (limits, load)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1], size[0] + frames, 3), dtype=np.uint8)
    pictures = (
        av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, f : f + size[0]]), format="rgb24")
        for f in range(frames)
    )
    _encode_all(*_video_stream(path, codec, fps, size), pictures)
    return path


def still_clip(path: Path, image: Image.Image, frames: int = 4, fps: int = 10) -> Path:
    """An H.264 clip of ``image`` standing still for ``frames`` frames."""
    picture = av.VideoFrame.from_image(image.convert("RGB"))
    _encode_all(*_video_stream(path, "libx264", fps, image.size), [picture] * frames)
    return path


def audio_only(path: Path, seconds: float = 1.0) -> Path:
    """An MP4 with one AAC audio stream and no video."""
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("aac", rate=44100)
    samples = int(44100 * seconds)
    tone = (np.sin(np.arange(samples) * 0.05) * 0.3).astype(np.float32)[None, :]

    def pieces() -> Iterator[av.AudioFrame]:
        for start in range(0, samples, 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[:, start : start + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate = 44100
            frame.pts = start
            yield frame

    _encode_all(container, stream, pieces())
    return path


def no_frames(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    """A Matroska file with a video stream declared and no frame in it."""
    container, _ = _video_stream(path, "mpeg4", 25, size, "matroska")
    container.start_encoding()
    container.close()
    return path


def unknown_codec(path: Path) -> Path:
    """A Matroska file whose video track names a codec FFmpeg does not know."""
    plain_clip(path, (64, 48), 5, codec="mpeg4")
    path.write_bytes(path.read_bytes().replace(b"V_MPEG4/ISO/ASP", b"V_QQQQQ/ISO/ASP"))
    return path


def timed_clip(
    path: Path, times_s: list[float], fmt: str = "matroska", codec: str = "mpeg4"
) -> Path:
    """Frames at the given presentation times (a pause, a late start), 64x48."""
    from fractions import Fraction

    container, stream = _video_stream(path, codec, 30, (64, 48), fmt)
    stream.codec_context.time_base = Fraction(1, 1000)
    rng = np.random.default_rng(0)

    def pictures() -> Iterator[av.VideoFrame]:
        for t in times_s:
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24"
            )
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            yield frame

    _encode_all(container, stream, pictures())
    return path

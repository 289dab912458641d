"""Command-line client: post images and videos to a running service, save annotated copies.

    python -m service.client --url http://127.0.0.1:8080 photos/ street.jpg --out detections/
    python -m service.client clip.mp4 --lines 0,360,1280,360 --out out/

Images: ``out/<name>.detections.jpg`` and ``out/detections.json``. Videos (``POST /v1/videos``):
``out/<name>.ndjson`` (the service's answer, written as it arrives) and
``out/<name>.detections.mp4`` (H.264, same size and frame rate: boxes, labels and track ids, the
counting lines with their running counts). A folder may hold both.

The gateway's dependencies only (httpx, Pillow, PyAV): it runs wherever the gateway does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"}
SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES


def collect(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"no such file or folder: {p}")
    return files


def colour_of(d: dict) -> tuple[int, int, int]:
    key = d.get("track_id") or d["category_id"]
    return ((key * 97) % 255, 200, (key * 37) % 255)


def draw_detections(img: Image.Image, detections: list[dict]) -> None:
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 300))
    for d in detections:
        b = d["box"]
        colour = colour_of(d)
        draw.rectangle([b["x1"], b["y1"], b["x2"], b["y2"]], outline=colour, width=width)
        track = f" #{d['track_id']}" if d.get("track_id") is not None else ""
        draw.text(
            (b["x1"] + width, b["y1"] + width),
            f"{d['label']}{track} {d['score']:.2f}",
            fill=colour,
        )


def annotate(path: Path, detections: list[dict], out: Path) -> None:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")  # boxes are in displayed coordinates
        draw_detections(img, detections)
        img.save(out, quality=92)


def parse_lines(text: str | None) -> list[list[float]]:
    if not text:
        return []
    return [[float(v) for v in part.split(",")] for part in text.split(";") if part]


def annotate_video(path: Path, rows: list[dict], lines: list[list[float]], out: Path) -> None:
    """Every frame of ``path`` with the boxes of the latest processed frame at or before it, and
    each counting line with its counts so far, written as H.264 at the source's frame rate."""
    from service.video.decode import VideoWriter, frame_rate, pictures

    frames = [r for r in rows if "frame" in r]
    names: dict[int, str] = {}  # track id -> label
    counts = [{"in": {}, "out": {}} for _ in lines]
    writer, k, shown = None, 0, []
    try:
        for pts, picture in pictures(path):
            while k < len(frames) and frames[k]["pts_s"] <= pts + 1e-6:
                shown = frames[k]["detections"]
                for d in shown:
                    if d.get("track_id") is not None:
                        names[d["track_id"]] = d["label"]
                for c in frames[k].get("crossings", []):
                    label = names.get(c["track_id"], "?")
                    tally = counts[c["line"]][c["direction"]]
                    tally[label] = tally.get(label, 0) + 1
                k += 1
            if writer is None:
                writer = VideoWriter(out, picture.size, frame_rate(path))
            draw_detections(picture, shown)
            draw = ImageDraw.Draw(picture)
            for (x1, y1, x2, y2), tally in zip(lines, counts):
                draw.line([x1, y1, x2, y2], fill=(255, 255, 0), width=3)
                text = " ".join(
                    f"{way} {label} {n}" for way in ("in", "out") for label, n in tally[way].items()
                )
                draw.text(
                    ((x1 + x2) / 2, (y1 + y2) / 2 + 4), text or "in 0 out 0", fill=(255, 255, 0)
                )
            writer.write(picture)
    finally:
        if writer is not None:
            writer.close()


def detect_video(
    client: httpx.Client, path: Path, params: dict, lines: str | None, out: Path
) -> dict:
    """The service's answer for one video, saved as NDJSON as it arrives, then drawn in."""
    query = {**params, **({"lines": lines} if lines else {})}
    rows: list[dict] = []
    with (
        path.open("rb") as f,
        client.stream("POST", "/v1/videos", params=query, files={"video": (path.name, f)}) as r,
    ):
        if r.status_code != 200:
            r.read()
            err = (
                r.json().get("error", {})
                if r.headers.get("content-type", "").startswith("application/json")
                else {}
            )
            return {"error": err or {"status": r.status_code}}
        with (out / f"{path.stem}.ndjson").open("w") as saved:
            for line in r.iter_lines():
                if line:
                    saved.write(line + "\n")
                    rows.append(json.loads(line))
    annotate_video(path, rows, parse_lines(lines), out / f"{path.stem}.detections.mp4")
    if rows and "error" in rows[-1]:
        return {"error": rows[-1]["error"]}
    return rows[-1]["summary"] if rows else {"error": {"message": "empty answer"}}


def list_classes(url: str, headers: dict, timeout: float) -> int:
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"HTTP {r.status_code}: {r.text[:200]}", file=sys.stderr)
        return 1
    model = r.json()["models"][0]
    classes = model.get("classes", [])
    print(f"{model['name']}: {len(classes)} classes")
    for c in classes:
        print(f"{c['id']:>6}  {c['name']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m service.client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="*", type=Path, help="image files or folders")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--out", type=Path, default=Path("detections"))
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument("--max-detections", type=int, default=100)
    p.add_argument("--classes", help="comma-separated class names or category ids of the model")
    p.add_argument(
        "--tiles", help="small objects in large pictures: auto, or a grid COLSxROWS such as 4x3"
    )
    p.add_argument("--tile-size", type=int, help="--tiles auto: the tile side in pixels")
    p.add_argument("--lines", help="videos: lines to count crossings of, x1,y1,x2,y2;... (pixels)")
    p.add_argument("--fps", type=float, help="videos: frames per second to detect on")
    p.add_argument(
        "--list-classes", action="store_true", help="print the served model's classes and exit"
    )
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args(argv)

    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    if args.list_classes:
        return list_classes(args.url, headers, args.timeout)
    if not args.paths:
        p.error("give image files or folders (or --list-classes)")
    if args.tile_size and not args.tiles:
        p.error("--tile-size goes with --tiles auto")
    files = collect(args.paths)
    args.out.mkdir(parents=True, exist_ok=True)
    params = {
        "score_threshold": args.score_threshold,
        "iou_threshold": args.iou_threshold,
        "max_detections": args.max_detections,
    }
    if args.classes:
        params["classes"] = args.classes
    if args.tiles:
        params["tiles"] = args.tiles
        if args.tile_size:
            params["tile_size"] = args.tile_size
    results, failures = {}, 0
    with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as client:
        for path in files:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                video_params = {**params, **({"fps": args.fps} if args.fps else {})}
                result = detect_video(client, path, video_params, args.lines, args.out)
                results[str(path)] = result
                if "error" in result:
                    failures += 1
                    e = result["error"]
                    print(f"{path}: {e.get('code', '')} {e.get('message', e)}", file=sys.stderr)
                else:
                    print(
                        f"{path}: {result['frames_processed']} frames, tracks {result['tracks']}, "
                        f"lines {[(x['in'], x['out']) for x in result['lines']]}"
                    )
                continue
            r = client.post(
                "/v1/detect", params=params, files={"image": (path.name, path.read_bytes())}
            )
            if r.status_code != 200:
                failures += 1
                err = (
                    r.json().get("error", {})
                    if r.headers.get("content-type", "").startswith("application/json")
                    else {}
                )
                print(
                    f"{path}: HTTP {r.status_code} {err.get('code', '')} {err.get('message', '')}",
                    file=sys.stderr,
                )
                results[str(path)] = {"error": err or {"status": r.status_code}}
                continue
            image = r.json()["images"][0]
            results[str(path)] = image
            annotate(path, image["detections"], args.out / f"{path.stem}.detections.jpg")
            print(f"{path}: {len(image['detections'])} detections")
    (args.out / "detections.json").write_text(json.dumps(results, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

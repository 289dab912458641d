"""Command-line client: post images to a running service, save annotated copies and a JSON file.

    python -m service.client --url http://127.0.0.1:8080 photos/ street.jpg --out detections/

Only the standard library, httpx and Pillow: it runs wherever the gateway's dependencies do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageOps

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


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


def annotate(path: Path, detections: list[dict], out: Path) -> None:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")  # boxes are in displayed coordinates
        draw = ImageDraw.Draw(img)
        width = max(2, round(max(img.size) / 300))
        for d in detections:
            b = d["box"]
            colour = tuple(
                int(c) for c in ((d["category_id"] * 97) % 255, 200, (d["category_id"] * 37) % 255)
            )
            draw.rectangle([b["x1"], b["y1"], b["x2"], b["y2"]], outline=colour, width=width)
            draw.text(
                (b["x1"] + width, b["y1"] + width), f"{d['label']} {d['score']:.2f}", fill=colour
            )
        img.save(out, quality=92)


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
    files = collect(args.paths)
    args.out.mkdir(parents=True, exist_ok=True)
    params = {
        "score_threshold": args.score_threshold,
        "iou_threshold": args.iou_threshold,
        "max_detections": args.max_detections,
    }
    if args.classes:
        params["classes"] = args.classes
    results, failures = {}, 0
    with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as client:
        for path in files:
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

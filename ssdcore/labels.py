"""A model's classes: contiguous labels <-> a dataset's category ids and names. COCO is one of them.

The network predicts contiguous labels: 0 is background, 1..N follow the ``categories`` of the
training annotations in file order (what the reference and DALI's COCO reader do). A
:class:`ClassList` maps those labels back to the dataset's own category ids and names. It is saved
in every checkpoint, written by the export next to the model (``classes.json``, ``labels.txt``,
the ONNX metadata) and read by the service at start-up. :data:`COCO` is the list of COCO 2017
(80 classes, ids 1..90 with gaps): the classes of NVIDIA's published checkpoint.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

FORMAT = "ssd300-classes/1"
MAX_CLASSES = 65_536  # far above any detection dataset; a longer list is not a class list
MAX_CATEGORY_ID = 2**31 - 1  # COCO's ids are JSON integers; numpy holds them as int64
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

COCO_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
_COCO_MISSING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _COCO_MISSING_IDS)


def fold_name(name: str) -> str:
    """Case- and width-insensitive form of a name, for lookups (``Café`` == ``CAFÉ``)."""
    return unicodedata.normalize("NFKC", name).casefold().strip()


@dataclass(frozen=True)
class ClassList:
    """Label ``i`` (1..N) is the category ``ids[i - 1]`` named ``names[i - 1]``; 0 is background.

    Invariants (checked): 1..65,536 classes, ids unique integers in 0..2^31-1, names unique
    non-empty strings without control characters (a newline would shift every line of
    ``labels.txt``) or bidirectional overrides (U+202E would make a name display as another).
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        ids, names = tuple(self.ids), tuple(self.names)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "names", names)
        if not ids or len(ids) != len(names):
            raise ValueError("a class list needs at least one class and one name per id")
        if len(ids) > MAX_CLASSES:
            raise ValueError(f"{len(ids)} classes: at most {MAX_CLASSES}")
        for cid, name in zip(ids, names):
            if isinstance(cid, bool) or not isinstance(cid, int):
                raise ValueError(f"category id {cid!r} is not an integer")
            if not 0 <= cid <= MAX_CATEGORY_ID:
                raise ValueError(f"category id {cid} is outside 0..{MAX_CATEGORY_ID}")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"category {cid} has no name")
            if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in name):
                raise ValueError(f"category {cid}: name {name!r} contains control characters")
            if _BIDI_CONTROLS.intersection(name):
                raise ValueError(f"category {cid}: name {name!r} contains bidirectional controls")
        for what, values in (("id", ids), ("name", names)):
            seen: set = set()
            for v in values:
                if v in seen:
                    raise ValueError(f"two categories have the {what} {v!r}")
                seen.add(v)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_categories(cls, categories: Any) -> ClassList:
        """The ``categories`` of a COCO instances JSON, in file order."""
        if not isinstance(categories, list) or not categories:
            raise ValueError("'categories' must be a non-empty list")
        try:
            return cls(
                tuple(c["id"] for c in categories), tuple(str(c["name"]) for c in categories)
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"every category needs an 'id' and a 'name' ({exc!r})") from None

    @classmethod
    def from_json(cls, doc: Any) -> ClassList:
        """What :meth:`to_json` wrote: labels 1..N in order, each with its id and name."""
        if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list):
            raise ValueError("a class list is {'format': ..., 'classes': [{label, id, name}]}")
        entries = doc["classes"]
        try:
            labels = [e["label"] for e in entries]
            if labels != list(range(1, len(entries) + 1)):
                raise ValueError(f"labels must be 1..{len(entries)} in order, got {labels[:10]}")
            return cls(tuple(e["id"] for e in entries), tuple(e["name"] for e in entries))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"every class needs 'label', 'id' and 'name' ({exc!r})") from None

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "classes": [
                {"label": i + 1, "id": cid, "name": name}
                for i, (cid, name) in enumerate(zip(self.ids, self.names))
            ],
        }

    # ------------------------------------------------------------------ facts

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """Outputs of the network: the classes plus the background."""
        return len(self.ids) + 1

    def labels_txt(self) -> str:
        """One name per line, line i for label i (Triton's ``label_filename``)."""
        return "\n".join(("background", *self.names)) + "\n"

    def label_map(self) -> dict[int, int]:
        """Category id -> contiguous label."""
        return {cid: i + 1 for i, cid in enumerate(self.ids)}

    def public(self) -> list[dict]:
        """``[{"id": category id, "name": ...}]`` in label order (what the service lists)."""
        return [{"id": cid, "name": name} for cid, name in zip(self.ids, self.names)]

    def same_categories(self, other: ClassList) -> bool:
        """The same id -> name pairs, in any order."""
        return dict(zip(self.ids, self.names)) == dict(zip(other.ids, other.names))

    @cached_property
    def _ids_by_label(self) -> np.ndarray:
        return np.array((0, *self.ids), dtype=np.int64)

    def category_ids(self, labels: np.ndarray) -> np.ndarray:
        """Contiguous labels (1..N) -> category ids, vectorised."""
        return self._ids_by_label[np.asarray(labels, dtype=np.int64)]

    def name(self, label: int) -> str:
        return self.names[label - 1]

    @cached_property
    def _by_name(self) -> dict[str, int]:
        return {n: i + 1 for i, n in enumerate(self.names)}

    @cached_property
    def _by_folded_name(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for i, n in enumerate(self.names):
            key = fold_name(n)
            out[key] = None if key in out else i + 1  # None: ambiguous without the exact case
        return out

    def label_of_name(self, name: str) -> int | None:
        """The label named ``name``: exact, else case-insensitive when that is unambiguous."""
        exact = self._by_name.get(name)
        return exact if exact is not None else self._by_folded_name.get(fold_name(name))

    def resolve_filter(self, items: list[str]) -> set[int]:
        """Names or category ids (as strings) -> contiguous labels. ValueError on unknowns.

        An item made of digits is a category id when this list has that id, else a name.
        """
        by_id = self.label_map()
        out: set[int] = set()
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            numeric = item.isascii() and item.isdigit()
            if numeric and int(item) in by_id:
                out.add(by_id[int(item)])
                continue
            label = self.label_of_name(item)
            if label is None:
                kind = "category id" if numeric else "class name"
                raise ValueError(
                    f"unknown {kind} {item!r} (this model's classes: {self.summary()})"
                )
            out.add(label)
        if not out:
            raise ValueError("no class name or id given")
        return out

    def summary(self, limit: int = 12) -> str:
        shown = ", ".join(f"{n} ({i})" for i, n in zip(self.ids[:limit], self.names[:limit]))
        return shown + (f", ... ({len(self)} in all)" if len(self) > limit else "")


COCO = ClassList(COCO_IDS, COCO_NAMES)

"""A dataset's own classes, from the annotations to the JSON the service returns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from devtools.images import encode, photo
from devtools.reference_decode import reference_decode_single
from service.settings import Settings
from ssdcore.labels import ClassList
from ssdcore.postprocess import postprocess
from ssdcore.spec import REFERENCE_POSTPROCESS
from tests.service.conftest import run_service
from tests.training.conftest import job, run_train
from training.checkpoint import read_checkpoint
from training.data.coco import DataError, load_index
from training.export import main as export_main
from training.export.served import ServedSSD, candidates_above
from training.model import build_model, calibrate_random_model
from training.synthetic import generate

# non-contiguous ids, not sorted, names with spaces and accents
OWN = ClassList((40, 7, 12), ("Zebra crossing", "Café table", "señal de tráfico"))


@pytest.fixture(scope="module")
def own_coco(tmp_path_factory):
    return generate(
        tmp_path_factory.mktemp("own"),
        train=16,
        val=8,
        seed=4,
        categories=list(zip(OWN.ids, OWN.names)),
    )


def test_labels_follow_the_file_order_of_categories(own_coco):
    index = load_index(own_coco / "annotations" / "instances_train2017.json", skip_empty=True)
    assert index.classes == OWN
    doc = json.loads((own_coco / "annotations" / "instances_train2017.json").read_text())
    by_image: dict[int, list[int]] = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(OWN.label_map()[ann["category_id"]])
    for image_id, labels in by_image.items():
        assert index.labels[image_id].tolist() == labels


def test_dali_gives_the_same_labels_as_the_fallback(own_coco):
    """DALI's COCO reader maps the gapped, unsorted ids to 1..N in file order, like load_index."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    ann = own_coco / "annotations" / "instances_train2017.json"
    index = load_index(ann, skip_empty=True)

    @pipeline_def(batch_size=len(index.images), num_threads=1, device_id=None)
    def labels_only():
        _, _, labels = fn.readers.coco(
            file_root=str(own_coco / "train2017"), annotations_file=str(ann), skip_empty=True
        )
        return labels

    pipe = labels_only()
    pipe.build()
    (labels,) = pipe.run()
    got = [np.asarray(labels[i]).reshape(-1).tolist() for i in range(len(index.images))]
    assert got == [index.labels[im["id"]].tolist() for im in index.images]
    assert {v for row in got for v in row} == {1, 2, 3}


def test_undeclared_category_is_a_clear_error(tmp_path, own_coco):
    doc = json.loads((own_coco / "annotations" / "instances_train2017.json").read_text())
    doc["annotations"][0]["category_id"] = 99
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="category_id 99, which 'categories' does not declare"):
        load_index(bad, skip_empty=True)


def test_validation_must_declare_the_training_categories(tmp_path, own_coco):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(own_coco, data)
    val = data / "annotations" / "instances_val2017.json"
    doc = json.loads(val.read_text())
    doc["categories"][1]["name"] = "Cafe table"  # same id, other name
    val.write_text(json.dumps(doc))
    proc = run_train(job(data, "--save", str(tmp_path / "run")), check=False, timeout=120)
    assert proc.returncode != 0
    assert "instances_val2017.json declares other categories than instances_train2017" in (
        proc.stderr
    )
    assert not list((tmp_path / "run").glob("*.pt"))


def test_evaluation_decode_is_the_reference_loop():
    """predict's candidates (every pair above 0.05) + the postprocess == the per-class loop."""
    torch.manual_seed(2)
    model = build_model("resnet18", num_classes=OWN.num_classes)
    photos = torch.from_numpy(np.stack([photo(300, 300, seed=s) for s in range(3)]))
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    calibrate_random_model(model, (photos.permute(0, 3, 1, 2) / 255 - mean) / std)
    served = ServedSSD(model.eval())
    with torch.no_grad():
        boxes, probs = served.decode(photos)
    compared = 0
    for b, p in zip(boxes, probs):
        cand = [t.numpy() for t in candidates_above(b, p, 0.05)]
        det = postprocess(*cand, REFERENCE_POSTPROCESS)
        ref_boxes, ref_scores, ref_labels = reference_decode_single(b, p.t())
        assert det.classes.tolist() == ref_labels.tolist()
        np.testing.assert_array_equal(det.scores, ref_scores.numpy())
        np.testing.assert_array_equal(det.boxes, ref_boxes.numpy())
        compared += len(det)
    assert compared > 30


@pytest.mark.slow
def test_own_classes_from_training_to_the_service(own_coco, tmp_path):
    """torchrun training (ResNet-18, no download) -> checkpoint with the class list -> export ->
    the service over HTTP names exactly those classes and ids; class filter by name and id."""
    save = tmp_path / "run"
    run_train(job(own_coco, "--epochs", "1", "--evaluation", "0", "--save", str(save)))
    ckpt = read_checkpoint(save / "epoch_0.pt")
    assert ClassList.from_json(ckpt["classes"]) == OWN
    assert ckpt["label_map"] == {0: "background", 1: OWN.names[0], 2: OWN.names[1], 3: OWN.names[2]}
    assert ckpt["model"]["conf.0.weight"].shape[0] == 4 * 4
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["classes"] == OWN.public()
    assert any(r["event"] == "eval" for r in metrics)  # pycocotools on the dataset's own ids

    repo = tmp_path / "repo"
    assert (
        export_main(
            ["--checkpoint", str(save / "epoch_0.pt"), "--output", str(repo), "--formats", "onnx"]
        )
        == 0
    )
    assert (repo / "ssd300_onnx" / "1" / "labels.txt").read_text(encoding="utf-8").splitlines() == [
        "background",
        *OWN.names,
    ]
    image = encode(photo(480, 360, seed=1), "JPEG")
    with run_service(Settings(model_repository=repo)) as live, live.client() as c:
        model = c.get("/v1/models").json()["models"][0]
        assert model["classes"] == [
            {"id": 40, "name": "Zebra crossing"},
            {"id": 7, "name": "Café table"},
            {"id": 12, "name": "señal de tráfico"},
        ]
        assert model["metadata"]["num_classes"] == 4
        params = {"score_threshold": 0.0, "max_detections": 1000}
        dets = c.post("/v1/detect", files={"image": ("a.jpg", image)}, params=params).json()
        dets = dets["images"][0]["detections"]
        assert {d["category_id"] for d in dets} == {40, 7, 12}  # an untrained model: all of them
        names = dict(zip(OWN.ids, OWN.names))
        assert all(d["label"] == names[d["category_id"]] for d in dets)
        for value, wanted in (("café TABLE", {7}), ("40,12", {40, 12}), ("Zebra crossing", {40})):
            r = c.post(
                "/v1/detect",
                files={"image": ("a.jpg", image)},
                params={**params, "classes": value},
            )
            assert r.status_code == 200, r.text
            got = {d["category_id"] for d in r.json()["images"][0]["detections"]}
            assert got == wanted, value
        for unknown in ("person", "1", "zebra"):
            r = c.post("/v1/detect", files={"image": ("a.jpg", image)}, params={"classes": unknown})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"

    # evaluation on a validation JSON that lists the same categories in another order: the
    # checkpoint's label order is used, so the mAP is the one the training run measured
    import shutil

    reordered = tmp_path / "reordered"
    shutil.copytree(own_coco, reordered)
    for split in ("train", "val"):
        ann = reordered / "annotations" / f"instances_{split}2017.json"
        doc = json.loads(ann.read_text())
        doc["categories"].reverse()
        ann.write_text(json.dumps(doc))
    during = next(r for r in metrics if r["event"] == "eval")
    proc = run_train(
        job(reordered, "--mode", "evaluation", "--checkpoint", str(save / "epoch_0.pt"))
    )
    assert f"mAP {during['AP']:.4f}" in proc.stderr, proc.stderr[-2000:]
    # ... but resuming training on it is refused: labels are positions in that list
    proc = run_train(
        job(reordered, "--epochs", "2", "--checkpoint", str(save / "epoch_0.pt")), check=False
    )
    assert proc.returncode != 0 and "in another order than the run it resumes" in proc.stderr
    # resuming with other frozen layers than the run had: a clear message
    proc = run_train(
        job(
            own_coco, "--epochs", "2", "--checkpoint", str(save / "epoch_0.pt"), "--freeze-backbone"
        ),
        check=False,
    )
    assert proc.returncode != 0 and "pass the same ones" in proc.stderr
    # resuming this run on data with other classes is refused, with the reason
    other = generate(tmp_path / "other", train=8, val=4, seed=1, num_classes=2)
    proc = run_train(
        job(other, "--epochs", "2", "--checkpoint", str(save / "epoch_0.pt")), check=False
    )
    assert (
        proc.returncode != 0 and "it was trained on the classes Zebra crossing (40)" in proc.stderr
    )

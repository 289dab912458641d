from __future__ import annotations

import pytest

from training.config import TrainConfig, build_parser, parse_config


def test_defaults_are_the_recipe():
    cfg = parse_config(["--data", "/coco"])
    assert cfg.epochs == 65 and cfg.batch_size == 32 and cfg.learning_rate == 2.6e-3
    assert cfg.multistep == [43, 54] and cfg.evaluation == [21, 31, 37, 42, 48, 53, 59, 64]
    assert cfg.warmup == 300 and cfg.amp and cfg.data_backend == "dali"


def test_reference_flags_and_aliases():
    cfg = parse_config(
        [
            "-d",
            "/c",
            "--bs",
            "64",
            "--ebs",
            "8",
            "--lr",
            "2.7e-3",
            "-e",
            "3",
            "--no-amp",
            "--multistep",
            "1",
            "2",
            "--evaluation",
            "--warmup",
            "1200",
            "--mode",
            "benchmark-training",
            "--data-layout",
            "channels_first",
        ]
    )
    assert (cfg.batch_size, cfg.eval_batch_size, cfg.learning_rate, cfg.epochs) == (
        64,
        8,
        2.7e-3,
        3,
    )
    assert not cfg.amp and cfg.multistep == [1, 2] and cfg.evaluation == [] and cfg.warmup == 1200


def test_round_trip_and_errors():
    cfg = parse_config(["--data", "/c", "--seed", "7"])
    assert TrainConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # --data is required
    with pytest.raises(SystemExit):
        parse_config(["--data", "/c", "--mode", "nope"])

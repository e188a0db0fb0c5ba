"""moco_zoo.transfer.config: presets reproduce the papers' numbers, precedence, typed keys, errors naming the key."""
from __future__ import annotations

import pytest

from moco_zoo.transfer.config import ConfigError, effective_batch, preset_names, resolve, schema_keys


def test_paper_presets_are_the_papers_values():
    paper = resolve("voc_det", "paper")
    assert (paper.iters, paper.batch_size, paper.lr, list(paper.steps), paper.warmup_iters) == \
        (24000, 16, 0.02, [18000, 22000], 100)
    assert list(paper.min_size_train) == list(range(480, 801, 32)) and paper.min_size_test == 800
    assert paper.detector == "c4" and paper.norm == "syncbn" and not paper.mask
    assert list(paper.train_sets) == ["2007-trainval", "2012-trainval"] and list(paper.test_sets) == ["2007-test"]
    p8 = resolve("voc_det", "paper-8img")
    assert (p8.batch_size, p8.iters, p8.lr, list(p8.steps)) == (8, 48000, 0.01, [36000, 44000])
    coco = resolve("coco_det", "paper")
    assert coco.iters == 90000 and list(coco.min_size_train) == list(range(640, 801, 32)) and coco.mask
    assert coco.detector == "fpn" and list(coco.steps) == [60000, 80000]
    assert resolve("coco_det", "paper-2x").iters == 180000
    assert (resolve("coco_det", "paper-8img-2x").iters, resolve("coco_det", "paper-8img-2x").lr) == (360000, 0.01)
    seg = resolve("voc_seg", "paper")
    assert (seg.output_stride, seg.crop_size, seg.batch_size, seg.lr, seg.iters, seg.lr_schedule, seg.poly_power) == \
        (8, 512, 16, 0.01, 20000, "poly", 0.9)
    assert set(preset_names("voc_det")) == {"paper", "paper-8img", "cpu", "cpu-20min"}


def test_cpu_20min_is_the_measured_command():
    """The preset is the cpu preset plus the flags of the measured run (transfer/README.md), steps scaled as --iters
    scales them."""
    preset = resolve("voc_det", "cpu-20min")
    measured = resolve("voc_det", "cpu", flags={"iters": 2400, "lr": 0.01},
                       overrides={"box_batch_size_per_image": 64, "rpn_batch_size_per_image": 256,
                                  "fpn_channels": 128})
    preset.preset = measured.preset
    assert preset == measured
    assert resolve("voc_det", "paper").fpn_channels == 256  # the papers' FPN width stays the default


def test_cpu_os16_is_the_measured_command():
    """voc_seg ``cpu-os16``: the cpu preset plus the overrides of the measured learning curves (transfer/README.md)."""
    assert set(preset_names("voc_seg")) == {"paper", "cpu", "cpu-os16"}
    preset = resolve("voc_seg", "cpu-os16")
    measured = resolve("voc_seg", "cpu", flags={"iters": 3000},
                       overrides={"output_stride": 16, "class_weighting": "median_frequency",
                                  "train_sets": ["2007-trainval", "2012-trainval"]})
    preset.preset = measured.preset
    assert preset == measured
    assert resolve("voc_seg", "cpu").class_weighting == "none"
    with pytest.raises(ConfigError, match="class_weighting"):
        resolve("voc_seg", "cpu", overrides={"class_weighting": "inverse"})


def test_precedence_preset_file_flags_overrides(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("iters: 77\nlr: 0.05\nsteps: [50, 60]\n")
    cfg = resolve("voc_det", "cpu", str(f), flags={"lr": 0.01, "arch": None}, overrides={"steps": [10, 20]})
    assert (cfg.iters, cfg.lr, list(cfg.steps)) == (77, 0.01, [10, 20])
    f.write_text("itres: 5\n")
    with pytest.raises(ConfigError, match=r"my\.yaml: unknown config key 'itres'"):
        resolve("voc_det", "cpu", str(f))
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"my\.yaml: expected a mapping"):
        resolve("voc_det", "cpu", str(f))


def test_steps_scale_with_iters_unless_given():
    assert list(resolve("voc_det", "paper", flags={"iters": 12000}).steps) == [9000, 11000]
    assert list(resolve("voc_det", "cpu", flags={"iters": 600}).steps) == [440, 540]
    assert list(resolve("voc_det", "paper", flags={"iters": 10}, overrides={"steps": [5, 8]}).steps) == [5, 8]


@pytest.mark.parametrize("task,overrides,message", [
    ("voc_det", {"iters": "many"}, "'iters': Value 'many'"),
    ("voc_det", {"iters": True}, "'iters': Value 'True'"),
    ("voc_det", {"crop_size": 64}, "unknown config key 'crop_size' for task voc_det"),
    ("voc_seg", {"anchor_sizes": [1, 2]}, "unknown config key 'anchor_sizes' for task voc_seg"),
    ("voc_det", {"detector": "retina"}, "'detector' must be one of c4, fpn"),
    ("voc_det", {"steps": [9, 3]}, "'steps' must be increasing"),
    ("voc_seg", {"scale_range": [2.0, 1.0]}, "'scale_range' must be [min, max]"),
])
def test_bad_values_name_the_key(task, overrides, message):
    with pytest.raises(ConfigError) as e:
        resolve(task, "cpu", overrides=overrides)
    assert message in str(e.value)


def test_unknown_task_and_preset():
    with pytest.raises(ConfigError, match="unknown task"):
        resolve("imagenet", "paper")
    with pytest.raises(ConfigError, match="unknown preset 'huge' for voc_seg"):
        resolve("voc_seg", "huge")


def test_linear_scaling_rule_and_batch_split():
    assert effective_batch(resolve("voc_det", "paper", flags={"batch_size": 8}), 2) == (8, 4, 0.01)
    assert effective_batch(resolve("voc_det", "paper", overrides={"batch_per_rank": 3}), 2) == (6, 3, 0.02 * 6 / 16)
    with pytest.raises(ConfigError, match="not divisible by the 2 processes"):
        effective_batch(resolve("voc_det", "paper", flags={"batch_size": 5}), 2)


def test_schemas_separate_the_task_families():
    det, seg = set(schema_keys("voc_det")), set(schema_keys("voc_seg"))
    assert {"anchor_sizes", "detector", "mask"} <= det - seg and {"crop_size", "output_stride"} <= seg - det
    assert {"iters", "lr", "seed", "eval_period", "train_sets", "test_sets"} <= det & seg

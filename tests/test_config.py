import json

import pytest

from pipeline.config import Config, ConfigError, from_dict, load_config


def test_defaults_are_the_papers():
    cfg = Config()
    assert cfg.train_cam.lr == 0.1 and cfg.train_cam.batch_size == 16 and cfg.train_cam.epochs == 5
    assert cfg.train_cam.resize_long == [320, 640] and cfg.train_cam.crop_size == 512
    assert cfg.cams.scales == [1.0, 0.5, 1.5, 2.0]
    assert (cfg.relations.fg_threshold, cfg.relations.bg_threshold) == (0.30, 0.05)
    assert cfg.relations.crf_gt_prob == 0.7 and cfg.relations.crf_iterations == 10
    assert cfg.train_irn.batch_size == 32 and cfg.train_irn.epochs == 3 and cfg.train_irn.radius == 10
    assert cfg.train_irn.backbone_init == "imagenet"  # the official code's, not the CAM network's
    assert cfg.run.min_cam_map > 0 and cfg.segmenter.eval_scales == [0.5, 1.0, 1.5, 2.0]
    assert (cfg.synthesis.beta, cfg.synthesis.steps, cfg.synthesis.radius) == (10.0, 256, 5)
    assert cfg.synthesis.centroid_threshold == 2.5 and cfg.synthesis.min_fragment == 0.01


@pytest.mark.parametrize("overrides, grouping", [
    ([], "official"),  # the paper's setting: an ImageNet backbone
    (["train_irn.backbone_init=cam"], "density"),
    (["train_irn.backbone_init=none", "train_irn.from_scratch=true"], "density"),
    (["train_irn.backbone_init=cam", "train_irn.use_model=/m/irn.pth"], "official"),
    (["train_irn.backbone_init=none", "synthesis.grouping=official"], "official"),
    (["synthesis.grouping=density"], "density"),
])
def test_grouping_auto_is_official_only_for_pretrained_irnet_backbones(overrides, grouping):
    assert from_dict({}, overrides).synthesis.grouping == grouping


def test_density_sigma_must_be_positive():
    with pytest.raises(ConfigError, match="synthesis.density_sigma"):
        from_dict({}, ["synthesis.density_sigma=0"])


@pytest.mark.parametrize("name", ["configs/demo.yaml", "configs/voc12.yaml"])
def test_shipped_configs_load_and_serialise(name):
    cfg = load_config(name)
    again = from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_yaml_from_fsspec_uri(tmp_path):
    (tmp_path / "c.yaml").write_text("train_cam:\n  lr: 0.05\n")
    assert load_config(f"file://{tmp_path}/c.yaml").train_cam.lr == 0.05


def test_overrides_parse_lists_numbers_and_bools():
    cfg = load_config("configs/demo.yaml", ["cams.scales=[1, 0.5]", "train_cam.lr=2e-2",
                                            "train_cam.use_gpu=true", "data.classes=[a, b]",
                                            "train_irn.max_steps=7", "run.root=s3://b/x"])
    assert cfg.cams.scales == [1.0, 0.5] and cfg.train_cam.lr == 0.02 and cfg.train_cam.use_gpu
    assert cfg.data.classes == ["a", "b"] and cfg.train_irn.max_steps == 7 and cfg.run.root == "s3://b/x"


@pytest.mark.parametrize("override, named", [
    ("train_cam.lrr=1", "train_cam.lrr"),
    ("nosuch.key=1", "nosuch"),
    ("train_cam.lr=fast", "train_cam.lr"),
    ("train_cam.epochs=2.5", "train_cam.epochs"),
    ("train_cam.use_gpu=1", "train_cam.use_gpu"),
    ("cams.scales=1.0", "cams.scales"),
    ("synthesis.method=magic", "synthesis.method"),
    ("train_cam.depth=19", "train_cam.depth"),
    ("train_cam.batch_size=0", "train_cam.batch_size"),
    ("train_irn.rescale=[1.5, 0.5]", "train_irn.rescale"),
    ("relations.fg_threshold=2", "relations.fg_threshold"),
    ("data.classes=[a, a]", "data.classes"),
    ("train_cam=3", "train_cam"),
    ("novalue", "novalue"),
    ("train_irn.crop_size=158", "train_irn.crop_size"),
    ("run.min_cam_map=1.5", "run.min_cam_map"),
    ("segmenter.model=unet", "segmenter.model"),
    ("segmenter.num_workers=8", "segmenter.batch_size"),  # DeepLab: 8 images over 8 workers is 1 per BatchNorm
    ("cams.source=/somewhere", "train_irn.backbone_init"),  # demo.yaml's 'cam' backbone needs a CAM network
])
def test_bad_configuration_names_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert named in str(err.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))

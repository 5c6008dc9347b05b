import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from jobs import _cli
from pipeline.config import (
    AT_LEAST_ONE,
    POSITIVE,
    RANGES,
    SHARE,
    Config,
    ConfigError,
    Range,
    check_inputs,
    from_dict,
    inputs,
    load_config,
)
from pipeline.io import storage

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("name", [None, "configs/demo.yaml", "configs/voc12.yaml", "configs/tiny.yaml"])
def test_defaults_and_shipped_configs_load_and_serialise(name):
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
    ("relations.bg_threshold=0.5", "relations.bg_threshold"),  # above fg_threshold 0.3
    ("train_cam.backbone_init=cam", "train_cam.backbone_init"),  # the CAM network cannot start from itself
    ("eval.iou_thresholds=[]", "eval.iou_thresholds"),
    # ranges worth pinning (the tests below check every RANGES entry is enforced as written)
    ("synthesis.beta=0", "synthesis.beta: must be > 0"),
    ("relations.crf_gt_prob=1", "relations.crf_gt_prob: must be in (0, 1)"),
    ("data.held_out_fraction=1", "data.held_out_fraction: must be in [0, 1)"),
    ("segmenter.momentum=1", "segmenter.momentum: must be in [0, 1)"),
    ("train_irn.crop_size=0", "train_irn.crop_size: must be >= 4"),
    ("cams.scales=[1.0, -0.5]", "cams.scales[1]: must be > 0"),
    ("train_cam.max_steps=0", "train_cam.max_steps: must be >= 1"),
])
def test_bad_configuration_names_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert named in str(err.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


# Ranges: every numeric key has one, and a value just outside it is refused, naming the key.

def _numeric_type(tp) -> type | None:
    """int or float for a numeric annotation (also inside ``| None`` and ``list[...]``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType, list):
        kinds = {_numeric_type(arg) for arg in typing.get_args(tp)} - {None}
        return kinds.pop() if kinds else None
    return tp if tp in (int, float) else None  # a Literal of ints (depth) is checked by its type


def _field_types() -> dict[str, type]:
    """``section.key`` -> int or float, for every numeric key of Config."""
    out = {}
    for section, cls in typing.get_type_hints(Config).items():
        for name, tp in typing.get_type_hints(cls).items():
            if _numeric_type(tp):
                out[f"{section}.{name}"] = _numeric_type(tp)
    return out


def test_every_numeric_key_has_a_range():
    keys = _field_types()
    assert sorted(set(keys) - set(RANGES)) == [], "numeric keys without an entry in config.RANGES"
    assert sorted(set(RANGES) - set(keys)) == [], "config.RANGES entries that are no numeric key"


def test_range_bounds_and_their_spelling():
    assert [POSITIVE.holds(v) for v in (-1, 0, 1e-9)] == [False, False, True] and str(POSITIVE) == "> 0"
    assert [AT_LEAST_ONE.holds(v) for v in (0, 1)] == [False, True] and str(AT_LEAST_ONE) == ">= 1"
    assert [SHARE.holds(v) for v in (-0.01, 0, 1, 1.01)] == [False, True, True, False] and str(SHARE) == "in [0, 1]"
    half_open = Range(0, 1, open_high=True)
    assert [half_open.holds(v) for v in (0, 0.999, 1)] == [True, True, False] and str(half_open) == "in [0, 1)"
    assert str(Range(0, 1, open_low=True, open_high=True)) == "in (0, 1)" and str(Range(high=5)) == "<= 5"


def _edges(outside: bool) -> list[tuple[str, Any]]:
    """(key, value) at each finite bound of each range: just outside (the bound itself when it is
    open, else 1 (an int) or 0.01 (a float) beyond it) or just inside (the bound when it is closed,
    else 1 or 1e-6 within)."""
    types_ = _field_types()
    cases = []
    for key, valid in sorted(RANGES.items()):
        kind = types_.get(key, float)
        step = 1 if kind is int else 0.01 if outside else 1e-6
        for bound, is_open, away in ((valid.low, valid.open_low, -1), (valid.high, valid.open_high, 1)):
            if bound is None:
                continue
            if outside:
                value = bound if is_open else bound + away * step
            else:
                value = bound - away * step if is_open else bound
            cases.append((key, kind(value)))
    return cases


def _check(key: str, value: Any) -> tuple[str, str]:
    """(the key as an error names it, the error's message or '') for ``key`` set to ``value`` (in a
    list key: its first element)."""
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    where, given = (f"{key}[0]", [value, *default[1:]]) if isinstance(default, list) else (key, value)
    try:
        from_dict({section: {name: given}})
    except ConfigError as err:
        return where, str(err)
    return where, ""


@pytest.mark.parametrize("key, value", _edges(outside=True), ids=[f"{k}={v}" for k, v in _edges(outside=True)])
def test_a_value_just_outside_its_range_is_refused_in_one_line(key, value):
    where, message = _check(key, value)
    assert message.startswith(f"{where}: must be {RANGES[key]}") and f"got {value!r}" in message, message
    assert "the default is" in message and "\n" not in message


@pytest.mark.parametrize("key, value", _edges(outside=False), ids=[f"{k}={v}" for k, v in _edges(outside=False)])
def test_a_value_on_the_edge_of_its_range_passes_it(key, value):
    where, message = _check(key, value)  # another rule may refuse it (bg_threshold 1 > fg_threshold)
    assert not message.startswith(f"{where}: must be {RANGES[key]}"), message


# Inputs: each file or folder the config names is looked at before any work.

def _present(tmp_path) -> dict[str, str]:
    """An existing input for each input key, and the overrides that name them."""
    (tmp_path / "source").mkdir()
    for name in ("m.parquet", "cam.pth", "irn.pth", "weights.pth"):
        (tmp_path / name).write_bytes(b"x")
    return {"data.manifest": str(tmp_path / "m.parquet"), "cams.source": str(tmp_path / "source"),
            "train_cam.use_model": str(tmp_path / "cam.pth"), "train_irn.use_model": str(tmp_path / "irn.pth"),
            "train_cam.backbone_init": str(tmp_path / "weights.pth"),
            "train_irn.backbone_init": str(tmp_path / "weights.pth"),
            "segmenter.backbone_init": str(tmp_path / "weights.pth")}


def test_inputs_that_exist_pass_and_keywords_are_not_files(tmp_path):
    present = _present(tmp_path)
    cfg = load_config(None, [f"{k}={v}" for k, v in present.items()])
    assert dict(inputs(cfg)) == present
    check_inputs(cfg)
    keywords = load_config("configs/demo.yaml", [f"data.manifest={present['data.manifest']}"])
    assert inputs(keywords) == [("data.manifest", present["data.manifest"])]  # none, cam: no file
    check_inputs(keywords)


@pytest.mark.parametrize("key", ["data.manifest", "cams.source", "train_cam.use_model", "train_irn.use_model",
                                 "train_cam.backbone_init", "train_irn.backbone_init", "segmenter.backbone_init"])
def test_a_missing_input_is_named_with_its_fix(tmp_path, key):
    present = _present(tmp_path)
    present[key] = str(tmp_path / "gone" / "x")
    with pytest.raises(ConfigError) as err:
        check_inputs(load_config(None, [f"{k}={v}" for k, v in present.items()]))
    assert str(err.value).startswith(f"{key}: {tmp_path}/gone/x does not exist; set {key} to ")


@pytest.mark.parametrize("key, value, problem", [
    ("data.manifest", "", "data.manifest: not set"),
    ("data.manifest", "{tmp}/source", "is a folder, not a file"),
    ("cams.source", "{tmp}/m.parquet", "is a file, not a folder"),
    ("train_irn.use_model", "nosuchscheme://bucket/irn.pth", "cannot be read (ValueError"),
])
def test_an_input_of_the_wrong_kind_or_unreadable_is_named(tmp_path, key, value, problem):
    present = {**_present(tmp_path), key: value.format(tmp=tmp_path)}
    with pytest.raises(ConfigError, match=re.escape(problem)) as err:
        check_inputs(from_dict({}, [f"{k}={v}" for k, v in present.items()]))
    assert str(err.value).startswith(key)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_a_file_without_read_permission_is_unreadable(tmp_path):
    present = _present(tmp_path)
    os.chmod(present["train_cam.use_model"], 0)
    with pytest.raises(ConfigError, match=r"train_cam\.use_model: .* cannot be read \(PermissionError"):
        check_inputs(load_config(None, [f"{k}={v}" for k, v in present.items()]))


def test_inputs_on_an_object_store_are_looked_up_there():
    storage.write_bytes("memory://irn-config-check/m.parquet", b"x")
    check_inputs(from_dict({"data": {"manifest": "memory://irn-config-check/m.parquet"}}))
    with pytest.raises(ConfigError, match="memory://irn-config-check/gone.parquet does not exist"):
        check_inputs(from_dict({"data": {"manifest": "memory://irn-config-check/gone.parquet"}}))


def test_relative_inputs_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.manifest=m.parquet", "train_irn.backbone_init=w.pth", "cams.source=cams",
                             "segmenter.backbone_init=cam"])
    assert (cfg.data.manifest, cfg.train_irn.backbone_init, cfg.cams.source) == (
        str(tmp_path / "m.parquet"), str(tmp_path / "w.pth"), str(tmp_path / "cams"))
    assert cfg.segmenter.backbone_init == "cam" and cfg.train_cam.backbone_init == "imagenet"


# The command line: one line, exit status 2, before Ray or the console start.

def _label_job(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m jobs.label --config configs/demo.yaml`` with ``overrides``. A job that got past
    its checks could start no Ray: demo.yaml's ray.address auto-local joins RAY_ADDRESS, which here
    is no address at all (ray.init refuses it at once: no embedded Ray, no other session's cluster
    joined). run.root and RAY_TMPDIR are in ``tmp_path`` to see that nothing began."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_DATA_LOG_LEVEL": "WARNING", "RAY_ADDRESS": "not-a-ray-address", "RAY_TMPDIR": str(tmp_path / "ray")}
    args = ["--config", "configs/demo.yaml", "--set", f"run.root={tmp_path / 'run'}"]
    for override in overrides:
        args += ["--set", override]
    return subprocess.run([sys.executable, "-m", "jobs.label", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("overrides, key", [
    (["data.manifest=/nonexistent/m.parquet"], "data.manifest"),
    (["data.manifest={tmp}/m.parquet", "synthesis.beta=-1"], "synthesis.beta"),
    (["data.manifest={tmp}/m.parquet", "train_irn.use_model={tmp}/missing/irn.pth"], "train_irn.use_model"),
])
def test_the_label_job_refuses_a_bad_setting_in_one_line_before_any_work(tmp_path, overrides, key):
    (tmp_path / "m.parquet").write_bytes(b"x")  # exists: the input check only looks
    done = _label_job(tmp_path, *(o.format(tmp=tmp_path) for o in overrides))
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"configuration error: {key}: ") and "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "ray").exists()  # no console, no Ray


def test_a_manifest_of_unknown_format_is_refused(tmp_path, capsys):
    (tmp_path / "m.txt").write_text("image_id,uri\n")
    args = _cli.parser("test").parse_args(["--set", f"data.manifest={tmp_path / 'm.txt'}",
                                           "--set", f"run.root={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as done:
        _cli.load(args)
    assert done.value.code == 2 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err.startswith("configuration error: data.manifest: ")

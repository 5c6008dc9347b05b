import numpy as np
from scipy import ndimage

from jobs import make_synthetic
from pipeline.data.images import decode_image
from pipeline.data.manifest import load_manifest
from pipeline.data.synthetic import CLASS_NAMES, generate_image
from pipeline.io import codecs, storage


def test_cli_writes_a_valid_manifest_whose_masks_agree_with_labels(tmp_path):
    manifest = make_synthetic.main(["--out", str(tmp_path), "--num-images", "50"])
    rows, quarantine, classes = load_manifest(manifest)
    assert len(rows) == 50 and quarantine == []
    assert classes == list(CLASS_NAMES[:4])
    sizes, touching = set(), 0
    for row in rows:
        image = decode_image(storage.read_bytes(row.uri))
        semantic = codecs.decode_label_png(storage.read_bytes(row.gt_semantic_uri))
        instance = codecs.decode_label_png(storage.read_bytes(row.gt_instance_uri))
        assert image.shape[:2] == semantic.shape == instance.shape
        sizes.add(image.shape[:2])
        present = sorted(classes[c - 1] for c in np.unique(semantic) if c > 0)
        assert present == row.labels and 1 <= len(row.labels) <= 3
        ids = [i for i in np.unique(instance) if i > 0]
        assert ids == list(range(1, len(row.gt_instance_classes) + 1))
        for i, name in zip(ids, row.gt_instance_classes):
            assert (semantic[instance == i] == classes.index(name) + 1).all()
        assert ((semantic > 0) == (instance > 0)).all()
        # Same-class instances touching: their union is one 4-connected component.
        for name in set(row.gt_instance_classes):
            members = [i for i, n in zip(ids, row.gt_instance_classes) if n == name]
            _, count = ndimage.label(np.isin(instance, members))
            touching += count < len(members)
    assert len(sizes) > 10  # sizes vary
    assert touching >= 5  # several images have touching instances of one class
    splits = {row.split for row in rows}
    assert splits == {"train", "val"}


def test_deterministic_for_a_seed_and_growing_keeps_earlier_images(tmp_path):
    a = generate_image(np.random.default_rng([3, 5]), CLASS_NAMES)
    b = generate_image(np.random.default_rng([3, 5]), CLASS_NAMES)
    c = generate_image(np.random.default_rng([4, 5]), CLASS_NAMES)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instance, b.instance)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)

    small = make_synthetic.main(["--out", str(tmp_path / "s"), "--num-images", "3", "--seed", "9"])
    large = make_synthetic.main(["--out", str(tmp_path / "l"), "--num-images", "5", "--seed", "9"])
    rows_small, _, _ = load_manifest(small)
    rows_large, _, _ = load_manifest(large)
    for rs, rl in zip(rows_small, rows_large):
        assert storage.read_bytes(rs.uri) == storage.read_bytes(rl.uri)
    assert len(rows_large) == 5


def test_class_count_and_instance_counts():
    for seed in range(20):
        sample = generate_image(np.random.default_rng(seed), CLASS_NAMES[:2], min_size=80, max_size=80)
        assert sample.image.shape == (80, 80, 3)
        assert set(sample.labels) <= set(CLASS_NAMES[:2])
        for name in sample.labels:
            assert 1 <= sample.instance_classes.count(name) <= 4

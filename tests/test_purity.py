"""pipeline/algorithms stays pure: no Ray, fsspec or pyarrow, no I/O, no hard-coded devices."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_algorithms_import_no_ray_fsspec_or_pyarrow():
    code = (
        "import sys, pkgutil, importlib, pipeline.algorithms as a\n"
        "for m in pkgutil.iter_modules(a.__path__): importlib.import_module('pipeline.algorithms.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'fsspec', 'pyarrow', 's3fs'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pipeline.algorithms pulled in: {out.stdout.strip()}"


def test_no_cuda_calls_or_file_io_in_algorithms():
    for path in (ROOT / "pipeline" / "algorithms").glob("*.py"):
        text = path.read_text()
        for needle in (".cuda(", "open(", "torch.load(", "np.load("):
            assert needle not in text, f"{path.name} contains {needle}"

"""Delete old labels versions: ``python -m jobs.retain --root R --keep K``.

Keeps the last K published versions (and LATEST); every older or abandoned version directory
loses the files no kept version's index references (kept versions reference the per-image outputs
of the versions that made them, which therefore stay). It holds the run root's lease, so it
never runs beside a labelling job.
"""

from __future__ import annotations

import argparse

from jobs import _cli
from pipeline import ledger
from pipeline.config import from_dict
from pipeline.stages.export import retain
from pipeline.tasks import init_ray


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="run root (local path or s3://...)")
    p.add_argument("--keep", type=int, required=True, help="published versions to keep (>= 1)")
    _cli.add_verbose(p)
    _cli.add_break_lock(p)
    args = p.parse_args(argv)
    with _cli.writing(args.root, args):
        init_ray(from_dict({}))
        result = retain(ledger.RunState(args.root), args.root, args.keep)
        removed = sum(result["removed_files"].values())
        print(f"kept {', '.join(result['kept'])}; removed {removed} files from {len(result['removed_files'])} "
              f"older version(s)")
        return result


if __name__ == "__main__":
    main()

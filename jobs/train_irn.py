"""Train IRNet on the mined relations (Ray Train): ``python -m jobs.train_irn --config FILE [--set key=value ...]``.

Runs only this stage of the end-to-end job (see jobs.label); a rerun resumes or skips.
"""

from __future__ import annotations

from jobs import _cli
from pipeline.orchestrate import run_label


def main(argv: list[str] | None = None) -> dict:
    with _cli.job(_cli.parser(__doc__).parse_args(argv)) as cfg:
        return run_label(cfg, only=["train_irn"])


if __name__ == "__main__":
    main()

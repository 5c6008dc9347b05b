"""Shared command line of the jobs: --config FILE, --set section.key=value overrides, --verbose.

Started as ``python -m jobs.<name>``, a job's console shows our lines only (stages, progress,
warnings, the summary); Ray's own lines go to ``<run root>/run.log`` (jobs._console).
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing

from jobs import _console
from pipeline.config import Config, ConfigError, check_inputs, load_config
from pipeline.data.manifest import manifest_format


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (local path or fsspec URI); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set run.root=s3://bucket/run")
    add_verbose(p)
    return p


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own lines (workers, datasets, actors) on the console too; they always go to "
                        "run.log in the run root")


def console(root: str, *, verbose: bool = False) -> None:
    """Hand the console over to jobs._console when this process runs a job from the command line
    (``python -m jobs.<name>``); else (a test or a notebook calling ``main()``) log to stderr."""
    if _console.started_as_job():
        _console.start(root, verbose=verbose)
    else:
        logging.basicConfig(level=logging.INFO, format=_console.LOG_FORMAT)


def load(args: argparse.Namespace) -> Config:
    """The resolved config, or exit 2 with one line that names the key and the fix: a bad value
    (pipeline.config), or an input that cannot be read (:func:`pipeline.config.check_inputs`, a
    manifest of unknown format). Nothing has started then; after it, the console is set up for
    the run root (:func:`console`)."""
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
    except ConfigError as err:
        _refuse(str(err))
    try:
        manifest_format(cfg.data.manifest)
    except ValueError as err:
        _refuse(f"data.manifest: {err}")
    console(cfg.run.root, verbose=args.verbose)
    return cfg


def _refuse(message: str) -> typing.NoReturn:
    print(f"configuration error: {message}", file=sys.stderr)
    raise SystemExit(2)

"""Shared command line of the jobs: --config FILE and --set section.key=value overrides."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import Config, ConfigError, load_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (local path or fsspec URI); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set run.root=s3://bucket/run")
    return p


def load(args: argparse.Namespace) -> Config:
    """The resolved config, or exit 2 with the key and the fix named."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not cfg.data.manifest:
        print("configuration error: data.manifest is empty; set it in the YAML or with "
              "--set data.manifest=PATH_OR_URI", file=sys.stderr)
        raise SystemExit(2)
    return cfg

"""Where a run stands, from its run.json: ``python -m jobs.status --root R``.

Prints the manifest counts, one line per stage (status, time, counts, last update), the published
labels versions, any unfinished one, and where the log of the jobs is. Reads only ``run.json`` and
``labels/LATEST``; starts no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline import ledger
from pipeline.io import layout, lease, storage
from pipeline.progress import duration, summary_table

STAGES = ("manifest",) + ledger.STAGES


def describe(root: str) -> str:
    """The status text of the run root ``root``."""
    uri = layout.run_json(root)
    if not storage.exists(uri):
        return f"{root}: no run.json (no run has started here)"
    state = json.loads(storage.read_text(uri))
    lines = [f"run root: {root}"]
    manifest = state.get("manifest") or {}
    if manifest:
        lines.append(f"manifest: {manifest.get('uri')} - {manifest.get('valid')} valid, "
                     f"{manifest.get('quarantined')} quarantined, {manifest.get('held_out')} held out, "
                     f"{manifest.get('ground_truth')} with ground truth; classes: {', '.join(manifest.get('classes', []))}")
    stages = state.get("stages", {})
    running = [name for name in STAGES if stages.get(name, {}).get("status") == "running"]
    failed = [name for name in STAGES if stages.get(name, {}).get("status") == "failed"]
    lines.append(summary_table(stages, STAGES))
    for name in STAGES:
        updated = stages.get(name, {}).get("updated")
        if name in running or name in failed:
            lines.append(f"stage {name} is {stages[name]['status']} (last update {updated})")
    labels = state.get("labels", {})
    versions = labels.get("versions", {})
    latest = ledger.latest_version(root)
    lines.append(f"labels: LATEST = {latest or '-'}; {len(versions)} published version(s)")
    for name in sorted(versions)[-5:]:
        info = versions[name]
        lines.append(f"  {name}: {info.get('images')} images, {info.get('instances')} instances, "
                     f"published {info.get('published')}")
    pending = labels.get("pending")
    if pending:
        lines.append(f"unfinished version {pending['name']} (base {pending.get('base') or '-'}): the next run "
                     "with the same settings completes it")
    last = state.get("last_run")
    if last:
        lines.append(f"last complete run: {duration(last.get('seconds'))}, labels version {last.get('labels_version')}")
    elif running:
        lines.append("no run has completed; one is running or was interrupted")
    holder = lease.holder(root)
    if holder:
        state_of = "expired: the next job takes it over" if holder["expired"] else "a job is writing now"
        lines.append(f"lease: held by {lease.describe(holder)} since {holder['started_at']}, heartbeat "
                     f"{duration(holder['age'])} ago ({state_of})")
    if storage.exists(layout.run_log(root)):
        lines.append(f"log of the jobs (Ray's lines included): {layout.run_log(root)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="run root (local path or s3://...)")
    args = p.parse_args(argv)
    text = describe(args.root)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

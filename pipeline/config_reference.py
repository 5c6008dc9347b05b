"""The configuration reference (docs/configuration.md), generated from ``pipeline/config.py``.

The comments in config.py are the one source of what a key means: for every field of every
section of :class:`pipeline.config.Config`, the comment lines right above it and the trailing
``# comment`` on its line(s), joined; each section's docstring introduces its table. Types are
the annotations as written, defaults the values a fresh ``Config()`` holds (YAML spelling), valid
values the ranges of ``config.RANGES``.

    python -m pipeline.config_reference            # rewrite docs/configuration.md (make docs)
    python -m pipeline.config_reference --check    # exit 1 when the file is stale or a key undocumented
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import logging
import sys
import tokenize
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from pipeline import config as config_module

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DOC_PATH = REPO / "docs" / "configuration.md"
COMMAND = "make docs  (or: python -m pipeline.config_reference)"


class KeyDoc(NamedTuple):
    """One ``section.key``: its annotation as written, its default in YAML, its valid range
    (``> 0``, ``each in [0, 1]``; '' without one), its comment text."""

    key: str
    type: str
    default: str
    valid: str
    doc: str


class SectionDoc(NamedTuple):
    """One section of Config: its name, its class's docstring, its keys in declaration order."""

    name: str
    intro: str
    keys: list[KeyDoc]


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text without '#', whether the line holds nothing else)."""
    out = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            alone = lines[row - 1].strip().startswith("#")
            out[row] = (tok.string.lstrip("#").strip(), alone)
    return out


def _field_doc(node: ast.AnnAssign, comments: dict[int, tuple[str, bool]]) -> str:
    """The comment lines right above ``node`` (no blank line between) and its trailing comments."""
    above = []
    row = node.lineno - 1
    while row in comments and comments[row][1]:
        above.insert(0, comments[row][0])
        row -= 1
    trailing = [comments[r][0] for r in range(node.lineno, node.end_lineno + 1)
                if r in comments and not comments[r][1]]
    return " ".join(part for part in above + trailing if part)


def _type_text(annotation: ast.expr) -> str:
    """The annotation as written, ``Literal["a", "b"]`` spelled as the accepted values ``a | b``."""
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", None) == "Literal":
        items = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        return " | ".join(str(ast.literal_eval(item)) for item in items)
    return ast.unparse(annotation)


def _default_text(value: Any) -> str:
    """A default as it would be written in YAML (``null``, ``true``, ``[0.5, 1.5]``, ``''``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _valid_text(key: str, kind: str) -> str:
    """The range of ``key`` in config.RANGES (for a list, of each element); '' without one."""
    valid = config_module.RANGES.get(key)
    if valid is None:
        return ""
    return f"each {valid}" if kind.startswith("list[") else str(valid)


def sections(source: str | None = None) -> list[SectionDoc]:
    """Every section of Config, read from the source of pipeline/config.py (``source`` overrides it,
    for tests); defaults come from the imported module's ``Config()``."""
    source = inspect.getsource(config_module) if source is None else source
    tree = ast.parse(source)
    comments = _comments(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    defaults = config_module.Config()
    out = []
    for node in classes["Config"].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        section, cls = node.target.id, classes[ast.unparse(node.annotation)]
        keys = []
        for item in cls.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                name = item.target.id
                value = getattr(getattr(defaults, section), name, None)
                key, kind = f"{section}.{name}", _type_text(item.annotation)
                keys.append(KeyDoc(key, kind, _default_text(value), _valid_text(key, kind), _field_doc(item, comments)))
        out.append(SectionDoc(section, inspect.cleandoc(ast.get_docstring(cls) or ""), keys))
    return out


def config_keys() -> set[str]:
    """Every ``section.key`` of the Config dataclasses, from the dataclasses themselves."""
    defaults = config_module.Config()
    return {f"{s.name}.{k.name}" for s in dataclasses.fields(defaults)
            for k in dataclasses.fields(getattr(defaults, s.name))}


def _cell(text: str, *, code: bool = False) -> str:
    """Text fit for a Markdown table cell: pipes escaped; outside code, angle brackets shown as
    such rather than read as HTML."""
    text = text.replace("|", "\\|")
    return text if code else text.replace("<", "&lt;").replace(">", "&gt;")


def render(docs: list[SectionDoc]) -> str:
    """The Markdown page: a header saying how it is made, then one table per section."""
    intro = inspect.cleandoc(config_module.__doc__ or "")
    lines = ["# Configuration reference", "",
             "<!-- Generated from pipeline/config.py by `make docs`; edit the comments there, not this file. -->",
             "", intro, "",
             "Every key below is `section.key`: set it in the YAML file under its section, or on the command "
             "line as `--set section.key=value` (the value is YAML: `true`, `0.5`, `[a, b]`). Defaults are "
             "the paper's setting; `configs/demo.yaml` shrinks them for a CPU. A job given a value outside "
             "its valid range, or an input that does not exist, stops before it starts, with one line "
             "`configuration error: section.key: ...` and exit status 2.", ""]
    lines += ["Sections: " + ", ".join(f"[`{s.name}`](#{s.name})" for s in docs) + ".", ""]
    for section in docs:
        lines += [f"## {section.name}", "", section.intro, "",
                  "| key | type | default | valid | meaning |", "| --- | --- | --- | --- | --- |"]
        for key in section.keys:
            kind, default = _cell(key.type, code=True), _cell(key.default, code=True)
            valid = f"`{_cell(key.valid, code=True)}`" if key.valid else ""
            lines.append(f"| `{key.key}` | `{kind}` | `{default}` | {valid} | {_cell(key.doc)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def problems(docs: list[SectionDoc]) -> list[str]:
    """Keys without a comment, and keys of Config the source walk did not find (or vice versa)."""
    found = {k.key for s in docs for k in s.keys}
    out = [f"{k.key}: no comment in pipeline/config.py (add '# ...' on its line or right above it)"
           for s in docs for k in s.keys if not k.doc.strip()]
    out += [f"{key}: a Config key the reference misses" for key in sorted(config_keys() - found)]
    out += [f"{key}: documented but not a Config key" for key in sorted(found - config_keys())]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="the Markdown file to write (or check)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    docs = sections()
    bad = problems(docs)
    if bad:
        log.error("configuration reference: %s", "; ".join(bad))
        return 1
    text = render(docs)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            log.error("%s is out of date with pipeline/config.py; run: %s", args.out, COMMAND)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log.info("wrote %s (%d keys)", args.out, sum(len(s.keys) for s in docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The docs stay true to the code: the configuration reference is generated from pipeline/config.py
and matches it key for key, every relative link in README.md and docs/ resolves (file and heading
anchor), and the README stays short enough to read in five minutes."""

import re
from pathlib import Path

import pytest

from pipeline import config_reference as ref

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
README_MAX_LINES = 200
ROW = re.compile(r"^\| `([a-z0-9_]+\.[a-z0-9_]+)` \|(.*)\|\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def documented_keys(text: str) -> dict[str, str]:
    """``section.key`` -> its meaning cell, for every table row of the configuration reference."""
    out = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            cells = re.split(r"(?<!\\)\|", match.group(2))
            out[match.group(1)] = cells[-1].strip()
    return out


def without_code(text: str) -> str:
    """The Markdown with fenced blocks and inline code spans blanked (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "``", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link syntax reduced to its text, lower case, punctuation
    other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(), flags=re.S | re.M).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or heading anchor, does not exist."""
    bad = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            bad.append(f"{target} (no file {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            bad.append(f"{target} (no heading with anchor #{anchor} in {resolved.name})")
    return bad


def test_every_config_key_has_a_comment_in_config_py():
    problems = ref.problems(ref.sections())
    assert not problems, "undocumented config keys:\n" + "\n".join(problems)


def test_configuration_reference_documents_exactly_the_config_keys():
    documented = documented_keys(ref.DOC_PATH.read_text())
    keys = ref.config_keys()
    assert not sorted(set(documented) - keys), (
        f"docs/configuration.md documents keys that Config does not have: {sorted(set(documented) - keys)}; "
        f"run: {ref.COMMAND}")
    assert not sorted(keys - set(documented)), (
        f"Config keys missing from docs/configuration.md: {sorted(keys - set(documented))}; run: {ref.COMMAND}")
    empty = sorted(k for k, doc in documented.items() if not doc)
    assert not empty, f"keys documented with no text in docs/configuration.md: {empty}"


def test_configuration_reference_is_what_the_generator_writes_now():
    assert ref.DOC_PATH.read_text() == ref.render(ref.sections()), (
        f"docs/configuration.md is out of date with pipeline/config.py; run: {ref.COMMAND}")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    bad = broken_links(page)
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference material into docs/")


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text


# The checks above must fail when the docs are broken: each is run here on a broken copy.

def test_a_field_without_a_comment_is_reported():
    source = Path(ref.config_module.__file__).read_text()
    line = next(x for x in source.splitlines() if x.strip().startswith("shard_rows:"))
    broken = source.replace(line, line.split("  #")[0])
    assert any(p.startswith("run.shard_rows:") for p in ref.problems(ref.sections(broken)))
    assert not any(p.startswith("run.shard_rows:") for p in ref.problems(ref.sections(source)))


def test_a_stale_or_foreign_reference_is_caught():
    text = ref.render(ref.sections())
    stale = documented_keys(text.replace("`run.shard_rows`", "`run.shard_count`"))
    assert "run.shard_count" in set(stale) - ref.config_keys()
    assert "run.shard_rows" in ref.config_keys() - set(stale)
    emptied = documented_keys(re.sub(r"(\| `run\.seed` \|.*\|).*\|$", r"\1 |", text, flags=re.M))
    assert emptied["run.seed"] == "" and documented_keys(text)["run.seed"]


def test_broken_links_and_anchors_are_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Nightly reruns: as the set grows\n\n## GPU check\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#nightly-reruns-as-the-set-grows) [ok](docs/a.md#gpu-check)\n"
        "[web](https://example.com/x) `[code](missing.md)`\n```\n[fenced](missing.md)\n```\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#demo) [self](#nothing)\n")
    bad = broken_links(tmp_path / "README.md")
    assert [b.split(" ")[0] for b in bad] == ["docs/b.md", "docs/a.md#demo", "#nothing"]
    assert slug("`segmenter` keys: Mask R-CNN / DeepLab") == "segmenter-keys-mask-r-cnn--deeplab"

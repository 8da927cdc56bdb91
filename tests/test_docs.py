"""The user-facing docs: a README short enough to read in five minutes, the rest in docs/, every
relative link resolving inside the repository."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_the_readme_is_at_most_200_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_docs_cover_the_reference_topics():
    names = {path.stem for path in (REPO / "docs").glob("*.md")}
    assert {"design", "options", "stats-and-metrics", "cli", "cpu-executor", "simulator", "trained-model", "gpu",
            "trace-format"} <= names


def test_every_relative_link_resolves_inside_the_repository():
    for doc in DOCS:
        for target, _ in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(REPO), f"{doc.name} links outside the repository: {target}"
            assert path.exists(), f"{doc.name} links to a missing file: {target}"


def test_no_doc_names_a_path_outside_the_repository():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../shared" not in text and "/work/" not in text, doc.name

"""The docs say what is true: the paths, settings and anchors they name exist, and nothing points outside."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from dispatcher.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")]
)
# Variables the docs may name that are not settings of the service.
NOT_SETTINGS = {"DISPATCHER_TEST_DATABASE_URL", "DISPATCHER_TEST_REDIS_URL"}
# Where a doc's short path (`api/app.py`, `faults/conftest.py`) may live.
PATH_BASES = (
    ROOT,
    ROOT / "dispatcher",
    ROOT / "tests",
    ROOT / "tests/integration",
    ROOT / "tests/faults",
)
FILE_PATH = re.compile(
    r"^[\w.\-/*]+\.(?:py|md|sql|yaml|toml|txt)$|^(?:dispatcher|tests|benchmarks|docs|deploy)/[\w\-/]*$"
)
BACKTICKED = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
SETTING = re.compile(r"\bDISPATCHER_[A-Z0-9_]*[A-Z0-9]\b")
# `docs/API.md#routes` or `API.md#routes`, in docs, code comments and tests alike.
ANCHORED = re.compile(r"((?:[\w\-]+/)*[\w\-]+\.md)#([\w\-]+)")
# What a clone does not have: another checkout's files, or the notes of whoever wrote the code.
OUTSIDE = re.compile(
    r"\.\./shared|\bCONTRACT\b|\bLESSONS\b|§|(?i:\bissue \d+|\bthe seed\b|\bseed(?:'s| design| shapes)|\bthe contract\b)"
)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#+ (.+)", line)):
            base = slug(m.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def resolve(path: str, doc: Path) -> bool:
    path = path.split("::")[0].split(":")[0].rstrip("/")
    for base in (doc.parent, *PATH_BASES):
        if "*" in path:
            if any(base.glob(path)):
                return True
        elif (base / path).exists():
            return True
    return False


# Lock files and compressed or image data hold no prose to check.
BINARY_SUFFIXES = {".lock", ".gz", ".png"}


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    skip = {
        "LICENSE",
        "tests/unit/test_docs.py",
        "constraints.txt",
        # A third-party licence, quoted verbatim ("... IN CONTRACT, STRICT LIABILITY").
        "dispatcher/api/opsassets/vendor/leaflet/LICENSE.txt",
    }
    return [
        ROOT / n
        for n in names
        if n not in skip
        and (ROOT / n).is_file()
        and (ROOT / n).suffix not in BINARY_SUFFIXES
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_repository_path_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text()
    named = {m for m in BACKTICKED.findall(text) if FILE_PATH.match(m)}
    named |= {
        m.split("#")[0]
        for m in LINK.findall(text)
        if "://" not in m and not m.startswith("#")
    }
    missing = sorted(p for p in named if p and not resolve(p, doc))
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_setting_a_doc_names_is_a_field(doc: Path) -> None:
    fields = {f"DISPATCHER_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(set(SETTING.findall(doc.read_text())) - fields - NOT_SETTINGS)
    assert not unknown, "\n".join(unknown)


def test_every_anchor_named_anywhere_exists() -> None:
    wrong = []
    for path in tracked_text_files():
        if path.suffix not in {".py", ".md", ".sql", ".yaml", ".toml"}:
            continue
        text = path.read_text()
        for target, anchor in ANCHORED.findall(text):
            doc = next(
                (
                    b / target
                    for b in (path.parent, ROOT, ROOT / "docs")
                    if (b / target).is_file()
                ),
                None,
            )
            if doc is None or anchor not in anchors(doc):
                wrong.append(f"{path.relative_to(ROOT)}: {target}#{anchor}")
        if path.suffix == ".md":
            wrong += [
                f"{path.relative_to(ROOT)}: #{a}"
                for a in re.findall(r"\]\(#([\w\-]+)\)", text)
                if a not in anchors(path)
            ]
    assert not wrong, "\n".join(wrong)


def test_no_file_refers_outside_the_repository() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in tracked_text_files()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_configuration_table_lists_every_setting() -> None:
    table = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    rows = re.findall(r"^\| `(DISPATCHER_[A-Z0-9_]+)` \|", table, re.MULTILINE)
    assert len(rows) == len(set(rows)), "a setting has two rows"
    assert set(rows) == {f"DISPATCHER_{name.upper()}" for name in Settings.model_fields}


@pytest.mark.parametrize(
    ("line", "outside"),
    [
        ("see ../shared/CONTRACT.md", True),
        ("(CONTRACT §4)", True),
        ("measured in LESSONS.md", True),
        ("the targets of issue 4", True),
        ("the seed's design", True),
        ("rng = random.Random(seed)", False),
        ("docs/API.md#invariants", False),
    ],
)
def test_the_outside_pattern_finds_what_it_should(line: str, outside: bool) -> None:
    assert bool(OUTSIDE.search(line)) is outside


def test_slugs_follow_github() -> None:
    assert (
        slug("Operator commands: `dispatcher zones`")
        == "operator-commands-dispatcher-zones"
    )
    assert (
        slug("Bugs the hostile suites found (all fixed)")
        == "bugs-the-hostile-suites-found-all-fixed"
    )
    assert slug("`POST /events/seller-order-ready`") == "post-eventsseller-order-ready"

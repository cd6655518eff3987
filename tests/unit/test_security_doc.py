"""docs/SECURITY.md stays true: the tests it cites exist, and its numbers are the code's."""

from __future__ import annotations

import re
from pathlib import Path

from dispatcher.api.body import MAX_BATCH_BODY_BYTES, MAX_BODY_BYTES
from dispatcher.config import Settings
from dispatcher.models import MAX_BATCH_PINGS
from dispatcher.store.inbound_ids import EXPIRY_MARGIN_S
from dispatcher.webhooks.signing import DEFAULT_TOLERANCE_S
from tests.integration.test_hostile_http import malformed_corpus

ROOT = Path(__file__).resolve().parents[2]
SECURITY = (ROOT / "docs" / "SECURITY.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
CITED = re.compile(r"`(test_[\w]+\.py)::(test_\w+)`")


def test_every_cited_test_exists() -> None:
    cited = CITED.findall(SECURITY)
    assert len(cited) >= 10
    sources = {
        p.name: p.read_text(encoding="utf-8")
        for p in (ROOT / "tests").rglob("test_*.py")
    }
    missing = [f"{f}::{t}" for f, t in cited if f"def {t}(" not in sources.get(f, "")]
    assert missing == []


def test_the_numbers_are_the_codes() -> None:
    settings = Settings()
    expected = [
        f"over {MAX_BODY_BYTES // 1024} KiB get `413`",
        f"whose limit is {MAX_BATCH_BODY_BYTES // 1024} KiB",
        f"batch of {MAX_BATCH_PINGS} pings",
        f"more\n  than {DEFAULT_TOLERANCE_S} s away",
        f"plus {DEFAULT_TOLERANCE_S} s plus a {EXPIRY_MARGIN_S} s margin",
        f"`DISPATCHER_HTTP_HEAD_TIMEOUT_S` ({settings.http_head_timeout_s:g} s)",
        f"`DISPATCHER_HTTP_BODY_TIMEOUT_S` ({settings.http_body_timeout_s:g} s)",
        f"`DISPATCHER_HTTP_IDLE_TIMEOUT_S` ({settings.http_idle_timeout_s:g} s)",
        f"A corpus of {len(malformed_corpus('x'))} malformed requests",
    ]
    flat = " ".join(SECURITY.split())
    assert [e for e in expected if " ".join(e.split()) not in flat] == []


def test_the_readme_makes_no_stale_security_promise() -> None:
    """The README once listed fixed bugs as open and called a replay within 5 minutes
    harmless; the Security text now lives in docs/SECURITY.md."""
    assert "docs/SECURITY.md" in README
    for stale in (
        "Open findings",
        "a replay is harmless",
        "64 KiB body limit comes first",
    ):
        assert stale not in README
        assert stale.lower() not in SECURITY.lower() or stale == "Open findings"
    assert "None known" in SECURITY.split("## Open findings", 1)[1]

"""scripts/mutation_check.py: every listed mutation still applies to the code (exactly one match),
bad arguments exit 2 with one line, and the doc keeps its prose around the generated table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import mutation_check as MC  # noqa: E402
from mutations import MUTATIONS  # noqa: E402


def test_every_mutation_applies_once_and_changes_the_code():
    assert MC.stale(ROOT, MUTATIONS) == []
    ids = [m.id for m in MUTATIONS]
    assert len(ids) == len(set(ids))
    assert sum(m.audit for m in MUTATIONS) == 9 and len(MUTATIONS) >= 19
    for m in MUTATIONS:
        assert m.old != m.new and m.tests, m.id
        for t in m.tests:  # every named test file exists
            if t.startswith("tests/"):
                assert (ROOT / t.split("::")[0]).is_file(), (m.id, t)


def test_bad_arguments_exit_2(tmp_path):
    run = [sys.executable, str(ROOT / "scripts" / "mutation_check.py")]
    res = subprocess.run([*run, "--only", "no-such-mutation"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown mutation id" in res.stderr and len(res.stderr.splitlines()) == 1
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    res = subprocess.run([*run, "--json", str(existing)], capture_output=True, text=True)
    assert res.returncode == 2 and "not overwriting" in res.stderr and existing.read_text() == "{}"


def test_doc_block_is_replaced_and_prose_kept(tmp_path):
    doc = tmp_path / "mutation.md"
    rows = [{"id": "x", "area": "a", "what": "w", "audit": True, "tests": "t", "result": "caught",
             "seconds": 1.0, "equivalent": ""}]
    meta = {"command": "cmd", "tree": "HEAD", "date": "d", "machine": "m", "seconds": 2.0}
    MC.write_doc(doc, MC.markdown(rows, meta))
    doc.write_text("# Title\n\nprose before\n\n" + doc.read_text().split("\n", 2)[2] + "\nprose after\n")
    rows[0]["result"] = "SURVIVED"
    MC.write_doc(doc, MC.markdown(rows, meta))
    text = doc.read_text()
    assert "prose before" in text and "prose after" in text
    assert text.count(MC.START) == 1 and "| SURVIVED |" in text and "| caught |" not in text

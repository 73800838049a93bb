"""`mptrain-report --check`: committed reports remade from their committed records, table by table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli_helpers import mptrain

FIXTURE = Path(__file__).parent / "fixtures" / "records"
RESULTS = Path(__file__).resolve().parents[1] / "results"


def report(*args: str, cwd: Path):
    return mptrain(*args, cwd=cwd, script="mptrain-report")


def test_a_report_remakes_from_its_header_and_a_changed_row_is_named(tmp_path):
    """The header records the options that shaped the tables (here a margin and the training-loss metric), so the
    check remakes the same tables; a table row edited after the fact is caught and named, exit 1."""
    shutil.copytree(FIXTURE, tmp_path / "records")
    made = report("records", "--metric", "train_loss", "--margin", "0.3", "--out", "exp/report", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "exp" / "report" / "report.md").read_text()
    assert "Options: `--metric train_loss --margin 0.3`." in text.splitlines()[2]

    same = report("--check", "exp", cwd=tmp_path)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.splitlines()[0].startswith("same")

    rows = [line for line in text.splitlines() if line.startswith("| [")]
    edited = text.replace(rows[0], rows[0].replace("(n=4)", "(n=5)"))
    assert edited != text
    (tmp_path / "exp" / "report" / "report.md").write_text(edited)
    differs = report("--check", "exp", cwd=tmp_path)
    assert differs.returncode == 1
    assert differs.stdout.startswith("differs") and "table row 3" in differs.stdout and "(n=5)" in differs.stdout


def test_a_report_without_its_records_is_listed_never_passed(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "records")
    assert report("records", "--out", "exp/report", cwd=tmp_path).returncode == 0
    shutil.rmtree(tmp_path / "records")
    out = report("--check", "exp", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no records") and "not in the repository: ../../records" in out.stdout
    assert "0 reports remade the same, 0 differ, 1 without their records" in out.stdout


@pytest.mark.parametrize("extra, says", [
    ([], "no report.md written by mptrain-report"),
    (["--metric", "train_loss"], "--check remakes each report with the options its own header names; drop --metric"),
])  # fmt: skip
def test_a_folder_without_reports_or_an_option_the_check_would_ignore_is_one_line(tmp_path, extra, says):
    out = report("--check", str(tmp_path), *extra, cwd=tmp_path)
    assert out.returncode == 2 and says in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_every_committed_report_with_committed_records_remakes_its_tables():
    """The claims' tables in results/ come out of the per-run records committed beside them, with today's code: a
    change to the report's tables must remake the committed reports (mptrain-report --check results says which)."""
    out = report("--check", str(RESULTS), cwd=RESULTS.parent)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr
    same = [line for line in out.stdout.splitlines() if line.startswith("same")]
    assert any("repro_loss_scaling/report/" in line for line in same)
    assert len(same) >= 10


def test_every_link_in_the_results_pages_resolves():
    """Remaking a report renames its figures when a section's setting changes: the pages that link them follow."""
    import re

    broken = [(str(page.relative_to(RESULTS)), target) for page in RESULTS.rglob("*.md") if page.name != "report.md"
              for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text())
              if not (page.parent / target).exists()]  # fmt: skip
    assert not broken


def test_the_header_options_read_back_as_they_were_said():
    from mptrain.errors import UserError
    from mptrain.report.make import options_read, options_said

    said = options_said(["perplexity=2", "0.3"], "train_loss", "bf16 moments", "5-9")
    assert options_read(said) == (["perplexity=2", "0.3"], "train_loss", "bf16 moments", "5-9")
    assert options_read(options_said(None, "primary", None)) == ([], "primary", None, None)
    with pytest.raises(UserError, match="--out does not shape a report's tables"):
        options_read("--out x")

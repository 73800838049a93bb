"""`mptrain-report`: runs → comparison tables, plots, report.md/html (see mptrain/report/cli.py)."""

"""The report's second look at each verdict: the exact sign-flip permutation test beside the t-test, and the verdict
after Holm's adjustment over its plan's arms (report/paired_verdict.py computes both)."""

from __future__ import annotations

from mptrain.report.paired_verdict import ALPHA, smallest_p
from mptrain.report.tables import _missing, _num


def sign_flip_cell(r) -> str:
    """The sign-flip verdict, with why it cannot agree where n is too small for the test the verdict rests on (a
    difference: two-sided; equivalence: one-sided, TOST's halves), else a ⚠ where it and the t-test disagree."""
    n, flip = int(r["pairs"]), r["signflip_verdict"]
    two_sided = r["verdict"] in ("better", "worse") or (r["verdict"] == "inconclusive" and flip in ("better", "worse"))
    if smallest_p(n, two_sided) >= ALPHA:
        side = "two-sided" if two_sided else "one-sided"
        return f"{flip} (n={n} cannot reach p < {ALPHA:g} {side}: its smallest p is {smallest_p(n, two_sided):.3g})"
    return flip + (" ⚠ differs from the t-test's" if flip != r["verdict"] else "")


def checks_markdown(tables: dict, titles: dict) -> str:
    """Per judged arm: the t-test's verdict, the sign-flip test's p-values and verdict, Holm's adjusted p and the
    verdict that survives it."""
    lines = ["| experiment | arm | t-test verdict | sign-flip p: Δ = 0; equivalence | sign-flip verdict | "
             "Holm-adjusted p | verdict after Holm |", "|---|---|---|---|---|---|---|"]
    for key, table in tables.items():
        for _, r in table[~table["control"]].iterrows():
            if _missing(r.get("signflip_p")):
                continue
            holm = r["holm_verdict"] or "-"
            if r["holm_verdict"] and r["holm_verdict"] != r["verdict"]:
                holm = f"**{holm}** (was {r['verdict']})"
            lines.append(f"| {titles[key]} | {r['arm']} | {r['verdict']} | {r['signflip_p']:.3g}; "
                         f"{_num(r['signflip_tost_p'], '{:.3g}')} | {sign_flip_cell(r)} | "
                         f"{_num(r['holm_p'], '{:.3g}')} | {holm} |")
    return "\n".join(lines) if len(lines) > 2 else ""

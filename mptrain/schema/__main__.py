"""`python -m mptrain.schema`: print the configuration table; `--docs` rewrites docs/configuration.md's copy of it
(between `<!-- config-table -->` and `<!-- /config-table -->`), which a test keeps equal to the schemas."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mptrain.schema import markdown_table

BLOCK = re.compile(r"(<!-- config-table -->\n).*?(<!-- /config-table -->)", re.S)


def main(argv: list[str]) -> int:
    table = markdown_table()
    if not {"--docs", "--readme"} & set(argv):  # --readme: the table's old home, kept as a name
        print(table)
        return 0
    readme = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    text = readme.read_text()
    if not BLOCK.search(text):
        print(f"mptrain: error: {readme} has no <!-- config-table --> block to rewrite", file=sys.stderr)
        return 2
    readme.write_text(BLOCK.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

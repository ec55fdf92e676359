"""The README's module tables for `cloud/` and `pipeline/` name exactly the modules that exist."""

import re

import pytest

from tests.conftest import ROOT


def table_after(heading: str) -> set[str]:
    """The module names (`x.py`, `dir/`) in the first column of the table following `heading`."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    names: set[str] = set()
    for row in rows[2:]:  # the header and its rule
        names.update(re.findall(r"`([A-Za-z0-9_]+(?:\.py|/))`", row.split("|")[1]))
    return names


@pytest.mark.parametrize(
    "package, heading",
    [("cloud", "Where the cluster code lives"), ("pipeline", "Where the sweep code lives")],
)
def test_module_table_matches_the_files(package, heading):
    d = ROOT / package
    files = {p.name for p in d.glob("*.py") if p.name != "__init__.py"}
    files |= {f"{p.name}/" for p in d.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    named = table_after(heading)
    assert sorted(files - named) == [], f"in {package}/ but not in the README's table"
    assert sorted(named - files) == [], f"in the README's table but not in {package}/"

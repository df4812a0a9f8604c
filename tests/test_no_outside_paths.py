"""A fresh clone has nothing beside it: no test may read a path outside the checkout."""

import pathlib
import re

_TESTS = pathlib.Path(__file__).resolve().parent
# Ways a test could climb out of the repository: ../shared, parents[2+], an absolute /work path.
_OUTSIDE = re.compile(r"\.\./shared|parents\[[2-9]\]|[\"']/work/")


def test_golden_copy_is_inside_the_repository():
    golden = _TESTS / "golden" / "reference_losses.npz"
    assert golden.is_file(), golden
    assert golden.stat().st_size > 1_000_000


def test_no_test_reads_outside_the_checkout():
    offenders = []
    for path in sorted(_TESTS.rglob("*.py")):
        if path.name == pathlib.Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders

"""Issue 11 (a): PEFT's own save/load tests on the patched PEFT: no new failures against the unpatched outcomes.

    python tests/upstream/peft_tests.py run SRC OUT.tsv               # run SRC's selection with this interpreter
    python tests/upstream/peft_tests.py compare UNPATCHED.tsv PATCHED.tsv [--record FILE]

``run`` takes the selection of ``tests/integrations/peft_suite.py`` (its FILES and -k SELECT, offline, no network)
from the unpacked PEFT sdist SRC and records every test's outcome on the PEFT this interpreter imports, in the TSV
format ``nox -s peft_suite`` records (nodeid, outcome, outcome): so that record of the stock outcomes can serve as
UNPATCHED. ``compare`` exits 1 when a test that passed (or was skipped) unpatched does not patched, when a test the
series adds (absent unpatched) fails, or when none of those passes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

GOOD = ("passed", "skipped")


def _peft_suite():
    """tests/integrations/peft_suite.py, imported only when used (the default test run imports this file too)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
    import peft_suite

    return peft_suite


def read_outcomes(path: Path) -> dict[str, str]:
    """nodeid -> outcome from the second column of a peft_suite-style TSV (the stock run's)."""
    rows = (line.split("\t") for line in path.read_text().splitlines() if line)
    return {row[0]: row[1] for row in rows}


def run(src: Path, out: Path) -> int:
    import peft

    peft_suite = _peft_suite()
    # run_suite labels its line "stock PEFT" (its run without peft_buffers): say which PEFT that is here
    print(f"PEFT's tests from {src} on the peft imported from {Path(peft.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        peft_suite.run_suite(src, False, report)
        result = peft_suite.outcomes(report)
    out.write_text("".join(f"{k}\t{v}\t{v}\n" for k, v in sorted(result.items())))
    print(f"{len(result)} outcomes of {src} recorded in {out}: {dict(Counter(result.values()))}")
    return 0 if result else 1


def compare(unpatched_tsv: Path, patched_tsv: Path, record: Path | None) -> int:
    peft_suite = _peft_suite()
    unpatched, patched = read_outcomes(unpatched_tsv), read_outcomes(patched_tsv)
    worse = sorted(k for k, v in unpatched.items() if v in GOOD and patched.get(k) not in GOOD)
    added = sorted(set(patched) - set(unpatched))
    added_bad = [k for k in added if patched[k] not in GOOD]  # a skip is fine: e.g. tests only for the MLP rows
    better = sorted(k for k, v in unpatched.items() if v not in GOOD and patched.get(k) in GOOD)
    print(f"PEFT's save/load selection ({', '.join(peft_suite.FILES)}; -k '{peft_suite.SELECT}'):")
    for outcome in sorted(set(unpatched.values()) | set(patched.values())):
        print(f"  {outcome:24} unpatched {Counter(unpatched.values())[outcome]:5}   "
              f"patched {Counter(patched.values())[outcome]:5}")
    added_counts = dict(Counter(patched[k] for k in added))
    print(f"  tests the series adds: {len(added)}: {added_counts}")
    for name in worse:
        print(f"  NEW FAILURE: {name}: unpatched {unpatched[name]}, patched {patched.get(name, 'missing')}")
    for name in added_bad:
        print(f"  ADDED TEST DOES NOT PASS: {name}: {patched[name]}")
    for name in better:
        print(f"  now passes: {name}: unpatched {unpatched[name]}")
    if record:
        record.write_text("".join(f"{k}\t{unpatched.get(k, 'absent')}\t{patched.get(k, 'absent')}\n"
                                  for k in sorted(unpatched.keys() | patched.keys())))
    print(f"{len(worse)} new failure(s), {len(added_bad)} added test(s) not passing")
    return 1 if worse or added_bad or not added_counts.get("passed") else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="record the outcomes of SRC's selection on the imported PEFT")
    run_parser.add_argument("src", type=Path)
    run_parser.add_argument("out", type=Path)
    compare_parser = commands.add_parser("compare", help="no new failures, every added test passes")
    compare_parser.add_argument("unpatched", type=Path)
    compare_parser.add_argument("patched", type=Path)
    compare_parser.add_argument("--record", type=Path, help="nodeid, unpatched and patched outcome (TSV)")
    args = parser.parse_args()
    if args.command == "run":
        return run(args.src, args.out)
    return compare(args.unpatched, args.patched, args.record)


if __name__ == "__main__":
    sys.exit(main())

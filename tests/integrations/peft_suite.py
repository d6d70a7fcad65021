"""Run PEFT's own save/load tests twice, on stock PEFT and with ``peft_buffers.enable()``, and compare.

    python tests/integrations/peft_suite.py [--src DIR] [--record FILE]

Takes the tests from PEFT's sdist for the installed release (``pip download --no-binary :all: --no-deps
peft==VERSION``; ``--src`` to use an unpacked one), runs the save/load subset (``FILES``, ``SELECT``) with
``HF_HUB_OFFLINE=1`` once without and once with peft_buffers, and exits 1 unless every test has the same
outcome in both runs. Tests that need the hub fail offline in both runs: they are counted apart.
Used by ``nox -s peft_suite``; this file is also the pytest plugin (``-p peft_suite``) that enables the patch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Optional

FILES = ("tests/test_custom_models.py", "tests/test_low_level_api.py", "tests/test_other.py",
         "tests/test_initialization.py", "tests/test_mixed.py", "tests/test_trainable_tokens.py")
SELECT = "save or load or state_dict or pretrained or roundtrip"
ENABLE = "PEFT_BUFFERS_SUITE_ENABLE"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_ETAG_TIMEOUT": "1",
           "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
NO_NETWORK = "peft_suite: no network"
HUB_ERRORS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "offline mode", "HF_HUB_OFFLINE",
              "ConnectError", "couldn't connect", NO_NETWORK)


# ------------------------------------------------------------------------------------ the pytest plugin


def pytest_configure(config) -> None:
    _refuse_network()
    if os.environ.get(ENABLE) == "1":
        import peft_buffers

        peft_buffers.enable()


def _refuse_network() -> None:
    """Fail every name lookup at once: tests that need the hub then fail fast (in both runs alike) instead of
    waiting on DNS timeouts and retries, which HF_HUB_OFFLINE does not stop everywhere."""
    import socket

    def getaddrinfo(host, *args, **kwargs):
        raise OSError(f"{NO_NETWORK}: {host}")

    socket.getaddrinfo = getaddrinfo
    try:  # and no exponential back-off between the retries huggingface_hub makes in spite of HF_HUB_OFFLINE
        from huggingface_hub.utils import _http
    except ImportError:
        return

    class NoSleep:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            pass

    _http.time = NoSleep()


def pytest_sessionfinish(session, exitstatus) -> None:
    if os.environ.get(ENABLE) == "1":
        import peft_buffers

        # A test that disabled the patch would make the second run meaningless: say so loudly.
        print(f"\npeft_buffers enabled at the end of the run: {peft_buffers.is_enabled()}")


# ------------------------------------------------------------------------------------------- the runner


def peft_sources(workdir: Path) -> Path:
    release = version("peft")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                    f"peft=={release}", "-d", str(workdir)], check=True)
    with tarfile.open(workdir / f"peft-{release}.tar.gz") as archive:
        archive.extractall(workdir)  # noqa: S202 - PyPI's sdist of the installed release
    return workdir / f"peft-{release}"


def run_suite(src: Path, enabled: bool, report: Path, baseline: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Run the selection once; print pytest's summary line, saying which failures need the hub; return outcomes.

    With ``baseline`` (the stock run's outcomes) the summary also says whether the same tests failed there.
    """
    (src / "tests" / "__init__.py").touch()  # the sdist ships the tests without it; they import relatively
    # peft_buffers through a folder that holds only it: the repository root would bring a second `tests`.
    shim = report.parent / "shim"
    if not shim.exists():
        shim.mkdir()
        (shim / "peft_buffers").symlink_to(Path(__file__).resolve().parents[2] / "peft_buffers")
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", ENABLE: "1" if enabled else "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(shim)])}
    command = [sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", str(src), "-p", "no:cacheprovider",
               "-p", "peft_suite", "-q", "-k", SELECT, f"--junitxml={report}", "-W", "ignore::DeprecationWarning",
               *[str(src / f) for f in FILES]]
    print(("with peft_buffers: " if enabled else "stock PEFT: ") + " ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=src, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1) or not report.exists():  # 2: collection errors, 5: no test ran, ...
        sys.exit(f"pytest exited {done.returncode}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    found = outcomes(report)
    lines = done.stdout.splitlines()[-3:]
    if lines:
        lines[-1] += _failures_note(found, baseline)
    print("\n".join(lines), flush=True)
    return found


def _failures_note(found: dict[str, str], baseline: Optional[dict[str, str]]) -> str:
    """What pytest's "N failed, M errors" are: tests that need the hub (offline here), or others."""
    failing = {name for name, outcome in found.items() if outcome.startswith("failed")}
    if not failing:
        return ""
    hub = sum(found[name] == "failed (needs the hub)" for name in failing)
    note = (f"  <- failed + errors: {hub} of {len(failing)} need the hub (offline here)"
            + (f", {len(failing) - hub} for another reason" if hub < len(failing) else ""))
    if baseline is not None:
        same = failing == {name for name, outcome in baseline.items() if outcome.startswith("failed")}
        note += "; the same tests as on stock PEFT" if same else "; NOT the same tests as on stock PEFT"
    return note


def outcomes(report: Path) -> dict[str, str]:
    """nodeid -> passed / failed / failed (hub) / skipped, from a junit XML report."""
    result = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is not None:
            text = (problem.get("message") or "") + (problem.text or "")
            result[name] = "failed (needs the hub)" if any(e in text for e in HUB_ERRORS) else "failed"
        elif case.find("skipped") is not None:
            result[name] = "skipped"
        else:
            result[name] = "passed"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, help="an unpacked PEFT sdist (default: download the installed one)")
    parser.add_argument("--record", type=Path, help="write every test and its outcome here (TSV)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = args.src or peft_sources(work)
        stock = run_suite(src, False, work / "stock.xml")
        ours = run_suite(src, True, work / "ours.xml", baseline=stock)
    differ = sorted(k for k in stock.keys() | ours.keys() if stock.get(k) != ours.get(k))
    print(f"PEFT {version('peft')}: {len(stock)} tests from {', '.join(FILES)} selected by -k '{SELECT}'")
    for outcome, count in sorted(Counter(stock.values()).items()):
        print(f"  {outcome:24} stock {count:5}   with peft_buffers {Counter(ours.values())[outcome]:5}")
    for name in differ:
        print(f"  DIFFERS: {name}: stock {stock.get(name)}, with peft_buffers {ours.get(name)}")
    if args.record:
        args.record.write_text("".join(f"{k}\t{stock.get(k)}\t{ours.get(k)}\n" for k in sorted(stock | ours)))
    print(f"{len(stock) - len(differ)} identical, {len(differ)} differ")
    return 1 if differ or not stock else 0


if __name__ == "__main__":
    sys.exit(main())

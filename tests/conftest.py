import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run the slow matrices")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower matrices, run with --runslow")
    # pyproject.toml makes every PeftBuffersWarning an error. A PEFT release newer than the one CI tests (what
    # `nox -s newest` may resolve) makes every enable() warn once, as it should: that one warning is expected.
    from peft_buffers.binding import versions

    installed = versions.installed_peft_version()
    entry, untested = versions.select_entry(installed, allow_untested=True)
    if untested and installed > versions.Version(entry.tested):
        config.addinivalue_line(
            "filterwarnings", f"ignore:peft {re.escape(str(installed))} is newer than :peft_buffers.PeftBuffersWarning")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow matrix: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _each_test_starts_and_ends_disabled():
    """No test sees another test's enable(): the patch is process-global."""
    import peft_buffers

    peft_buffers.disable()
    yield
    peft_buffers.disable()


@pytest.fixture
def enabled():
    """peft_buffers enabled for the test, disabled afterwards whatever happens."""
    import peft_buffers

    peft_buffers.enable()
    try:
        yield peft_buffers
    finally:
        peft_buffers.disable()


@pytest.fixture
def stock():
    """Stock PEFT: peft_buffers disabled for the test."""
    import peft_buffers

    peft_buffers.disable()
    yield
    peft_buffers.disable()

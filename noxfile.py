"""Compatibility matrix: the behaviour tests on every PEFT release line in the registry, one venv per line.

    nox -s compat                     # every line (0.6 ... 0.22), sequentially
    nox -s "compat(0.13)"             # one line
    nox -s compat -- tests/test_save_load.py -x    # other pytest arguments (default: tests)

Each session runs ``python -m peft_buffers doctor --deep --strict`` (the registry entry matches this PEFT:
every binding site patched, none missed) and then pytest on ``tests/`` (skips name what a line lacks).

A fresh venv with torch costs ~33 s, so torch==2.13.0, the line's transformers pin and the test tools are
installed once per transformers pin into a shared base venv under ``.nox/_base/``; each line's own venv
holds only its PEFT release (``--no-deps``, then ``pip check``) and sees the base through a ``.pth`` file.
A line venv's own packages come first on ``sys.path``, so its PEFT shadows anything in the base.
The lines, their tested releases and transformers pins are read from ``peft_buffers/binding/registry.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"
ACCELERATE = "accelerate==1.15.0"
TEST_TOOLS = ("pytest>=7", "hypothesis>=6", "safetensors>=0.3.1", "packaging>=20.0")

nox.options.sessions = ["compat"]
nox.options.reuse_existing_virtualenvs = True


def _load_registry():
    # Load the registry without its package: `import peft_buffers` would import torch, which nox's own env lacks.
    # A stand-in package lets its relative import of the data module beside it (binding/_api_table.py) resolve.
    import types

    folder = ROOT / "peft_buffers" / "binding"
    package = types.ModuleType("_peft_buffers_binding")
    package.__path__ = [str(folder)]
    sys.modules[package.__name__] = package
    spec = importlib.util.spec_from_file_location(f"{package.__name__}.registry", folder / "registry.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the classes
    spec.loader.exec_module(module)
    return module.REGISTRY


REGISTRY = {entry.line: entry for entry in _load_registry()}


def _shared_base(session: nox.Session, transformers: str) -> Path:
    """The site-packages of a venv with torch, ``transformers`` and the test tools, built once per pin."""
    requirements = [TORCH, f"transformers=={transformers}", ACCELERATE, *TEST_TOOLS]
    base = ROOT / ".nox" / "_base" / f"transformers-{transformers}"
    python = base / "bin" / "python"
    stamp = base / "requirements.txt"
    if not (stamp.exists() and stamp.read_text() == "\n".join(requirements)):
        session.log(f"building the shared base {base.name} (once): {' '.join(requirements)}")
        session.run(sys.executable, "-m", "virtualenv", "-q", "--clear", str(base), external=True)
        session.run(str(python), "-m", "pip", "install", "-q", *requirements, external=True)
        stamp.write_text("\n".join(requirements))
    purelib = session.run(
        str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", external=True, silent=True
    )
    return Path(purelib.strip())


def _link_base(session: nox.Session, site_packages: Path) -> None:
    purelib = session.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True)
    (Path(purelib.strip()) / "_peft_buffers_shared_base.pth").write_text(f"{site_packages}\n")


@nox.session
@nox.parametrize("line", [nox.param(line, id=line) for line in REGISTRY])
def compat(session: nox.Session, line: str) -> None:
    """doctor --deep --strict, then the behaviour tests, on this PEFT line's tested release."""
    entry = REGISTRY[line]
    _link_base(session, _shared_base(session, entry.transformers))
    session.install("--no-deps", f"peft=={entry.tested}")
    session.run("python", "-m", "pip", "check")  # the line's own requirements hold against the shared base
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    session.run("python", "-m", "peft_buffers", "doctor", "--deep", "--strict", env=env)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *(session.posargs or ["tests"]), env=env)


# --- the install a user gets today ---
#     nox -s newest     # `pip install .` with the newest peft / transformers / accelerate / safetensors pip resolves
# The compat sessions test each line's pinned pair; this one tests what a fresh install resolves now, built from
# this checkout as a wheel (not editable), torch pinned (an unpinned torch pulls a multi-GB CUDA build). It runs
# `doctor --deep` (not --strict: a release newer than the registry's tested pair is a note, and the version
# policy in binding/_versions.py decides whether it is used) and the default test suite against the installed
# package. A newer release that breaks a behaviour fails the suite; one that merely appeared does not.
NEWEST_UPGRADED = ("peft", "transformers", "accelerate", "safetensors")


@nox.session
def newest(session: nox.Session) -> None:
    """doctor --deep and the default suite on the newest releases a fresh `pip install .` resolves."""
    constraints = Path(session.create_tmp()) / "constraints.txt"
    constraints.write_text(f"{TORCH}\n")
    # --upgrade-strategy eager: a reused venv also moves to today's releases; the constraint keeps torch.
    session.install("-c", str(constraints), "--upgrade", "--upgrade-strategy", "eager", f"{ROOT}[test]",
                    *NEWEST_UPGRADED)
    session.install("--no-deps", "--force-reinstall", str(ROOT))  # this checkout's code, as a wheel
    session.run("python", "-m", "pip", "check")
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    outside = session.create_tmp()  # run from here: `python -m` puts the working directory first on sys.path
    with session.chdir(outside):
        session.run("python", "-c", "import peft_buffers; print('peft_buffers imported from', peft_buffers.__file__)")
        session.run("python", "-m", "peft_buffers", "doctor", "--deep", env=env)
    # The suite from the checkout against the installed package: the pytest script (no working directory on
    # sys.path) and --import-mode=append (the checkout after site-packages); the package's doctests ran in CI.
    session.run("pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append", *(session.posargs or ["tests"]),
                env=env)


# --- integration sessions (issue 6) ---
# Integration paths (tests/integrations): each session reuses the shared base venvs above and the newest line's
# tested PEFT release with its transformers pin.
#     nox -s transformers_native      # model.add_adapter / load_adapter / set_adapter: 5.25 + 0.22, 5.23 + 0.21, 4.57
#     nox -s distributed              # accelerate DDP and torch FSDP2, 2 processes each on gloo (CPU)
#     nox -s peft_suite               # PEFT's own save/load tests, stock vs peft_buffers.enable(): same outcomes
NEWEST = REGISTRY[list(REGISTRY)[-1]]
INTEGRATION_PEFT = NEWEST.tested
INTEGRATION_TRANSFORMERS = NEWEST.transformers
# (transformers, peft) pairs: 5.24 and later want PEFT >= 0.22 for their own adapter methods, 5.23 the older lines.
NATIVE_PAIRS = ((INTEGRATION_TRANSFORMERS, INTEGRATION_PEFT), ("5.23.0", "0.21.2"), ("4.57.6", INTEGRATION_PEFT))
# Test-only needs of PEFT's own test files (imported at module level by tests/testing_common.py & co.;
# scikit-learn: AdaMSS; attrs: peft.tuners.lora.corda imports it without declaring it).
PEFT_SUITE_TOOLS = ("diffusers==0.42.1", "datasets==5.2.0", "scipy==1.17.1", "parameterized==0.9.0",
                    "scikit-learn==1.9.1", "attrs==26.1.0")
INTEGRATION_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONPATH": str(ROOT)}


def _integration_venv(session: nox.Session, transformers: str = INTEGRATION_TRANSFORMERS,
                      peft: str = INTEGRATION_PEFT) -> None:
    _link_base(session, _shared_base(session, transformers))
    session.install("--no-deps", f"peft=={peft}")


@nox.session
@nox.parametrize("transformers,peft", [nox.param(t, p, id=f"{t.rsplit('.', 1)[0]}+peft{p.rsplit('.', 1)[0]}")
                                       for t, p in NATIVE_PAIRS])
def transformers_native(session: nox.Session, transformers: str, peft: str) -> None:
    """transformers-native adapters keep per-adapter extra state (issue 6)."""
    _integration_venv(session, transformers, peft)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                *(session.posargs or ["tests/integrations/test_transformers_native.py"]), env=INTEGRATION_ENV)


@nox.session
def distributed(session: nox.Session) -> None:
    """accelerate DDP (accelerate launch) and FSDP2 (torchrun), 2 CPU processes on gloo (issue 6)."""
    _integration_venv(session)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--runslow",
                *(session.posargs or ["tests/integrations/test_distributed.py"]), env=INTEGRATION_ENV)


@nox.session
def peft_suite(session: nox.Session) -> None:
    """PEFT's save/load tests from the newest line's sdist, stock and with peft_buffers: identical outcomes."""
    _integration_venv(session)
    session.install(*PEFT_SUITE_TOOLS)
    session.run("python", "tests/integrations/peft_suite.py", "--record", str(ROOT / ".nox" / "peft_suite.tsv"),
                *session.posargs, env=INTEGRATION_ENV)


# --- real vision models (issue 9) ---
# The table of torchvision and timm models in tests/vision/models.py (docs/model-zoo.md), each trained two
# steps, saved, reloaded bitwise, and shown to differ with stock PEFT; plus two adapters trained one after
# the other and training through timm's forward_features. Its own venv: the README's stack stays on torch 2.13.
#     nox -s vision                    # ~3 min to build the venv once (torch 2.14.1 is ~5.5 GB), ~1 min of tests
#     nox -s vision -- -k timm -x      # other pytest arguments (default: tests/vision)
VISION_STACK = ("torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31", f"peft=={INTEGRATION_PEFT}",
                f"transformers=={INTEGRATION_TRANSFORMERS}", ACCELERATE, "safetensors==0.8.0",
                "packaging==26.4", "pytest==9.2.0", "hypothesis==6.170.17")


@nox.session
def vision(session: nox.Session) -> None:
    """Real torchvision/timm models trained, saved and reloaded bitwise; stock PEFT differs (issue 9)."""
    session.install(*VISION_STACK)
    session.run("python", "-m", "pip", "check")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                *(session.posargs or ["tests/vision"]), env=INTEGRATION_ENV)


# --- TRL (issue 12) ---
#     nox -s trl                      # SFTTrainer(peft_config=...): save_model + reload bitwise, audit of train()
# TRL's newest release with the newest line's PEFT and transformers (its shared base, so no new torch venv).
TRL_TOOLS = ("trl==1.16.0", "datasets==5.2.0")


@nox.session
def trl(session: nox.Session) -> None:
    """TRL SFTTrainer with peft_config keeps a trained direct parameter through save_model (issue 12)."""
    _integration_venv(session)
    session.install(*TRL_TOOLS)
    session.run("python", "-m", "pip", "check")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                *(session.posargs or ["tests/integrations/test_trl.py"]), env=INTEGRATION_ENV)


# --- pinned-version deployments (issue 12) ---
#     nox -s config_fields    # regenerate peft_buffers/binding/_config_fields.py from every line's tested release
#     nox -s crossversion     # files saved on each line load bitwise on every other line (convert where needed)
# Both reuse the compat venvs (.nox/compat-<line>, e.g. .nox/compat-0-13) and build what is missing the same way,
# then run one process per line and step, not one per pair (a process start with torch costs seconds).
CROSSVERSION_DIR = ROOT / ".nox" / "crossversion"


def _line_python(session: nox.Session, line: str) -> str:
    """The python of line's compat venv (nox names it `compat-<line>`), built as `compat` builds it if missing."""
    entry = REGISTRY[line]
    venv = ROOT / ".nox" / ("compat-" + line.replace(".", "-"))
    python = venv / "bin" / "python"
    base = _shared_base(session, entry.transformers)
    probe = "import importlib.metadata as m; print(m.version('peft'))"
    if python.exists():
        installed = session.run(str(python), "-c", probe, external=True, silent=True, success_codes=[0, 1])
        if installed and installed.strip().splitlines()[-1] == entry.tested:
            return str(python)
    session.log(f"building {venv.name} (peft=={entry.tested}, shared base {base.parent.parent.parent.name})")
    session.run(sys.executable, "-m", "virtualenv", "-q", "--clear", str(venv), external=True)
    session.run(str(python), "-m", "pip", "install", "-q", "--no-deps", f"peft=={entry.tested}", external=True)
    purelib = session.run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                          external=True, silent=True)
    (Path(purelib.strip()) / "_peft_buffers_shared_base.pth").write_text(f"{base}\n")
    session.run(str(python), "-m", "pip", "check", external=True, silent=True)
    return str(python)


@nox.session(python=False)
def config_fields(session: nox.Session) -> None:
    """Regenerate peft_buffers/binding/_config_fields.py: each config class's fields per line's tested release."""
    dumps = CROSSVERSION_DIR / "config_fields"
    dumps.mkdir(parents=True, exist_ok=True)
    for line in REGISTRY:
        session.run(_line_python(session, line), "-m", "peft_buffers.cli._fieldscan", "--dump",
                    str(dumps / f"{line}.json"), external=True, env=INTEGRATION_ENV)
    newest = _line_python(session, list(REGISTRY)[-1])
    session.run(newest, "-m", "peft_buffers.cli._fieldscan", "--write", str(dumps), external=True, env=INTEGRATION_ENV)


@nox.session(python=False)
def crossversion(session: nox.Session) -> None:
    """Files saved on each line's tested release load bitwise on every other line (`convert` where needed).

    ``nox -s crossversion -- 0.6 0.13 0.21`` runs only those lines.
    """
    import json

    lines = session.posargs or list(REGISTRY)
    pythons = {line: _line_python(session, line) for line in lines}
    env = {**INTEGRATION_ENV, "PEFT_BUFFERS_CROSSVERSION": json.dumps(pythons)}
    session.run(pythons[max(lines, key=lambda line: tuple(map(int, line.split("."))))], "-m", "pytest", "-q", "-s",
                "-p", "no:cacheprovider", "tests/crossversion", external=True, env=env)


# --- upstream patch series (issue 11) ---
#     nox -s upstream     # the newest line's PEFT sdist + patches/peft-v<that release> in its own venv, then
#       (a) PEFT's own save/load selection (peft_suite's FILES/SELECT) plus the series' tests: no new failures vs the
#           unpatched outcomes (.nox/peft_suite.tsv from `nox -s peft_suite` when present, else run here);
#       (b) tests/upstream: the behaviour scenarios with PEFT's own fields, bitwise equal to peft_buffers';
#       (c) tests/upstream/cross_check.py: files written by the patched PEFT load with stock PEFT + peft_buffers
#           and the other way round, bitwise.
UPSTREAM_PATCHES = ROOT / "patches" / f"peft-v{INTEGRATION_PEFT}"
UPSTREAM_TRANSFORMERS = INTEGRATION_TRANSFORMERS  # the pin peft_suite uses: one shared base for both sessions


def _unpacked_sdist(session: nox.Session, work: Path) -> Path:
    """PEFT's sdist of INTEGRATION_PEFT, downloaded once into .nox/_downloads, unpacked fresh under ``work``."""
    import tarfile

    downloads = ROOT / ".nox" / "_downloads"
    archive = downloads / f"peft-{INTEGRATION_PEFT}.tar.gz"
    if not archive.exists():
        session.run("python", "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"peft=={INTEGRATION_PEFT}", "-d", str(downloads))
    with tarfile.open(archive) as tar:
        tar.extractall(work)  # noqa: S202 - PyPI's sdist of a pinned release
    return work / f"peft-{INTEGRATION_PEFT}"


def _purelib(session: nox.Session, python: str = "python") -> Path:
    purelib = session.run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                          external=python != "python", silent=True)
    return Path(purelib.strip())


def _stock_venv(session: nox.Session, base_site: Path, session_site: Path) -> Path:
    """A second venv next to the session's with stock PEFT: the other side of the cross-check, and the unpatched run.

    It sees the shared base and the session venv's packages (PEFT's test tools) through a ``.pth`` file; its own
    stock PEFT comes first on ``sys.path`` and so shadows the session's patched one.
    """
    venv = ROOT / ".nox" / "_upstream_stock"
    python = venv / "bin" / "python"
    if not python.exists():
        session.run(sys.executable, "-m", "virtualenv", "-q", str(venv), external=True)
    own_site = _purelib(session, str(python))
    # --ignore-installed: the patched PEFT, visible through the .pth file, has the same version number
    session.run(str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                f"peft=={INTEGRATION_PEFT}", external=True)
    (own_site / "_peft_buffers_shared_base.pth").write_text(f"{base_site}\n{session_site}\n")
    session.run(str(python), "-c", "import dataclasses, peft; fields = dataclasses.fields(peft.PeftConfig); "
                "assert 'save_running_stats' not in {f.name for f in fields}, peft.__file__", external=True)
    return python


@nox.session
def upstream(session: nox.Session) -> None:
    """PEFT + patches/peft-v<release>: PEFT's save/load tests, the scenarios without peft_buffers, cross-check."""
    import shutil
    import tempfile

    base_site = _shared_base(session, UPSTREAM_TRANSFORMERS)
    _link_base(session, base_site)
    session.install(*PEFT_SUITE_TOOLS)
    # Outside the repository: `git apply` inside a work tree would resolve the paths against its top level.
    work = Path(tempfile.mkdtemp(prefix="peft-upstream-"))
    try:
        unpatched = _unpacked_sdist(session, work / "unpatched")
        patched = _unpacked_sdist(session, work / "patched")
        patches = sorted(str(p) for p in UPSTREAM_PATCHES.glob("*.patch"))
        session.run("git", "-C", str(patched), "apply", "--check", *patches, external=True)
        session.run("git", "-C", str(patched), "apply", *patches, external=True)
        session.install("--no-deps", "--force-reinstall", str(patched))
        env = INTEGRATION_ENV
        session.run("python", "-c", "from peft_buffers.binding import peft_has_native_fields as has; "
                    "assert has(), 'the installed PEFT lacks the fields: the series did not install'", env=env)
        stock = str(_stock_venv(session, base_site, _purelib(session)))
        # (a) PEFT's own tests on the patched PEFT, compared with the unpatched outcomes: peft_suite's record of the
        # stock run when there is one (CI runs peft_suite first), else this session's own record of a run of the
        # unpatched sources on stock PEFT, made once (delete .nox/upstream_unpatched.tsv to make it again)
        reference = ROOT / ".nox" / "peft_suite.tsv"
        if not reference.exists():
            reference = ROOT / ".nox" / "upstream_unpatched.tsv"
        if not reference.exists():
            session.run(stock, "tests/upstream/peft_tests.py", "run", str(unpatched), str(reference), env=env,
                        external=True)
        session.log(f"unpatched outcomes: {reference}")
        session.run("python", "tests/upstream/peft_tests.py", "run", str(patched), str(work / "patched.tsv"), env=env)
        session.run("python", "tests/upstream/peft_tests.py", "compare", str(reference), str(work / "patched.tsv"),
                    "--record", str(ROOT / ".nox" / "upstream_peft_tests.tsv"), env=env)
        # (b) the behaviour scenarios with PEFT's own fields, peft_buffers disabled, bitwise vs peft_buffers
        session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/upstream", env=env)
        # (c) files cross between the patched PEFT and stock PEFT + peft_buffers.enable()
        cross = work / "cross"
        session.run("python", "tests/upstream/cross_check.py", "write", "native", str(cross / "native"), env=env)
        session.run(stock, "tests/upstream/cross_check.py", "write", "peft_buffers", str(cross / "peft_buffers"),
                    env=env, external=True)
        session.run("python", "tests/upstream/cross_check.py", "read", "native", str(cross / "peft_buffers"), env=env)
        session.run(stock, "tests/upstream/cross_check.py", "read", "peft_buffers", str(cross / "native"), env=env,
                    external=True)
        session.run("python", "-m", "peft_buffers", "doctor", env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)

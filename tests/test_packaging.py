"""Packaging: the distribution's name, its dependencies, and every install line a user is shown."""
import pathlib
import re

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIST = "fastlora-kernels"  # `fastlora` on PyPI is an unrelated project


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_distribution_is_not_pypis_fastlora():
    meta = project()
    assert meta["name"] == DIST
    self_refs = [req for reqs in meta["optional-dependencies"].values() for req in reqs
                 if re.match(r"fastlora\b", req)]
    assert self_refs and all(req.startswith(DIST + "[") for req in self_refs), self_refs


def test_no_install_line_names_a_pypi_package_called_fastlora():
    """`pip install fastlora...` would install someone else's code (or, for fastlora-kernels, which
    is not published, whatever is published under that name later): install lines say
    `pip install -e ".[extra]"` from a checkout, or name the third-party package itself."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "fastlora").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.*"))]
    pattern = re.compile(r"pip install(?:\s+-\S+)*\s+['\"]?fastlora")
    found = [f"{f.relative_to(ROOT)}: {m.group(0)!r}" for f in files if f.is_file()
             for m in pattern.finditer(f.read_text(errors="replace"))]
    assert not found, found


def test_triton_is_not_a_base_dependency():
    """The CPU path never needs triton (a ~290 MB wheel); CUDA builds of torch bring it, and the
    test extra installs it for the interpreter tests."""
    meta = project()
    assert not [d for d in meta["dependencies"] if re.match(r"triton\b", d)]
    assert [d for d in meta["optional-dependencies"]["test"] if re.match(r"triton\b", d)]


def test_the_version_has_one_source():
    """pyproject takes the version from fastlora/__init__.py, and the installed metadata agrees."""
    import importlib.metadata

    import fastlora
    meta = project()
    assert "version" not in meta and "version" in meta["dynamic"]
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert tool["version"] == {"attr": "fastlora.__version__"}
    assert importlib.metadata.version(DIST) == fastlora.__version__


@pytest.mark.slow  # a fresh interpreter (~1.5 s of imports)
def test_bitsandbytes_is_an_optional_extra_and_never_imported_by_fastlora():
    """4-bit weights are read without bitsandbytes; it is the ``qlora`` extra (tests compare with it)."""
    import subprocess
    import sys

    meta = project()
    assert not [d for d in meta["dependencies"] if re.match(r"bitsandbytes\b", d)]
    assert [d for d in meta["optional-dependencies"]["qlora"] if re.match(r"bitsandbytes\b", d)]
    code = ("import sys, torch, fastlora, fastlora.quant4bit as q\n"
            "w = q.quantize(torch.randn(4, 64), 'nf4', 64)\n"
            "assert w.dequantize().shape == (4, 64)\n"
            "assert 'bitsandbytes' not in sys.modules, 'fastlora imported bitsandbytes'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-2000:]

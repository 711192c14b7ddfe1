"""The extension's contract: no libtorch, kernels shipped inside the package, CUDA optional."""

import importlib.util
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sppo_fast
from sppo_fast import _native


def test_extension_does_not_link_libtorch():
    if platform.system() != "Linux" or shutil.which("ldd") is None:
        pytest.skip("ldd check is Linux-only")
    deps = subprocess.run(["ldd", _native._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in deps and "libc10" not in deps, deps


def test_triton_sources_ship_inside_the_package():
    import sppo_fast.kernels as k

    assert Path(k.__file__).name == "__init__.py"
    # no top-level module named `kernels` is installed next to sppo_fast
    site = Path(sppo_fast.__file__).resolve().parent.parent
    assert not (site / "kernels").exists() or (site / "sppo_fast").exists() and (site / "pyproject.toml").exists()


def test_cpu_isa_dispatch():
    assert sppo_fast.cpu_isa() in ("base", "avx2", "avx512")
    with pytest.raises(ValueError, match="isa: 'sse9' is unknown"):
        sppo_fast.set_cpu_isa("sse9")


def test_cuda_backend_reports_why():
    compiled, count, why = _native.cuda_status()
    if count:
        pytest.skip("a CUDA device is present")
    assert isinstance(compiled, bool)
    assert why  # a reason, e.g. built without CUDA, or no driver / device
    from sppo_fast.ops import _cuda_backend_problem

    assert ("no CUDA device" in _cuda_backend_problem()) or ("without CUDA" in _cuda_backend_problem())


def test_auto_backend_on_cpu_is_cpp():
    assert sppo_fast.resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert sppo_fast.available_backends("cpu") == ["cpp", "reference"]

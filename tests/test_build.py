"""The extension's contract: no libtorch, kernels shipped inside the package, CUDA optional."""

import importlib.util
import platform
import shutil
import subprocess
import sys
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
    import importlib.metadata

    import sppo_fast.kernels as k

    assert k.__name__ == "sppo_fast.kernels" and Path(k.__file__).name == "__init__.py"
    # nothing of the distribution is installed as a top-level `kernels` package
    files = importlib.metadata.files("sppo-fast") or []
    assert not [f for f in files if str(f).split("/")[0] == "kernels"]


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
    """cpp first; triton only under Triton's interpreter (the tests run there) and last; on a
    machine without CUDA, nothing runs on "cuda" (the list said triton and reference)."""
    import os

    assert sppo_fast.resolve_backend("auto", torch.device("cpu")) == "cpp"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert sppo_fast.available_backends("cpu") == ["cpp", "reference"] + (["triton"] if interpreted else [])
    if not torch.cuda.is_available():
        assert sppo_fast.available_backends("cuda") == []
        with pytest.raises(sppo_fast.BackendUnavailableError, match="no CUDA device is available"):
            sppo_fast.resolve_backend("auto", torch.device("cuda"))


# ---- the SPPO_FAST_CUDA option, configured and built with CMake directly -------------------------
def _cmake(tmp_path, *defs, path_env="/usr/bin:/bin"):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    import os

    import pybind11

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PATH=path_env)  # a PATH without nvcc
    env.pop("SPPO_FAST_CUDA", None)
    env.pop("CUDACXX", None)
    cmd = [cmake, "-S", str(root), "-B", str(tmp_path / "build"), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
           f"-DPython_EXECUTABLE={sys.executable}", *defs]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _skip_if_cmake_finds_nvcc(tmp_path):
    r = _cmake(tmp_path / "probe", "-DSPPO_FAST_CUDA=AUTO")
    if "CUDA backend ON" in r.stdout:
        pytest.skip("CMake finds nvcc even without it on PATH (e.g. in /usr/local/cuda/bin)")
    return r


def test_cuda_on_without_nvcc_fails_loudly(tmp_path):
    _skip_if_cmake_finds_nvcc(tmp_path)
    r = _cmake(tmp_path, "-DSPPO_FAST_CUDA=ON")
    assert r.returncode != 0
    assert "SPPO_FAST_CUDA=ON but no CUDA compiler (nvcc) was found" in r.stderr


def test_cuda_option_rejects_unknown_values(tmp_path):
    r = _cmake(tmp_path, "-DSPPO_FAST_CUDA=sometimes")
    assert r.returncode != 0 and "SPPO_FAST_CUDA must be AUTO, ON or OFF" in r.stderr


@pytest.mark.slow
def test_cpu_only_build_imports_and_explains(tmp_path):
    """AUTO without nvcc builds the CPU-only extension; its CUDA backend says it was built without."""
    _skip_if_cmake_finds_nvcc(tmp_path)
    r = _cmake(tmp_path, "-DSPPO_FAST_CUDA=AUTO", "-DCMAKE_BUILD_TYPE=Release")
    assert r.returncode == 0, r.stderr
    assert "CUDA backend OFF" in r.stdout
    b = subprocess.run([shutil.which("cmake"), "--build", str(tmp_path / "build"), "-j", "2"], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    so = next((tmp_path / "build").glob("_C*.so"))
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('_C', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.cuda_compiled(), m.cuda_device_count()[1])")
    out = subprocess.run([sys.executable, "-c", code, str(so)], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False") and "built without CUDA" in out

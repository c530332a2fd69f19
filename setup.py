"""Build script: the pure-Python package always installs; the C++/CUDA whitening
extension (lowrank_engine._C) is built when a compiler is found, with the CUDA
part added only when torch is a CUDA build and nvcc is present.

A failed extension build is logged and skipped, so the package keeps working on
its PyTorch fallback (`python -c "from lowrank_engine import ops; print(ops.extension_info())"`
says which path is active). Set LOWRANK_ENGINE_NO_EXT=1 to skip the extension,
LOWRANK_ENGINE_NO_CUDA=1 to build it without its CUDA part, or
LOWRANK_ENGINE_REQUIRE_EXT=1 to turn a failed build into an error (CI does).

The extension lands next to lowrank_engine/ops.py (lowrank_engine/_C.so) for
`build_ext --inplace` and for editable installs (`pip install --no-build-isolation -e .`),
and inside the package for regular wheels; ops.py loads it with torch.ops.load_library.
"""
import os
import shutil
import sys

from setuptools import setup

EXT_NAME = "lowrank_engine._C"
CPU_SOURCES = ["csrc/whitening.cpp"]
CUDA_SOURCES = ["csrc/whitening_cuda.cu"]
HERE = os.path.dirname(os.path.abspath(__file__))

ext_modules = []
cmdclass = {}


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _log(msg):
    print(f"lowrank-engine: {msg}", file=sys.stderr)


def _nvcc_found(cuda_home):
    if cuda_home is None:
        return False
    nvcc = os.path.join(cuda_home, "bin", "nvcc.exe" if sys.platform == "win32" else "nvcc")
    return os.path.exists(nvcc) or shutil.which("nvcc") is not None


def _openmp_flags():
    """at::get_num_threads / at::in_parallel_region are inlined from ATen's OpenMP header, so the extension
    needs OpenMP."""
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; ATen's threading is then serial
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _extension():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    with_cuda = (
        torch.version.cuda is not None
        and _nvcc_found(CUDA_HOME)
        and all(os.path.exists(os.path.join(HERE, s)) for s in CUDA_SOURCES)
        and not _env_flag("LOWRANK_ENGINE_NO_CUDA")
    )
    omp_compile, omp_link = _openmp_flags()
    cxx_flags = (["/O2"] if sys.platform == "win32" else ["-O3"]) + omp_compile
    if with_cuda:
        ext = CUDAExtension(
            EXT_NAME,
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("LOWRANK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=omp_link,
            libraries=["cusolver"],
        )
    else:
        ext = CppExtension(EXT_NAME, CPU_SOURCES, extra_compile_args=cxx_flags, extra_link_args=omp_link)
    _log(f"building {EXT_NAME} ({'CPU+CUDA' if with_cuda else 'CPU only'}; torch {torch.__version__}, "
         f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    return ext


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    required = _env_flag("LOWRANK_ENGINE_REQUIRE_EXT")

    class OptionalBuildExtension(BuildExtension.with_options(no_python_abi_suffix=True)):
        """Builds the extension; a failure leaves the pure-PyTorch fallback working, unless
        LOWRANK_ENGINE_REQUIRE_EXT=1, when it fails the build."""

        def run(self):
            self._failed = set()
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - e.g. no compiler at all
                if required:
                    raise
                _log(f"extension build failed ({exc}); the PyTorch fallback will be used")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler or linker failure
                if required:
                    raise
                self._failed.add(ext.name)
                _log(f"building {ext.name} failed ({exc}); the PyTorch fallback will be used")

        def copy_extensions_to_source(self):
            # --inplace / editable: copy only what was really built
            kept = self.extensions
            self.extensions = [e for e in kept if e.name not in self._failed]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = kept

    return OptionalBuildExtension


if _env_flag("LOWRANK_ENGINE_NO_EXT"):
    _log("LOWRANK_ENGINE_NO_EXT=1: not building the C++ extension")
else:
    try:
        ext_modules.append(_extension())
        cmdclass["build_ext"] = _build_ext_class()
    except ImportError as exc:  # torch missing at build time: pure-Python install
        if _env_flag("LOWRANK_ENGINE_REQUIRE_EXT"):
            raise
        _log(f"torch not importable at build time ({exc}); skipping the C++ extension")

setup(ext_modules=ext_modules, cmdclass=cmdclass)

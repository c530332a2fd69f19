"""Build script: the pure-Python package always installs; the C++/CUDA whitening
extension (lowrank_engine._C) is built when a compiler is found, with the CUDA
part added only when torch is a CUDA build and nvcc is present.

A failed extension build is logged and skipped, so the package keeps working on
its PyTorch fallback. Set LOWRANK_ENGINE_NO_EXT=1 to skip it, or
LOWRANK_ENGINE_REQUIRE_EXT=1 to turn a failed build into an error.
"""
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


if not _env_flag("LOWRANK_ENGINE_NO_EXT"):
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch missing at build time: pure-Python install
        print("lowrank-engine: torch not importable at build time; skipping the C++ extension", file=sys.stderr)
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        cpu_sources = ["csrc/whitening.cpp"]
        cuda_sources = ["csrc/whitening_cuda.cu"]
        with_cuda = (
            torch.version.cuda is not None
            and CUDA_HOME is not None
            and all(os.path.exists(os.path.join(here, s)) for s in cuda_sources)
            and not _env_flag("LOWRANK_ENGINE_NO_CUDA")
        )
        cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
        if with_cuda:
            ext = CUDAExtension(
                "lowrank_engine._C",
                cpu_sources + cuda_sources,
                define_macros=[("LOWRANK_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
                extra_link_args=["-fopenmp"],
                libraries=["cusolver", "cublas"],
            )
        else:
            ext = CppExtension(
                "lowrank_engine._C",
                cpu_sources,
                extra_compile_args=cxx_flags,
                extra_link_args=["-fopenmp"],
            )
        ext_modules.append(ext)
        print(f"lowrank-engine: building lowrank_engine._C ({'CPU+CUDA' if with_cuda else 'CPU'})", file=sys.stderr)

        class OptionalBuildExtension(BuildExtension.with_options(no_python_abi_suffix=True)):
            """Builds the extension, but a failure leaves the pure-PyTorch fallback working."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001 - any compiler failure
                    if _env_flag("LOWRANK_ENGINE_REQUIRE_EXT"):
                        raise
                    print(f"lowrank-engine: extension build failed ({exc}); using the PyTorch fallback", file=sys.stderr)

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # noqa: BLE001
                    if _env_flag("LOWRANK_ENGINE_REQUIRE_EXT"):
                        raise
                    print(f"lowrank-engine: building {ext.name} failed ({exc}); using the PyTorch fallback", file=sys.stderr)

        cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)

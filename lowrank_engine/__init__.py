"""lowrank-engine: SVD-based post-training compression of LLMs with fused kernels."""
import os

# OpenMP threads that spin-wait long (libgomp's default) turn LAPACK eigh 100-250x slower as soon
# as another process shares the cores, but never waiting (OMP_WAIT_POLICY=PASSIVE) makes each of
# LAPACK's many small parallel regions pay a wake-up: a 576² fp64 eigh took 0.13 s instead of 0.03 s
# on 2 idle cores. A short spin keeps both cases close to their best (measured, 2 cores, 576² eigh:
# 0.04 s idle, 0.12 s beside a busy process). Set before torch is first imported; a user's own
# OpenMP wait settings win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Register the "lowrank" transformers quantizer once transformers loads its quantizer registry.

    Importing transformers takes seconds, so this module does not: if the registry is already loaded,
    register now; otherwise a one-shot import hook registers right after `transformers.quantizers.auto`
    executes, before any from_pretrained can consult it.
    """
    import importlib.abc
    import importlib.util
    import sys

    registry = "transformers.quantizers.auto"
    if registry in sys.modules:
        from lowrank_engine.hf_quantizer import register

        register()
        return

    class _RegisterAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != registry:
                return None
            sys.meta_path.remove(self)  # one shot, and lets find_spec below reach the real finders
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                from lowrank_engine.hf_quantizer import register

                register()

            spec.loader.exec_module = exec_module  # this spec's own loader instance only
            return spec

    sys.meta_path.insert(0, _RegisterAfterImport())


_register_with_transformers()

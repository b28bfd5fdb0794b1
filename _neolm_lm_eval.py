"""Makes `lm_eval --model neolm` work: registers neolm's backend when lm-evaluation-harness loads its models.

lm-evaluation-harness 0.4.x looks model names up in a registry that only its own `lm_eval.models` module
fills; it does not discover plugins. The one-line `neolm-lm-eval.pth` that neolm installs imports this
module at interpreter start-up. It adds an import hook for `lm_eval.models` and nothing else (no torch, no
neolm): when the harness imports that module, the hook adds the name "neolm" as a lazy placeholder for
`neolm.eval.harness:NeolmLM`, so neolm itself is imported only if that model is asked for.
"""

import logging
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder

_MODULE = "lm_eval.models"
_TARGET = "neolm.eval.harness:NeolmLM"


def _register_placeholder() -> None:
    from lm_eval.api.registry import model_registry

    if "neolm" not in model_registry:
        model_registry.register("neolm", target=_TARGET)


class _HarnessHook(MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            try:
                _register_placeholder()
            except Exception as err:  # noqa: BLE001  (never break the harness; neolm-lm-eval still works)
                logging.getLogger("neolm").warning("could not register 'neolm' with lm_eval (%s)", err)

        spec.loader.exec_module = exec_module  # this spec's own loader object, nothing shared
        return spec


def install() -> None:
    if not any(isinstance(f, _HarnessHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _HarnessHook())
    if _MODULE in sys.modules:  # already imported (install() called late): register now
        _register_placeholder()


install()

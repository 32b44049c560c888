"""`import llava_fitprune` makes transformers' Auto classes know our model types, without importing them.

`AutoModelForCausalLM.from_pretrained(saved_pruned_checkpoint)` needs the config's `model_type`
("llava_fitprune", "llava_mistral_fitprune") registered with `AutoConfig`. Registering the real
classes would import torch, transformers and LLaVA on `import llava_fitprune` (8 s on a loaded
2-core machine, against 0.06 s today), which every small tool (`python -m llava_fitprune.eval.merge`)
would pay. So the package registers a *stand-in* for each config class in transformers' config
registry, as soon as that registry exists (now, or when transformers' `configuration_auto` is
imported later: a one-shot import hook). The stand-in imports the real module on first use, whose
import registers the real config and model classes (`AutoConfig.register`, `AutoModelForCausalLM.register`),
replacing the stand-in.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

REGISTRY_MODULE = "transformers.models.auto.configuration_auto"
MODEL_TYPES = {  # model_type -> (module, config class); the module registers its classes when imported
    "llava_fitprune": ("llava_fitprune.adapters.llava.modeling", "FitPruneLlavaConfig"),
    "llava_mistral_fitprune": ("llava_fitprune.adapters.llava.modeling_mistral", "FitPruneLlavaMistralConfig"),
}


class LazyConfigClass:
    """Stands in for a config class in transformers' registry until first used."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.name)

    def from_dict(self, *args, **kwargs):  # what AutoConfig.from_pretrained calls
        return self.load().from_dict(*args, **kwargs)

    def __call__(self, *args, **kwargs):  # AutoConfig.for_model
        return self.load()(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"LazyConfigClass({self.module}.{self.name})"


def register(config_mapping) -> None:
    for model_type, (module, name) in MODEL_TYPES.items():
        if model_type not in config_mapping:  # the real class, once imported, stays
            config_mapping.register(model_type, LazyConfigClass(module, name))


class _RegisterAfterExec:  # an importlib Loader (duck-typed: importlib.abc costs 70 ms to import)
    """Wraps the registry module's loader: runs it, then registers the stand-ins."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        register(module.CONFIG_MAPPING)

    def __getattr__(self, attr):  # get_source, get_code, ... of the wrapped loader
        return getattr(self._loader, attr)


class _RegistryImportHook:  # an importlib MetaPathFinder
    """One shot: when transformers imports its config registry, wrap that module's loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    """Register now when transformers' registry is loaded, else when it will be."""
    registry = sys.modules.get(REGISTRY_MODULE)
    if registry is not None and hasattr(registry, "CONFIG_MAPPING"):
        register(registry.CONFIG_MAPPING)
    elif not any(isinstance(f, _RegistryImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryImportHook())

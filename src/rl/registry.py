"""Functions registered by name, chosen in the config (`algo.loss_type`, `algo.advantage`): verl's registries. A name
that is not registered but dotted (`mypkg.losses.reinforce`) imports its module and takes the function there, so a
command line can reach a user's own without a script."""

from __future__ import annotations

import importlib
from collections.abc import Callable


class Registry(dict):
    def __init__(self, key: str, decorator: str):
        super().__init__()
        self.key, self.decorator = key, decorator

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            if name in self and self[name] is not fn:
                raise ValueError(f"{self.key}: {name!r} is registered already ({self[name].__qualname__})")
            self[name] = fn
            return fn
        return add

    def get_fn(self, name: str) -> Callable:
        """The function registered as `name` (or at the dotted path `name`), or an error naming the key and listing
        the registered ones."""
        if name not in self and isinstance(name, str) and "." in name:
            module, _, attr = name.rpartition(".")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"{self.key}={name!r}: cannot import it ({e})") from None
            if not callable(fn):
                raise ValueError(f"{self.key}={name!r} is not a function")
            self.register(name)(fn)
        if name not in self:
            raise ValueError(f"{self.key}={name!r}: must be one of {sorted(self)}, a function registered with "
                             f"{self.decorator}, or the dotted path of one (mypkg.module.function)")
        return self[name]

"""One register-by-name table for quantizers, schedules and datasets (as timm's for models).

A `Registry` is a dict from name to class or function, filled by its `register(name)`
decorator (a second registration of a name warns, and the later one wins); looking up a
name it does not hold raises one `UserError` line listing the choices, the same line the
command line gives for an unknown config group option.
"""

from __future__ import annotations

import warnings

from bqat.errors import UserError, unknown_option


class Registry(dict):
    """name -> object. `group` is the config group that selects from it (`quant`, `schedule`, `data`);
    `extra` are choices that the group offers without a registered object (`quant=none`)."""

    def __init__(self, group: str, extra: tuple[str, ...] = ()):
        super().__init__()
        self.group, self.extra = group, tuple(extra)

    def register(self, name: str):
        """Decorator: `@REGISTRY.register("name")` on a class or function; sets its `registered_name`."""

        def decorator(obj):
            if name in self:
                warnings.warn(f"{self.group} {name!r} registered twice; the later one wins", stacklevel=2)
            self[name] = obj
            obj.registered_name = name
            return obj

        return decorator

    def choices(self) -> list[str]:
        return sorted({*self, *self.extra})

    def __missing__(self, name):
        raise UserError(unknown_option(self.group, str(name), self.choices()))

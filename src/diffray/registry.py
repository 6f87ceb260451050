"""A named registry of factories (conditioning preprocessors, rewards): `@registry.register(name)` adds
one, `registry.build(name, **options)` makes one, and an unknown name or option is one ConfigError."""

from __future__ import annotations

from typing import Any, Callable

from diffray.errors import ConfigError


class Registry(dict):
    """{name: factory}; `what` names an entry in errors ("reward"), `field` is the config field."""

    def __init__(self, what: str, field: str):
        super().__init__()
        self.what, self.field = what, field

    def register(self, name: str):
        """Decorator: register a factory `factory(**options)` under `name`."""

        def wrap(factory: Callable[..., Any]):
            self[name] = factory
            return factory

        return wrap

    def build(self, name: str, **options: Any) -> Any:
        """The entry `name` built with `options`.

        Raises:
            ConfigError: an unknown name (listing the known ones) or an option its factory does not take.
        """
        if name not in self:
            raise ConfigError(f"unknown {self.what} {name!r} (allowed: {', '.join(sorted(self))})", field=self.field)
        try:
            return self[name](**options)
        except TypeError as exc:
            raise ConfigError(f"{name}: {exc}", field=self.field) from None

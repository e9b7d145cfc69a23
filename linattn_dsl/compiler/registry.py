"""Finding specs: the shipped ones by name (``linattn_dsl.specs.<name>``), a user's by file path."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

from .spec import Recurrence, SpecError

SPEC_PACKAGE = "linattn_dsl.specs"


class SpecNotFound(LookupError):
    pass


def builtin_names() -> list[str]:
    pkg = importlib.import_module(SPEC_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def spec_source(spec: Recurrence) -> str:
    """The source text of the file that defined ``spec`` (hashed into generated headers)."""
    return Path(spec_path(spec)).read_text()


def spec_path(spec: Recurrence) -> str:
    return spec._source_path


def _from_module(mod, where: str) -> Recurrence:
    spec = getattr(mod, "spec", None)
    if not isinstance(spec, Recurrence):
        raise SpecNotFound(f"{where} defines no `spec = Recurrence(...)`")
    object.__setattr__(spec, "_source_path", mod.__file__)
    object.__setattr__(spec, "_layer", getattr(mod, "layer", None))   # the file's layer declaration, if any
    return spec


def load(name_or_path: str) -> Recurrence:
    """A shipped spec by name, or a spec file by path. Raises SpecNotFound or SpecError."""
    p = Path(name_or_path)
    if name_or_path.endswith(".py") or p.exists() or "/" in name_or_path:
        if not p.is_file():
            raise SpecNotFound(f"no spec file at {name_or_path!r}")
        digest = hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:10]
        modname = f"linattn_user_spec_{p.stem}_{digest}"
        loader_spec = importlib.util.spec_from_file_location(modname, p)
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[modname] = mod
        try:
            loader_spec.loader.exec_module(mod)
        except SpecError:
            raise
        except SyntaxError as e:
            raise SpecNotFound(f"{name_or_path}: not valid Python ({e.msg}, line {e.lineno})") from None
        except Exception as e:  # a user's file may fail in any way on import
            raise SpecNotFound(f"{name_or_path}: importing it raised {type(e).__name__}: {e}") from None
        return _from_module(mod, name_or_path)
    if not name_or_path.isidentifier() or name_or_path not in builtin_names():
        raise SpecNotFound(f"unknown spec {name_or_path!r}; known: {', '.join(builtin_names())} "
                           "(or give a path to a spec file)")
    return _from_module(importlib.import_module(f"{SPEC_PACKAGE}.{name_or_path}"), name_or_path)


def all_specs() -> list[Recurrence]:
    return [load(n) for n in builtin_names()]

"""The ALFWorld text engine (alfworld + textworld + fast-downward): loading and fixes.

Everything that touches the engine's internals lives here, so the rest of the package works
against one small surface:

- `require_engine()` imports the engine or fails with an install hint (it is the `[alfworld]`
  extra, not a core dependency).
- `shipped_path()` finds the PDDL domain, grammar and scene layouts inside the alfworld wheel.
- `apply_engine_fixes()` installs, once per process, the process-wide fixes:
    * fast-downward's `pddl2sas` rebinds `sys.argv` (to feed its option parser) and never
      restores it; we restore it, so loading a game cannot break the host program's argv.
    * speed-ups, each leaving the engine's output byte-identical (tested against the stock
      engine on random play):
      - textworld re-parses the same grammar templates with TatSu for every admissible
        command at every step; we memoise the TatSu model per template text (each use still
        walks it into fresh symbol objects, which the grammar code mutates);
      - the text generator deep-copies its derivation context (entity infos included) for
        every symbol it expands, though it never mutates what the context refers to; we copy
        the two dicts it does update (`variables`, `mapping`) and share the rest;
      - every reset re-translates the game's PDDL to SAS twice (most of a reset's time); we
        memoise the translation per (domain, problem) text, as the result is only read.
- `make_textworld_env()` builds one fresh wrapper chain per environment. alfworld's
  `AlfredTWEnv` passes one *instance* of its demangler wrapper to every slot of a synchronous
  batch, so all slots share it (and its wrapped game): admissible commands come back wrong.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

_INSTALL_HINT = (
    "The ALFWorld engine is not installed. Install it with `pip install 'hiper_jax[alfworld]'` "
    "(fast-downward-textworld and jericho compile from source: a C++ compiler, cmake and make "
    "are needed), or run `bash scripts/test.sh`, which installs it into .venv."
)

_PARSE_CACHE_LIMIT = 50_000
_SAS_CACHE_GAMES = 32
_fixes_applied: frozenset[str] | None = None


def require_engine() -> None:
    """Import the engine's packages, raising ImportError with an install hint if missing."""
    try:
        importlib.import_module("alfworld.gen.constants")
        importlib.import_module("textworld")
        importlib.import_module("textworld.envs.pddl.pddl")
        importlib.import_module("fast_downward")
    except ImportError as error:
        raise ImportError(f"{_INSTALL_HINT} ({error})") from error
    from textworld.envs.pddl import pddl as pddl_env

    if pddl_env.fast_downward_missing:
        raise ImportError(f"{_INSTALL_HINT} (textworld could not import fast_downward)")


def shipped_path(*parts: str) -> str:
    """Path of a file shipped in the alfworld wheel, e.g. `shipped_path("data", "alfred.pddl")`."""
    require_engine()
    import alfworld

    path = os.path.join(os.path.dirname(alfworld.__file__), *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed alfworld package")
    return path


def _restore_argv(pddl2sas: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(pddl2sas)
    def pddl2sas_keeping_argv(*args: Any, **kwargs: Any) -> Any:
        saved = sys.argv
        try:
            return pddl2sas(*args, **kwargs)
        finally:
            sys.argv = saved

    pddl2sas_keeping_argv.keeps_argv = True
    return pddl2sas_keeping_argv


def _memoise_parse(module: Any, converter_cls: type) -> None:
    """Replace `module._parse_and_convert` by one that caches TatSu models per input text.

    The converters only read the TatSu model, so one model can be walked many times; each walk
    still returns new objects (the grammar code mutates those).
    """
    if getattr(module._parse_and_convert, "memoised", False):
        return
    parser = module._PARSER
    cache: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}

    def parse_and_convert(text: str, **kwargs: Any) -> Any:
        key = (text, tuple(sorted(kwargs.items())))
        model = cache.get(key)
        if model is None:
            if len(cache) >= _PARSE_CACHE_LIMIT:
                cache.clear()
            model = cache[key] = parser.parse(text, **kwargs)
        return converter_cls().walk(model)

    parse_and_convert.memoised = True
    parse_and_convert.cache = cache
    module._parse_and_convert = parse_and_convert


def _shallow_copy_context(context: dict) -> dict:
    return {
        "state": context["state"],
        "facts": context["facts"],
        "variables": dict(context["variables"]),
        "mapping": dict(context["mapping"]),
        "entity_infos": context["entity_infos"],
    }


def _memoise_pddl2sas(pddl2sas: Callable[..., Any]) -> Callable[..., Any]:
    @functools.lru_cache(maxsize=_SAS_CACHE_GAMES)
    def translate(domain: str, problem: str, verbose: bool, optimize: bool) -> Any:
        return pddl2sas(domain, problem, verbose=verbose, optimize=optimize)

    @functools.wraps(pddl2sas)
    def pddl2sas_memoised(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        return translate(domain, problem, verbose, optimize)

    pddl2sas_memoised.keeps_argv = True
    pddl2sas_memoised.cache_info = translate.cache_info
    return pddl2sas_memoised


SPEEDUPS = ("memoise_parses", "share_context", "memoise_translation")


def apply_engine_fixes(speedups: bool | Iterable[str] = True) -> None:
    """Install the process-wide engine fixes (see the module docstring); idempotent.

    `speedups`: True for all of `SPEEDUPS`, False for none (the stock engine's speed, the
    benchmark's baseline), or a subset of their names. The argv fix is always installed. The
    patches cannot be undone, so a later call asking for other speed-ups raises.
    """
    global _fixes_applied
    chosen = frozenset(SPEEDUPS if speedups is True else () if speedups is False else speedups)
    if not chosen <= set(SPEEDUPS):
        raise ValueError(f"unknown speed-ups {sorted(chosen - set(SPEEDUPS))}; expected some of {SPEEDUPS}")
    if _fixes_applied is not None:
        if _fixes_applied != chosen:
            raise RuntimeError(f"engine fixes were already applied with speedups={sorted(_fixes_applied)}")
        return
    require_engine()
    import fast_downward
    import fast_downward.interface
    import textworld.logic as tw_logic
    from textworld.envs.pddl import textgen

    fixed = _restore_argv(fast_downward.interface.pddl2sas)
    if "memoise_translation" in chosen:
        fixed = _memoise_pddl2sas(fixed)
    if "memoise_parses" in chosen:
        _memoise_parse(textgen, textgen._Converter)
        _memoise_parse(tw_logic, tw_logic._ModelConverter)
    if "share_context" in chosen:
        textgen.copy_context = _shallow_copy_context
    fast_downward.pddl2sas = fixed
    fast_downward.interface.pddl2sas = fixed
    _fixes_applied = chosen


def engine_speedups_applied() -> frozenset[str] | None:
    """The speed-ups installed by `apply_engine_fixes` (empty: none), or None before it ran."""
    return _fixes_applied


def parse_cache_sizes() -> dict[str, int]:
    """Number of memoised TatSu models per patched module (empty if not memoised)."""
    import textworld.logic as tw_logic
    from textworld.envs.pddl import textgen

    return {
        module.__name__: len(module._parse_and_convert.cache)
        for module in (textgen, tw_logic)
        if getattr(module._parse_and_convert, "memoised", False)
    }


def make_textworld_env(request_facts: bool = False, request_walkthrough: bool = False) -> Any:
    """A fresh textworld environment for `.tw-pddl` games with ALFWorld's naming wrappers.

    Returns an object with `load(gamefile)`, `reset() -> GameState` and
    `step(command) -> (GameState, score, done)`; the game state holds `feedback`,
    `admissible_commands`, `won` (and `facts` / `extra.walkthrough` when requested).
    Every call builds new wrapper instances: nothing is shared between environments.
    """
    if _fixes_applied is None:
        apply_engine_fixes()
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.wrappers import GenericEnvironment

    extras = ["walkthrough"] if request_walkthrough else []
    infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=request_facts, extras=extras)
    return AlfredDemangler(shuffle=False)(GenericEnvironment(infos))

"""One handler served at several DICOMweb paths (study, series, instance, frame levels).

``add_level_route`` registers ``handler`` at ``path`` under ``name``: FastAPI reads what the
endpoint takes from its signature, so the endpoint made here declares the path's parameters,
the dependencies, and the optional query parameters, and hands them all to ``handler`` by
keyword. Path and query parameters a level lacks do not reach ``handler``: give them defaults.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastapi import APIRouter

STUDY = "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{sop}"
FRAMES = INSTANCE + "/frames/{frames}"

_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def path_params(path: str) -> list[str]:
    """The parameter names of a route path, in order: ``/studies/{study}`` -> ``["study"]``."""
    return re.findall(r"{(\w+)}", path)


def add_level_route(
    router: APIRouter,
    path: str,
    name: str,
    handler: Callable[..., Any],
    *,
    deps: Mapping[str, Any],
    query: Iterable[str] = (),
    summary: str | None = None,
) -> None:
    """GET ``path`` served by ``handler``; ``deps`` maps keyword names to annotations
    (``Request``, ``StateDep``, ``SessionDep``); an async ``handler`` gets an async endpoint,
    a plain one a plain endpoint (FastAPI runs it in its thread pool).

    The route ``name`` is also the endpoint's ``__name__``: with no ``summary``, OpenAPI
    derives the summary from it, and the operation id always.
    """
    endpoint: Callable[..., Any]
    if inspect.iscoroutinefunction(handler):

        async def endpoint(**kwargs: Any) -> Any:
            return await handler(**kwargs)

    else:

        def endpoint(**kwargs: Any) -> Any:
            return handler(**kwargs)

    endpoint.__signature__ = inspect.Signature(  # type: ignore[union-attr]
        [inspect.Parameter(p, _KEYWORD, annotation=str) for p in path_params(path)]
        + [inspect.Parameter(k, _KEYWORD, annotation=a) for k, a in deps.items()]
        + [inspect.Parameter(q, _KEYWORD, annotation=str | None, default=None) for q in query],
        return_annotation=inspect.signature(handler, eval_str=True).return_annotation,
    )
    endpoint.__name__ = endpoint.__qualname__ = name
    router.add_api_route(path, endpoint, methods=["GET"], name=name, summary=summary)

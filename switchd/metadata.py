"""How a model is described to clients: its llama.cpp-style status and its metadata.

Clients that manage models (Open WebUI's llama.cpp connection, Letta, pi,
Hermes agent) read each model of `GET /models` or `/v1/models` as llama.cpp's
router lists it (tools/server/README.md, "GET /models"; server-models.cpp):

    "status": {"value": "unloaded" | "loading" | "loaded" | "sleeping",
               "failed": true, "exit_code": N}     # the last two after a crash
    "architecture": {"input_modalities": ["text", "image"?], "output_modalities": ["text"]}

switchd's states map onto those values (`llama_status`); its own state stays
beside them (`status.state`), with the error of a failed load. `stopping` maps
to `unloaded`: it is on its way there, and a load then is accepted (queued
behind the stop), as it is for an unloaded model.

The metadata (`describe`) is there whether the model is loaded or not: its
context length and capabilities, from the config when set there, else learned
from its engine the last time it ran (`engine_context_length`: vLLM's
`/v1/models` `max_model_len`, else llama.cpp's `/props`
`default_generation_settings.n_ctx`). The config wins over what was learned.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from switchd.config import Capability, ModelSpec
from switchd.stats import Learned

log = logging.getLogger(__name__)

DEFAULT_CAPABILITIES = (Capability.CHAT, Capability.COMPLETION)
ASK_SECONDS = 5.0  # a freshly loaded engine answers these at once

# llama.cpp's status values. `failed` is no value of llama.cpp's: a failed model is
# `unloaded` with `failed: true` and its exit code (server-models.cpp, is_failed()).
UNLOADED, LOADING, LOADED, SLEEPING = "unloaded", "loading", "loaded", "sleeping"
RUNNING_VALUES = frozenset({LOADING, LOADED, SLEEPING})  # llama.cpp's is_running()
VALUES = {
    "running": LOADED,
    "loading": LOADING,
    "sleeping": SLEEPING,
    "stopping": UNLOADED,
    "exited": UNLOADED,
    "failed": UNLOADED,
}
# llama.cpp reports a failure by its child's exit code; a load that failed without an
# exit of its own (a health timeout, a start refused) is reported with this one.
FAILED_WITHOUT_EXIT = 1


def status_value(state: str) -> str:
    """llama.cpp's status value for one of switchd's model states."""
    return VALUES[state]


def requested_value(state: str, load_requested: bool) -> str:
    """The status value of a model in `state`: `loading` from the moment its load is
    asked for (queued, its engine not started yet), as llama.cpp's router says."""
    value = status_value(state)
    return LOADING if value == UNLOADED and load_requested else value


def llama_status(model: dict[str, Any]) -> dict[str, Any]:
    """The `status` object of a model (`Catalog.model_json`'s body) as llama.cpp's router
    gives it, with switchd's state (and a failure's error) beside llama.cpp's fields."""
    state = model["status"]
    value = requested_value(state, bool(model.get("load_requested")))
    status: dict[str, Any] = {"value": value, "state": state}
    last_exit = model.get("last_exit")
    code = last_exit.get("exit_code") if isinstance(last_exit, dict) else None
    if state == "failed":
        status["failed"] = True
        status["exit_code"] = code if isinstance(code, int) and code != 0 else FAILED_WITHOUT_EXIT
        if model.get("error"):
            status["error"] = model["error"]
    elif state == "exited" and isinstance(code, int) and code != 0:
        status["failed"] = True  # its engine died on its own
        status["exit_code"] = code
    return status


def describe(spec: ModelSpec, learned: Learned) -> dict[str, Any]:
    """What clients read of a model whether it is loaded or not."""
    context = spec.context_length if spec.context_length is not None else learned.context_length
    source = (
        "config"
        if spec.context_length is not None
        else "engine"
        if learned.context_length is not None
        else None
    )
    capabilities = spec.capabilities if spec.capabilities is not None else DEFAULT_CAPABILITIES
    inputs = ["text", "image"] if Capability.VISION in capabilities else ["text"]
    outputs = ["embedding"] if capabilities == (Capability.EMBEDDINGS,) else ["text"]
    return {
        "context_length": context,
        "max_model_len": context,  # vLLM's name for it
        "context_length_source": source,
        "capabilities": [c.value for c in capabilities],
        "architecture": {"input_modalities": inputs, "output_modalities": outputs},
    }


def model_object(name: str, model: dict[str, Any]) -> dict[str, Any]:
    """A model as OpenAI's API lists one and llama.cpp's router extends it: its status
    object, aliases and metadata (`model` is `Catalog.model_json`'s body)."""
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "switchd",
        "status": llama_status(model),
        "aliases": model["aliases"],
        **model["metadata"],
    }


async def engine_context_length(http: httpx.AsyncClient, spec: ModelSpec, url: str) -> int | None:
    """The context length a running engine reports: vLLM's `max_model_len` in its
    `/v1/models`, else llama.cpp's `n_ctx` in `/props`; None when neither says."""
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    listed = await _get_json(http, url + "/v1/models", headers)
    cards = listed.get("data") if isinstance(listed, dict) else None
    for card in cards if isinstance(cards, list) else []:
        tokens = _count(card.get("max_model_len") if isinstance(card, dict) else None)
        if tokens is not None:
            return tokens
    props = await _get_json(http, url + "/props", headers)
    settings = props.get("default_generation_settings") if isinstance(props, dict) else None
    return _count(settings.get("n_ctx") if isinstance(settings, dict) else None)


async def _get_json(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Any:
    try:
        response = await http.get(url, headers=headers, timeout=ASK_SECONDS)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        log.debug("no metadata from %s: %r", url, exc)
        return None


def _count(value: object) -> int | None:
    """A positive whole number, else None (JSON's `true` is no count)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None

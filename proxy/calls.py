"""Calling one version's runner: its time limit, and failures tagged with the version.

A failure raised here carries a note naming the version that failed (`variant_of`), so
the HTTP error answer can say which variant it came from and the windows count it
against that variant, whichever layer maps it.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from rollguard.proxy.answers import deciding_outputs, passthrough_prediction, prediction_of
from rollguard.serving.codec import response_outputs, tensors_from_outputs
from rollguard.serving.errors import ModelExecutionError, ServingError, UpstreamTimeout
from rollguard.serving.registry import LoadedVersion
from rollguard.serving.tensors import Tensors

VARIANT_NOTE = "rollguard-variant="  # how a failure says which version failed
E = TypeVar("E", bound=BaseException)


def variant_of(exc: BaseException) -> str | None:
    """The version that failed, when the failure came from a model call."""
    for note in getattr(exc, "__notes__", ()):
        if note.startswith(VARIANT_NOTE):
            return str(note[len(VARIANT_NOTE) :])
    return None


async def predict(
    loaded: LoadedVersion, inputs: Tensors, limit_s: float | None, default_s: float
) -> Tensors:
    """The runner's outputs within `limit_s`; None: the request's own limit, which is a
    remote runner's client timeout (the manifest's timeout_s), else `default_s`."""
    runner = loaded.runner
    try:
        if runner.fits_inline(inputs):
            # A model measured to answer in microseconds runs right here; a timer
            # could not interrupt a call that never yields, so none is set.
            return runner.predict_inline(inputs)
        if limit_s is None and runner.passes_v2_bodies:
            # A remote runner times out by its own client timeout and raises
            # UpstreamTimeout: a second timer would only cost.
            return await runner.predict(inputs)
        async with asyncio.timeout(default_s if limit_s is None else limit_s):
            return await runner.predict(inputs)
    except TimeoutError:
        raise timed_out(loaded, limit_s, default_s) from None
    except ServingError as exc:
        tagged(exc, loaded)
        raise
    except Exception as exc:  # a runner bug must still count as that version's error
        raise runner_bug(loaded, exc) from exc


async def predict_raw(
    loaded: LoadedVersion, body: bytes, *, full: bool
) -> tuple[Tensors, float, list[dict[str, Any]]]:
    """Forward the V2 JSON `body` as-is to a runner that takes bodies: (every output as
    numpy when `full`, else none; the prediction the windows keep; the upstream's
    outputs as JSON)."""
    try:
        items, _ = response_outputs(await loaded.runner.predict_raw(body))
        outputs: Tensors = {}
        if full:
            outputs = tensors_from_outputs(items)
            prediction = prediction_of(outputs)
        else:
            read = passthrough_prediction(items)
            prediction = prediction_of(deciding_outputs(items)) if read is None else read
    except TimeoutError:
        raise timed_out(loaded, None, loaded.manifest.timeout_s) from None
    except ServingError as exc:
        tagged(exc, loaded)
        raise
    except Exception as exc:
        raise runner_bug(loaded, exc) from exc
    return outputs, prediction, items


def timed_out(loaded: LoadedVersion, limit_s: float | None, default_s: float) -> UpstreamTimeout:
    """The timeout of a call given `limit_s` (None: the request's own limit, see predict)."""
    manifest = loaded.manifest
    if limit_s is None:
        limit_s = manifest.timeout_s if manifest.framework == "http" else default_s
    failure = UpstreamTimeout(
        f"{manifest.name}/{manifest.version} did not answer within {limit_s}s"
    )
    return tagged(failure, loaded)


def runner_bug(loaded: LoadedVersion, exc: Exception) -> ModelExecutionError:
    return tagged(ModelExecutionError(f"{type(exc).__name__}: {exc}"), loaded)


def tagged(exc: E, loaded: LoadedVersion) -> E:
    """`exc` with the note naming the version it came from (read back by `variant_of`)."""
    exc.add_note(VARIANT_NOTE + loaded.manifest.version)
    return exc

"""The run lifecycle: where a pipeline call starts and ends, and where its steps end.

While a session is open on a pipeline, the pipeline's class is swapped for a
subclass of the same name whose ``__call__`` tells the session that a run
starts and ends, and chains the controllers' ``on_step_end`` into the
pipeline's own ``callback_on_step_end`` (before the user's callback, which
then sees the controllers' latents). Nothing is left for a user to wire by
hand, so step-end work cannot silently not run. The original class comes
back when the last session on the pipeline closes.
"""

from __future__ import annotations

import functools
import inspect
import weakref

from .errors import XattnError


class LifecycleError(XattnError, RuntimeError):
    """A pipeline that cannot give controllers what they need (e.g. no step-end callback)."""


_WATCHERS: "weakref.WeakKeyDictionary[object, object]" = weakref.WeakKeyDictionary()  # pipeline -> runtime
_SUBCLASSES: dict[type, type] = {}


def _watched_class(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose calls report to the pipeline's runtime."""
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]
    original_call = cls.__call__

    @functools.wraps(original_call)
    def __call__(self, *args, **kwargs):
        runtime = _WATCHERS.get(self)
        if runtime is None:
            return original_call(self, *args, **kwargs)
        return runtime.run_pipeline(original_call, self, args, kwargs)

    watched = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "_xattn_unwatched": cls})
    _SUBCLASSES[cls] = watched
    return watched


def watch(pipe, runtime) -> None:
    """Route ``pipe(...)`` through ``runtime.run_pipeline`` until :func:`unwatch`."""
    _WATCHERS[pipe] = runtime
    pipe.__class__ = _watched_class(type(pipe))


def unwatch(pipe) -> None:
    _WATCHERS.pop(pipe, None)
    original = getattr(type(pipe), "_xattn_unwatched", None)
    if original is not None:
        pipe.__class__ = original


def with_step_end(call, pipe, kwargs: dict, step_end, settled=None) -> dict:
    """``kwargs`` with ``step_end(timestep, latents) -> latents | None`` chained into the step-end callback.

    ``settled(latents)``, if given, receives the latents tensor the pipeline goes on with.
    """
    parameters = inspect.signature(call).parameters
    if "callback_on_step_end" not in parameters:
        if "callback" in parameters and "callback_steps" in parameters:
            return _with_legacy_callback(kwargs, step_end, settled)
        raise LifecycleError(f"{type(pipe).__name__} has no callback_on_step_end, so controllers that act between "
                             "steps (LocalBlend, guidance) cannot run on it")
    user = kwargs.get("callback_on_step_end")
    inputs = kwargs.get("callback_on_step_end_tensor_inputs")
    if inputs is None:
        default = parameters.get("callback_on_step_end_tensor_inputs")
        inputs = default.default if default is not None and default.default is not inspect.Parameter.empty else None
    inputs = list(getattr(user, "tensor_inputs", None) or inputs or [])
    if "latents" not in inputs:
        inputs.append("latents")

    def callback(pipeline, index, timestep, callback_kwargs):
        outputs = {}
        latents = step_end(timestep, callback_kwargs["latents"])
        if latents is not None:
            outputs["latents"] = latents
            callback_kwargs = {**callback_kwargs, "latents": latents}
        if user is not None:
            outputs.update(user(pipeline, index, timestep, callback_kwargs) or {})
        if settled is not None:
            settled(outputs.get("latents", callback_kwargs["latents"]))
        return outputs

    return {**kwargs, "callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": inputs}


def _with_legacy_callback(kwargs: dict, step_end, settled=None) -> dict:
    """The same chain through diffusers' older ``callback(step, timestep, latents)`` (PixArt): it returns
    nothing, and the pipeline goes on with the tensor it passed, so changed latents are copied into it.
    xattn needs every step (``callback_steps=1``); the user's callback still runs every ``callback_steps``."""
    user, every = kwargs.get("callback"), kwargs.get("callback_steps") or 1

    def callback(index, timestep, latents):
        changed = step_end(timestep, latents)
        if changed is not None:
            latents.copy_(changed)
        if settled is not None:
            settled(latents)
        if user is not None and index % every == 0:
            user(index, timestep, latents)

    return {**kwargs, "callback": callback, "callback_steps": 1}


def observe(pipe, method: str, seen) -> bool:
    """Call ``seen(arguments, result)`` after each ``pipe.<method>(...)``, until :func:`stop_observing`.

    The wrapper is an instance attribute, so removing it shows the class's
    method again; a method already wrapped (or missing) is left alone.
    """
    original = getattr(pipe, method, None)
    if original is None or method in vars(pipe):
        return False
    signature = inspect.signature(original)

    @functools.wraps(original)
    def observed(*args, **kwargs):
        result = original(*args, **kwargs)
        seen(signature.bind_partial(*args, **kwargs).arguments, result)
        return result

    setattr(pipe, method, observed)
    return True


def stop_observing(pipe, method: str) -> None:
    vars(pipe).pop(method, None)


__all__ = ["LifecycleError", "observe", "stop_observing", "unwatch", "watch", "with_step_end"]

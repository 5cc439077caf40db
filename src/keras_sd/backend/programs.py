"""Compiled programs shared, within a process, by every model of one architecture.

Compiled programs take the weights as arguments (`stateless`), so one program, with
its traces, serves every model of the same class, configuration and weight shapes: a
pipeline built again from the same checkpoint (a notebook cell run twice, a second
pipeline with other weights) reuses the traces of the first instead of tracing again.
A program never holds a model: while it traces, it reads the model of the current call
through a weak reference, so freeing a pipeline frees its weights.
"""

from __future__ import annotations

import collections
import json
import threading
import weakref

import keras

from keras_sd.backend.compile import compile_function, stateless

# Least recently used programs beyond this many are dropped (with their traces).
MAX_SHARED_PROGRAMS = 32

_programs: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
_settings: list = []
_unshared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_shareable: set = set()


def register_trace_setting(read) -> None:
    """Make `read()` part of every shared program's key.

    For process-wide switches that layers read while a program traces (such as
    `keras_sd.models.conv.set_conv_algorithm`): after the switch changes, programs are
    traced anew instead of reusing traces made under the old value.

    Example:
    >>> register_trace_setting(lambda: "always the same")
    """
    _settings.append(read)


def register_shareable(cls):
    """Let models of exactly `cls` (not its subclasses) share compiled programs.

    Only for classes whose `get_config()` holds everything their `call` depends on
    besides the weights. Models of other classes keep programs of their own: a subclass
    may compute with an attribute its config does not list. keras-sd's UNet, VAE and
    CLIP text encoder are registered; returns `cls`, so it also works as a decorator.

    Example:
    >>> class Projection(keras.layers.Dense):
    ...     pass
    >>> register_shareable(Projection) is Projection
    True
    """
    _shareable.add(cls)
    return cls


def architecture_key(model) -> tuple:
    """What a trace of `model` depends on: for a class registered with
    `register_shareable`, its class, configuration (but its name) and weight shapes
    and dtypes; for any other model, the model itself (it shares with no other).

    Example:
    >>> @register_shareable
    ... class Projection(keras.layers.Dense):
    ...     pass
    >>> first, second = Projection(2, name="a"), Projection(2, name="b")
    >>> first.build((None, 3))
    >>> second.build((None, 3))
    >>> architecture_key(first) == architecture_key(second)
    True
    >>> architecture_key(keras.layers.Dense(2)) == architecture_key(keras.layers.Dense(2))
    False
    """
    if type(model) not in _shareable:
        return (type(model), _unshared.setdefault(model, object()))
    config = {k: v for k, v in model.get_config().items() if k != "name"}
    return (
        type(model),
        json.dumps(config, sort_keys=True, default=str),
        tuple((tuple(w.shape), str(w.dtype)) for w in model.weights),
    )


class SharedProgram:
    """A compiled program made by `build(owner)`, where `owner()` is the object of the
    latest call (held weakly), read by the traced function for its model."""

    def __init__(self, build, jit_compile):
        self._owner = _nobody
        self._compiled = compile_function(build(self.owner), jit_compile)

    def owner(self):
        """The object whose call is running (or ran last); None once freed."""
        return self._owner()

    def __call__(self, owner, *args):
        self._owner = weakref.ref(owner)
        return self._compiled(*args)


def _nobody():
    return None


def shared_program(key, build, jit_compile) -> SharedProgram:
    """The process's program for `key` (a tuple naming what the traces compute,
    `architecture_key` included), made by `build(owner)` and compiled with `jit_compile`
    on first use.

    Example:
    >>> square = shared_program(("square",), lambda owner: lambda x: x * x, False)
    >>> float(square(object, keras.ops.ones(())))
    1.0
    >>> shared_program(("square",), None, False) is square
    True
    """
    full_key = (
        keras.backend.backend(),
        keras.config.dtype_policy().name,
        jit_compile,
        tuple(read() for read in _settings),
        key,
    )
    with _lock:
        program = _programs.get(full_key)
        if program is None:
            program = _programs[full_key] = SharedProgram(build, jit_compile)
        _programs.move_to_end(full_key)
        while len(_programs) > MAX_SHARED_PROGRAMS:
            _programs.popitem(last=False)
    return program


def shared_stateless(model, jit_compile):
    """`call(state, *args)`: `model(*args)` with weights `state`, compiled, its traces
    shared by every model with `model`'s `architecture_key`.

    Example:
    >>> import numpy as np
    >>> dense = keras.layers.Dense(1, use_bias=False)
    >>> dense.build((None, 2))
    >>> call = shared_stateless(dense, jit_compile=False)
    >>> state = ([np.array([[1.0], [2.0]], "float32")], [])
    >>> float(call(state, np.array([[1.0, 1.0]], "float32"))[0, 0])
    3.0
    """

    def call(state, *args):
        program = shared_program(
            ("stateless", architecture_key(model)), _stateless_of_owner, jit_compile
        )
        return program(model, state, *args)

    return call


def _stateless_of_owner(owner):
    return lambda state, *args: stateless(owner())(state, *args)


def clear_shared_programs() -> None:
    """Drop every shared program and its traces: the next call of each pipeline traces
    again (for example after patching a layer's code in place).

    Example:
    >>> clear_shared_programs()
    """
    with _lock:
        _programs.clear()

"""The one error type users see, and the one validator of settings that raises it.

A setting is a dataclass field made with ``setting(default, expected, ok)``: its type is checked by
OmegaConf when Hydra composes the config, its range by ``Checked.__post_init__`` (every schema's
base), and both kinds of failure read ``<key> must be <expected>; got <value>``.

Also here, beside ``Interrupted``: ``deferred_interrupts``, how the training loop and the sweep
launcher turn a first Ctrl-C or SIGTERM into a stop at a safe point and a second into one at once.
"""

import math
import signal
import threading
from contextlib import contextmanager
from dataclasses import field, fields, is_dataclass
from typing import Any, ClassVar

from omegaconf.errors import OmegaConfBaseException


class StnbenchError(ValueError):
    """Bad input (a name, a shape, a file, a setting). Commands print it on one line and exit 2."""

    code = 2


class Fault(StnbenchError):
    """A run that met a fault (a full disk, a crash): one line, the traceback in the run's
    train.log, exit status 1."""

    code = 1


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, after the run saved its checkpoint: exit status 130. A KeyboardInterrupt,
    so it ends a sweep (Hydra records other exceptions of a job and goes on)."""


@contextmanager
def deferred_interrupts(first=lambda: None):
    """Ctrl-C and SIGTERM while the block runs: the first is only recorded (and ``first()``
    called), so that the block can end where it is safe to; a second raises KeyboardInterrupt at
    once. Yields the signals caught, in order. Main thread only (elsewhere nothing is caught)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        caught.append(signum)
        if len(caught) > 1:
            raise KeyboardInterrupt
        first()

    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (Hydra's and torchvision's span several)."""
    return " ".join(s.strip() for s in str(error).splitlines() if s.strip()) or type(error).__name__


def setting(default: Any, expected, ok=None) -> Any:
    """A schema field: its default, what it must be in words, and a check of its value (beyond
    its type) that ``Checked`` runs; or its default and a check that says its own words
    (number()'s)."""
    if callable(expected):
        expected, ok = expected.expected, expected
    return field(default=default, metadata={"expected": expected, "ok": ok})


def describe(error: BaseException) -> str:
    """One line for a bad setting: OmegaConf's type and key errors (raised while Hydra composes)
    in the words of the schema's setting(), else the message folded onto one line."""
    cause = error
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        if isinstance(cause, StnbenchError):  # raised by a plugin Hydra instantiated
            return one_line(cause)
        cause = cause.__cause__
    schema = getattr(cause, "object_type", None)
    if not getattr(cause, "full_key", None) or not is_dataclass(schema):
        text = one_line(error).split(" Config search path:")[0]  # Hydra's lists its search path
        if "LexerNoViableAlt" in text or "missing EQUAL" in text:  # Hydra's override grammar
            return unparsed(str(error))
        return text
    known = {f.name: f for f in fields(schema)}
    name = cause.full_key.rsplit(".", 1)[-1]
    key = f"{schema.key}.{name}" if getattr(schema, "key", "") else cause.full_key
    if name not in known:
        return f"unknown key {key}; expected one of {', '.join(known)}"
    if "expected" in known[name].metadata:
        return f"{key} must be {known[name].metadata['expected']}; got {cause.value!r}"
    return f"{key}: {one_line(cause).split(' full_key:')[0]}"


def unparsed(message: str) -> str:
    """Hydra's grammar error for an override, whose caret line one_line() would lose: the
    override, the character it stopped at, and how to quote a value."""
    lines = message.splitlines()
    carets = [i for i, line in enumerate(lines) if line.strip() == "^" and i > 0]
    where = ""
    if carets:
        override = lines[carets[0] - 1].split(": ", 1)[-1]
        col = lines[carets[0]].index("^") - (len(lines[carets[0] - 1]) - len(override))
        where = f"cannot parse {override!r} at {override[col : col + 1] or 'its end'!r}"
    else:
        where = one_line(Exception(message)).split(" See https://")[0]
    return (f"{where}; quote a value that holds spaces or letters outside ASCII, for the shell "
            "and for Hydra: 'data.root=\"/my data/ü\"'")  # fmt: skip


class Checked:
    """Base of the config schemas: ``__post_init__`` checks every field against its setting().
    ``key`` is where the schema sits in the composed config (errors name ``key.field``)."""

    key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            ok, value = f.metadata.get("ok"), getattr(self, f.name)
            if ok is not None and not ok(value):
                raise self.bad(f.name, f.metadata["expected"])

    def bad(self, name: str, expected: str) -> StnbenchError:
        key, value = f"{self.key}.{name}" if self.key else name, getattr(self, name)
        shown = repr(value)
        if isinstance(value, float) and math.isinf(value):  # 1e400 too is read as inf
            shown += " (a number beyond a float's range reads as inf)"
        return StnbenchError(f"{key} must be {expected}; got {shown}")


# checks of setting() values; None passes where a setting is optional
def number(lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """A finite number between lo and hi (each end open or closed), and those words, from the
    same bounds: ``number(0, lo_open=True).expected`` is "a finite number > 0"."""

    def ok(v):
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        above = lo < v if lo_open else lo <= v
        return math.isfinite(v) and above and (v < hi if hi_open else v <= hi)

    if math.isfinite(lo) and math.isfinite(hi):
        ok.expected = f"a number in {'[('[lo_open]}{lo:g}, {hi:g}{'])'[hi_open]}"
    elif math.isfinite(lo) or math.isfinite(hi):
        sign, end = (
            (">" if lo_open else ">=", lo) if math.isfinite(lo) else ("<" if hi_open else "<=", hi)
        )
        ok.expected = f"a finite number {sign} {end:g}"
    else:
        ok.expected = "a finite number"
    return ok


def integer(lo=1, optional=False, hi=math.inf):
    return lambda v: (v is None and optional) or (isinstance(v, int) and lo <= v <= hi)


def one_of(*choices):
    return lambda v: v in choices

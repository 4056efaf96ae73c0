"""Codecs over an explicit ANS message, in the manner of craystack (Townsend et al. 2020): the one place the ANS
stack (:func:`vaestream.coding.range_coder.ans_stack`, constriction's) is driven.

A :class:`Codec` is a pair of functions ``push(message, symbols) -> message`` and ``pop(message) -> (message,
symbols)``, each the other's inverse: pushing ``symbols`` and popping returns them and the message as it was.
The :class:`Message` is passed in and returned, never stored on an object, so one coder serves any number of
threads. Symbols are whole arrays: every primitive is ONE constriction call over all of them (per-symbol model
parameters as arrays), never a Python call per symbol.

* Primitives: :func:`Categorical` (rows of probabilities per symbol, or one fixed row), :func:`Bernoulli`,
  :func:`QuantizedGaussian` (per-symbol mean and std on an integer support), :func:`Autoregressive` (rows that
  depend on the symbols before: pushed in one call, popped one position at a time).
* Combinators: :func:`serial` (a list of codecs over a list of symbol arrays), :func:`dependent` (a head codec,
  then a tail codec that depends on the head's symbols), :func:`mapped` (a bijection of the symbols),
  :data:`Hold` (a symbol kept aside in the message rather than coded, for a prior that codes a whole frame's
  latents at once).
* :func:`BitsBack` (prior, likelihood, posterior): bits-back coding; both of its directions are derived from the
  one description, so they are mirror images by construction.

The message is constriction's :class:`~constriction.stream.stack.AnsCoder` (a stack: the last symbols pushed are
the first popped) and a tuple of held symbols; constriction mutates the stack in place, so a message must be
used once (the functions return it to make the data flow explicit).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from vaestream.coding import range_coder as rc


class Message(NamedTuple):
    """An ANS stack and the symbols :data:`Hold` keeps aside (last held = last in the tuple)."""

    ans: Any
    held: tuple = ()


class Codec(NamedTuple):
    """``push(message, symbols) -> message`` and its inverse ``pop(message) -> (message, symbols)``."""

    push: Callable[[Message, Any], Message]
    pop: Callable[[Message], tuple[Message, Any]]


def message(words: np.ndarray | None = None) -> Message:
    """A message whose stack holds ``words`` (uint32; the last word is the top), or an empty one."""
    return Message(rc.ans_stack(words))


def words(msg: Message) -> np.ndarray:
    """The message's stack as uint32 words (what :func:`message` takes back); held symbols are not included."""
    return np.asarray(msg.ans.get_compressed(), np.uint32)


def is_empty(msg: Message) -> bool:
    """Whether the message's stack holds nothing (and no symbol is held)."""
    return bool(msg.ans.is_empty()) and not msg.held


_MODELS: dict = {}


def _model(key: tuple, make: Callable[[], Any]) -> Any:
    """A constriction model, built once per process (the models are immutable; parameters come per call)."""
    m = _MODELS.get(key)
    if m is None:
        m = _MODELS.setdefault(key, make())
    return m


def Categorical(rows: np.ndarray | Callable[[], np.ndarray], n: int | None = None,  # noqa: N802 (a constructor)
                key: Any = None) -> Codec:
    """Symbols with per-symbol probability rows ``[N, K]`` (float, any positive scale; constriction turns each row
    into integer frequencies summing to 2^24, at least 1 each), or, with ``n``, ``n`` symbols of the one fixed row
    ``rows`` ``[K]`` (its model built once per process under ``key`` if given). Symbols are int32 ``[N]`` in
    0..K-1. ``rows`` may be a function that makes them: called at each push or pop and dropped right after the
    call (large rows then live only while coded, and the allocator reuses their memory)."""
    if n is not None:
        fixed = _model(("fixed", key), lambda: rc.categorical(rows)) if key is not None else rc.categorical(rows)

        def push(msg, x):
            msg.ans.encode_reverse(np.asarray(x, np.int32), fixed)
            return msg

        return Codec(push, lambda msg: (msg, msg.ans.decode(fixed, n)))
    model = _model(("categorical",), rc.categorical)
    make = rows if callable(rows) else lambda: rows

    def push(msg, x):
        msg.ans.encode_reverse(np.asarray(x, np.int32), model, make())
        return msg

    return Codec(push, lambda msg: (msg, msg.ans.decode(model, make())))


def Bernoulli(p1: np.ndarray) -> Codec:  # noqa: N802
    """Binary symbols with per-symbol P(1) ``[N]`` (float64)."""
    model = _model(("bernoulli",), rc.bernoulli)

    def push(msg, x):
        msg.ans.encode_reverse(np.asarray(x, np.int32), model, p1)
        return msg

    return Codec(push, lambda msg: (msg, msg.ans.decode(model, p1)))


def QuantizedGaussian(lo: int, hi: int, mean: np.ndarray, std: np.ndarray) -> Codec:  # noqa: N802
    """Integer symbols on [lo, hi] with per-symbol Gaussian mean and std ``[N]`` (float64)."""
    model = _model(("gaussian", int(lo), int(hi)), lambda: rc.quantized_gaussian(lo, hi))

    def push(msg, x):
        msg.ans.encode_reverse(np.asarray(x, np.int32), model, mean, std)
        return msg

    return Codec(push, lambda msg: (msg, msg.ans.decode(model, mean, std)))


def Autoregressive(rows_of: Callable[[np.ndarray], np.ndarray],  # noqa: N802
                   decode: Callable[[Callable[[np.ndarray], np.ndarray]], np.ndarray]) -> Codec:
    """Records of P positions each whose rows depend on the positions before: push takes int ``[N, P]`` and
    pushes it position-major in one call with ``rows_of(x)`` ``[N, P, K]`` (every position's rows, known from
    ``x``); pop runs ``decode(pop_position)``, which builds each position's rows ``[N, K]`` from the positions
    decoded so far and calls ``pop_position(rows) -> int [N]`` once per position, and returns ``[N, P]``."""
    model = _model(("categorical",), rc.categorical)

    def push(msg, x):
        rows = rows_of(x)
        msg.ans.encode_reverse(np.ascontiguousarray(np.asarray(x, np.int32).T).reshape(-1), model,
                               rows.transpose(1, 0, 2).reshape(-1, rows.shape[-1]))
        return msg

    def pop(msg):
        return msg, decode(lambda rows: msg.ans.decode(model, rows))

    return Codec(push, pop)


# ------------------------------------------------------------------------------------------------------------
# combinators
# ------------------------------------------------------------------------------------------------------------
def serial(codecs: Sequence[Codec]) -> Codec:
    """A list of codecs over a list of symbols: ``push`` pushes symbols[i] with codecs[i] for i = 0, 1, ...;
    ``pop`` pops them in the reverse order and returns them as a list in the original order."""
    codecs = list(codecs)

    def push(msg, xs):
        if len(xs) != len(codecs):
            raise ValueError(f"serial: {len(xs)} symbol arrays for {len(codecs)} codecs")
        for c, x in zip(codecs, xs):
            msg = c.push(msg, x)
        return msg

    def pop(msg):
        out = [None] * len(codecs)
        for i in range(len(codecs) - 1, -1, -1):
            msg, out[i] = codecs[i].pop(msg)
        return msg, out

    return Codec(push, pop)


def dependent(head: Codec, tail: Callable[[Any], Codec], split: Callable[[Any], tuple[Any, Any]],
              join: Callable[[Any, Any], Any]) -> Codec:
    """Symbols ``x`` split into ``(h, t) = split(x)``: ``h`` coded with ``head``, then ``t`` with ``tail(h)``
    (popped first: ``h``, so that ``tail`` can be built from it); ``pop`` returns ``join(h, t)``."""

    def push(msg, x):
        h, t = split(x)
        return head.push(tail(h).push(msg, t), h)

    def pop(msg):
        msg, h = head.pop(msg)
        msg, t = tail(h).pop(msg)
        return msg, join(h, t)

    return Codec(push, pop)


def mapped(codec: Codec, forward: Callable[[Any], Any], inverse: Callable[[Any], Any]) -> Codec:
    """``codec`` over ``forward(x)``: pushes ``forward(x)``, pops ``inverse`` of what ``codec`` pops (``forward``
    a bijection, ``inverse`` its inverse)."""
    return Codec(lambda msg, x: codec.push(msg, forward(x)),
                 lambda msg: (lambda m, y: (m, inverse(y)))(*codec.pop(msg)))


def _hold_push(msg: Message, x: Any) -> Message:
    return msg._replace(held=msg.held + (x,))


def _hold_pop(msg: Message) -> tuple[Message, Any]:
    if not msg.held:
        raise ValueError("nothing held to pop")
    return msg._replace(held=msg.held[:-1]), msg.held[-1]


Hold = Codec(_hold_push, _hold_pop)
"""Keeps the symbols aside in the message (costs no bits, writes nothing): what a frame's latents are pushed
with when their prior codes the whole frame at once, after the last group (:func:`released`)."""


def released(codec: Codec, prior: Codec) -> Codec:
    """``codec`` on a message with nothing held, then everything it held pushed with ``prior`` in one go
    (``prior`` codes the tuple of held symbols); ``pop`` pops the tuple with ``prior``, holds it and runs
    ``codec``'s pop, which must take every held symbol back."""

    def push(msg, x):
        msg = codec.push(msg._replace(held=()), x)
        return prior.push(msg._replace(held=()), msg.held)

    def pop(msg):
        msg, held = prior.pop(msg)
        msg, x = codec.pop(msg._replace(held=tuple(held)))
        if msg.held:
            raise ValueError(f"{len(msg.held)} held symbols left over")
        return msg, x

    return Codec(push, pop)


def BitsBack(prior: Codec, likelihood: Callable[[Any], Codec],  # noqa: N802
             posterior: Callable[[Any], Codec]) -> Codec:
    """Bits-back coding of ``x`` with a latent ``z`` (Townsend, Bird & Barber 2019): ``prior`` codes z,
    ``likelihood(z)`` codes x, ``posterior(x)`` codes z.

    push: pop z with Q(z|x) (takes bits off the message), push x with P(x|z), push z with P(z);
    pop:  pop z with P(z), pop x with P(x|z), push z with Q(z|x) (the bits borrowed, given back).

    A deeper model is the same function with a :func:`BitsBack` as the prior (Bit-Swap order)."""

    def push(msg, x):
        msg, z = posterior(x).pop(msg)
        msg = likelihood(z).push(msg, x)
        return prior.push(msg, z)

    def pop(msg):
        msg, z = prior.pop(msg)
        msg, x = likelihood(z).pop(msg)
        return posterior(x).push(msg, z), x

    return Codec(push, pop)

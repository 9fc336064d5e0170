"""Run one rank's pipeline action list: call the step functions and move tensors through ``p2p``.

The executor owns only bookkeeping: which (chunk, micro-batch) tensors are alive between forward and
backward, which message tag each send/receive uses, and which sends and receives are posted together
(each run of consecutive communication actions is one batch, ``schedules.comm_batches``). Model code lives in ``forward_step`` /
``backward_step``; transport (shape handshake, device staging) lives in the ``p2p`` object.

Message tags: ``tag = (microbatch * MAX_CHUNKS + receiver_chunk) * 2 + direction`` with direction 0 for
forward activations and 1 for backward gradients, and ``receiver_chunk`` the model chunk that consumes
the message on the receiving rank (``Action.chunk`` for a receive, ``Action.peer_chunk`` for a send).
Both sides compute it from the same three numbers, so a message can never be taken by the wrong
receive even when one rank pair carries activations and gradients of several chunks.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from megahet.errors import MegahetError
from megahet.parallel.schedules import Action, comm_batches

__all__ = ["execute_schedule", "message_tag", "MAX_CHUNKS", "P2P"]

MAX_CHUNKS = 1024
_MAX_TAG = (2**31 - 1) // 4  # wire tags are 4 x this + kind (boundary.header_tag): all fit in 31 bits


class P2P(Protocol):
    """Point-to-point transport one rank uses.

    ``exchange`` posts every send and receive of one batch together and returns when all have
    completed (the received tensors, in ``recvs`` order); receivers learn shapes by themselves.
    Posting a step's sends and receives together is what keeps rendezvous libraries (NCCL, HCCL),
    where a send waits for its receive, free of deadlock.
    """

    def exchange(self, sends: list[tuple[torch.Tensor, int, int]],
                 recvs: list[tuple[int, int]]) -> list[torch.Tensor]: ...


def message_tag(direction: str, receiver_chunk: int, microbatch: int) -> int:
    """Tag of the message for ``receiver_chunk``/``microbatch``; ``direction`` is "fwd" or "bwd"."""
    if direction not in ("fwd", "bwd") or not 0 <= receiver_chunk < MAX_CHUNKS or microbatch < 0:
        raise MegahetError(f"no message tag for direction={direction!r} chunk={receiver_chunk} "
                           f"microbatch={microbatch}; use fewer than {MAX_CHUNKS} model chunks per rank")
    tag = (microbatch * MAX_CHUNKS + receiver_chunk) * 2 + (direction == "bwd")
    if tag > _MAX_TAG:
        raise MegahetError(f"micro-batch {microbatch} overflows the 31-bit message tag; lower "
                           f"--global-batch-size or raise --micro-batch-size")
    return tag


def _tag(action: Action) -> int:
    direction = "fwd" if action.op in ("send_fwd", "recv_fwd") else "bwd"
    receiver_chunk = action.peer_chunk if action.op.startswith("send") else action.chunk
    return message_tag(direction, receiver_chunk, action.microbatch)


def _deallocate(out: torch.Tensor) -> None:
    """Free an output's memory after sending it, keeping its autograd node and shape.

    A zero-stride view of one element keeps ``out.shape`` (so ``torch.autograd.backward`` still accepts
    the full-size gradient) while the activation storage is released once the send completes. Only
    for non-view tensors: replacing a view's data would not free its base.
    """
    if out.requires_grad and out._base is None and out.numel() > 1:
        out.data = torch.empty((), dtype=out.dtype, device=out.device).expand(out.shape)


def execute_schedule(actions: list[Action], *,
                     forward_step: Callable[[int, int, torch.Tensor | None], torch.Tensor],
                     backward_step: Callable[..., torch.Tensor | None],
                     p2p: P2P, tracer=None, deallocate_outputs: bool = True) -> None:
    """Execute one rank's actions in order, each run of send/recv actions as one batch.

    Args:
        actions: this rank's list from ``megahet.parallel.schedules`` (validated there).
        forward_step: ``(chunk, mb, input_tensor | None) -> output``; the last virtual stage returns the
            scalar loss to backprop. ``input_tensor`` is None where the chunk reads data.
        backward_step: ``(chunk, mb, input_tensor, output_tensor, output_grad) -> input_tensor.grad``;
            runs ``torch.autograd.backward(output_tensor, grad_tensors=output_grad)``.
        p2p: ``exchange(sends, recvs) -> received`` (see ``P2P``), called once per batch of
            ``comm_batches(actions)``, operations in that batch's order.
        tracer: optional object with ``begin(action)`` / ``end(action)``.
        deallocate_outputs: free sent activations' memory early (see ``_deallocate``).
    """
    needs_input = {(a.chunk, a.microbatch) for a in actions if a.op == "recv_fwd"}
    needs_grad = {(a.chunk, a.microbatch) for a in actions if a.op == "recv_bwd"}
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    grads_in: dict[tuple[int, int], torch.Tensor] = {}   # received d(loss)/d(output)
    grads_out: dict[tuple[int, int], torch.Tensor | None] = {}  # d(loss)/d(input) to send back
    for item in comm_batches(actions):
        batch = (item,) if isinstance(item, Action) else item
        if tracer is not None:
            for action in batch:
                tracer.begin(action)
        if isinstance(item, Action):
            key = (item.chunk, item.microbatch)
            if item.op == "fwd":
                if key in needs_input and key not in inputs:
                    raise MegahetError(f"pipeline action {item} runs before its input was received")
                outputs[key] = forward_step(item.chunk, item.microbatch, inputs.get(key))
            else:
                if key in needs_grad and key not in grads_in:
                    raise MegahetError(f"pipeline action {item} runs before its output gradient was received")
                # Drop references now: the activations of this micro-batch are no longer needed.
                grads_out[key] = backward_step(item.chunk, item.microbatch, inputs.pop(key, None),
                                               outputs.pop(key), grads_in.pop(key, None))
        else:
            _exchange(item, p2p, outputs, inputs, grads_out, grads_in, deallocate_outputs)
        if tracer is not None:
            for action in batch:
                tracer.end(action)


def _exchange(batch: tuple[Action, ...], p2p: P2P, outputs, inputs, grads_out, grads_in,
              deallocate_outputs: bool) -> None:
    """Post one batch's sends and receives together; file the received tensors."""
    sends, recvs, sent_outputs = [], [], []
    for action in batch:
        key = (action.chunk, action.microbatch)
        if action.op == "send_fwd":
            sends.append((outputs[key].detach(), action.peer, _tag(action)))
            sent_outputs.append(outputs[key])
        elif action.op == "send_bwd":
            grad = grads_out.pop(key)
            if grad is None:
                raise MegahetError(f"pipeline action {action}: backward_step returned no input gradient; "
                                   f"return input_tensor.grad")
            sends.append((grad, action.peer, _tag(action)))
        else:
            recvs.append((action, (action.peer, _tag(action))))
    received = p2p.exchange(sends, [r for _, r in recvs])
    for (action, _), tensor in zip(recvs, received):
        key = (action.chunk, action.microbatch)
        if action.op == "recv_fwd":
            # A detached leaf, so this rank's backward stops here and yields the grad to send back.
            inputs[key] = tensor.detach().requires_grad_()
        else:
            grads_in[key] = tensor
    if deallocate_outputs:  # the batch has completed, so the sent data is no longer needed
        for out in sent_outputs:
            _deallocate(out)

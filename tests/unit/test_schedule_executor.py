"""Executor and tracer: a real tiny pipeline with one thread per rank, checked against a sequential run."""
import json
import sys
import threading
import time

import pytest
import torch

from megahet.errors import MegahetError
from megahet.parallel.schedule_executor import execute_schedule, message_tag
from megahet.parallel.schedule_trace import (ScheduleTracer, TraceEvent, bubble_fraction, theoretical_bubble,
                                             to_chrome_trace, write_chrome_trace, write_timeline_png)
from megahet.parallel.schedules import Action, build_schedule
from megahet.testing_p2p import RendezvousNetwork

HIDDEN, BATCH = 8, 3


def make_layers(n_stages):
    torch.manual_seed(0)
    return [torch.nn.Linear(HIDDEN, HIDDEN).double() for _ in range(n_stages)]


def stage_forward(layer, x):
    return layer(torch.tanh(x))  # [b, h]; the sent output is not saved by autograd, so it can be freed


def reference_grads(layers, data):
    """The same layers as one sequential module, one backward per micro-batch in micro-batch order."""
    for mb in range(len(data)):
        x = data[mb]
        for layer in layers:
            x = stage_forward(layer, x)
        (x ** 2).mean().backward()
    return [(layer.weight.grad.clone(), layer.bias.grad.clone()) for layer in layers]


def run_pipeline(name, pp, m, chunks, deallocate=True):
    """Run the schedule with one thread per rank; virtual stage c * pp + r lives on rank r as chunk c."""
    n_stages = pp * chunks
    layers = make_layers(n_stages)
    torch.manual_seed(1)
    data = [torch.randn(BATCH, HIDDEN, dtype=torch.double) for _ in range(m)]
    schedule = build_schedule(name, pp, m, chunks)
    network, errors, sent_outputs = RendezvousNetwork(pp), [], []
    start = time.perf_counter()
    tracers = [ScheduleTracer(r, start) for r in range(pp)]

    def rank_main(rank):
        def forward_step(chunk, mb, inp):
            stage = chunk * pp + rank
            assert (inp is None) == (stage == 0)
            out = stage_forward(layers[stage], data[mb] if inp is None else inp)
            if stage == n_stages - 1:
                return (out ** 2).mean()
            sent_outputs.append(out)
            return out

        def backward_step(chunk, mb, inp, out, out_grad):
            torch.autograd.backward(out, grad_tensors=out_grad)
            return None if inp is None else inp.grad

        try:
            execute_schedule(schedule[rank], forward_step=forward_step, backward_step=backward_step,
                             p2p=network.endpoint(rank), tracer=tracers[rank],
                             deallocate_outputs=deallocate)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(pp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "pipeline threads hung"
    if errors:
        raise errors[0]
    assert len(network.log) == len(set(network.log)), "a (src, dst, tag) was reused"
    assert not network.unmatched(), "a message was never received"
    grads = [(layer.weight.grad, layer.bias.grad) for layer in layers]
    expected = reference_grads(make_layers(n_stages), data)
    return grads, expected, tracers, schedule, sent_outputs


@pytest.mark.parametrize("name, pp, m, chunks", [("1f1b", 1, 3, 1), ("1f1b", 2, 4, 1), ("1f1b", 4, 6, 1),
                                                 ("afab", 3, 2, 1), ("interleaved", 2, 4, 2),
                                                 ("interleaved", 3, 6, 2), ("interleaved", 2, 2, 3)])
def test_pipeline_gradients_match_sequential(name, pp, m, chunks):
    grads, expected, tracers, schedule, sent = run_pipeline(name, pp, m, chunks)
    assert len(grads) == pp * chunks
    for (gw, gb), (ew, eb) in zip(grads, expected):
        torch.testing.assert_close(gw, ew, rtol=0, atol=1e-6)
        torch.testing.assert_close(gb, eb, rtol=0, atol=1e-6)
    # Every sent activation was freed after its send (one element left), keeping its shape.
    assert len(sent) == m * (pp * chunks - 1)
    assert all(out.untyped_storage().nbytes() == out.element_size() and out.shape == (BATCH, HIDDEN)
               for out in sent)
    for tracer, actions in zip(tracers, schedule):
        assert sorted(e.name for e in tracer.events) == sorted(str(a) for a in actions)
        assert all(0 <= e.start <= e.end for e in tracer.events)


def test_pipeline_without_deallocation_matches_too():
    grads, expected, _, _, sent = run_pipeline("interleaved", 2, 4, 2, deallocate=False)
    for (gw, gb), (ew, eb) in zip(grads, expected):
        torch.testing.assert_close(gw, ew, rtol=0, atol=1e-6)
        torch.testing.assert_close(gb, eb, rtol=0, atol=1e-6)
    assert all(out.untyped_storage().nbytes() == out.numel() * out.element_size() for out in sent)


def test_message_tags_are_unique_per_link():
    schedule = build_schedule("interleaved", 4, 8, 3)
    seen = set()
    for rank, actions in enumerate(schedule):
        for a in actions:
            if a.op in ("send_fwd", "send_bwd"):
                key = (rank, a.peer, message_tag(a.op[5:], a.peer_chunk, a.microbatch))
                assert key not in seen
                seen.add(key)
    assert message_tag("fwd", 0, 0) == 0 and message_tag("bwd", 0, 0) == 1
    assert message_tag("fwd", 3, 2) == (2 * 1024 + 3) * 2
    # Wire tags (4 x tag + kind: header, data, the link throttle's stamp) stay within 31 bits.
    from megahet.parallel.boundary import data_tag, header_tag
    from megahet.parallel.link_throttle import stamp_tag
    largest = message_tag("bwd", 1023, 2**18 - 1)
    assert stamp_tag(data_tag(largest)) <= 2**31 - 1
    wire = {header_tag(t) for t in range(64)} | {data_tag(t) for t in range(64)}
    assert len(wire) == 128 and not wire & ({stamp_tag(data_tag(t)) for t in range(64)} | {stamp_tag(0)})
    with pytest.raises(MegahetError, match="31-bit message tag"):
        message_tag("fwd", 0, 2**18)


def test_executor_rejects_forward_before_receive():
    actions = [Action("fwd", 0, 0), Action("recv_fwd", 0, 0, peer=0, peer_chunk=0)]
    with pytest.raises(MegahetError, match="before its input was received"):
        execute_schedule(actions, forward_step=lambda c, mb, x: x, backward_step=None, p2p=None)


def synthetic_events():
    return [[TraceEvent("F0c0", "fwd", 0.0, 1.0), TraceEvent("B0c0", "bwd", 2.0, 4.0)],
            [TraceEvent("F0c0", "fwd", 1.0, 2.0), TraceEvent("RB0c0<0", "comm", 2.0, 3.0),
             TraceEvent("B0c0", "bwd", 3.0, 4.5)]]


def test_bubble_fraction_by_hand():
    # Span 0..4.5; rank 0 busy 3 -> 1/3 idle, rank 1 busy 2.5 (comm is idle) -> 4/9 idle.
    assert bubble_fraction(synthetic_events()) == pytest.approx((1 / 3 + 4 / 9) / 2)
    with pytest.raises(MegahetError, match="no fwd/bwd events"):
        bubble_fraction([[TraceEvent("SF0c0>1", "comm", 0.0, 1.0)]])


def test_theoretical_bubble():
    assert theoretical_bubble(4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble(4, 8, chunks=2) == pytest.approx(3 / 19)
    assert theoretical_bubble(1, 8) == 0.0


def test_chrome_trace_is_well_formed(tmp_path):
    path = tmp_path / "trace.json"
    write_chrome_trace(path, synthetic_events())
    trace = json.loads(path.read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 5
    assert {e["pid"] for e in spans} == {0, 1} and all(e["pid"] == e["tid"] for e in spans)
    assert {e["cat"] for e in spans} == {"fwd", "bwd", "comm"}
    b = next(e for e in spans if e["pid"] == 1 and e["name"] == "B0c0")
    assert b["ts"] == pytest.approx(3e6) and b["dur"] == pytest.approx(1.5e6)
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"]
    assert names == ["pp rank 0", "pp rank 1"]
    assert to_chrome_trace([[]])["traceEvents"][0]["ph"] == "M"


def test_timeline_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "timeline.png"
    write_timeline_png(path, synthetic_events())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_png_without_matplotlib_names_the_fix(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MegahetError, match="pip install matplotlib"):
        write_timeline_png(tmp_path / "x.png", synthetic_events())

"""Both cross-entropy paths (one TP rank: fused log-softmax written over the logits; sharded: the
Megatron max/exp/sum path) give F.cross_entropy's losses and logits gradients, padding included."""
import pytest
import torch
import torch.nn.functional as F

from megahet.parallel.context import single_process_context
from megahet.parallel.tensor_parallel import _VocabParallelCrossEntropy, vocab_parallel_cross_entropy

TOL = dict(atol=1e-5, rtol=1e-5)


def _case(dtype, padded, vocab=50):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 3, padded, generator=gen) * 4).to(dtype)  # [s, b, v_pad]
    labels = torch.randint(0, vocab, (6, 3), generator=gen)  # [s, b]
    weights = torch.rand(6, 3, generator=gen)  # a loss mask / token weighting
    return logits, labels, weights


def _reference(logits, labels, weights, vocab):
    x = logits.detach().float().requires_grad_()
    loss = F.cross_entropy(x[..., :vocab].reshape(-1, vocab), labels.reshape(-1), reduction="none").view(6, 3)
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


def _ours(fn, logits, labels, weights):
    leaf = logits.detach().requires_grad_()
    out = fn(leaf * 1)  # a non-leaf, as the output layer's logits (the kernel writes over them)
    (out * weights).sum().backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [50, 64])
def test_both_paths_match_torch_cross_entropy(dtype, padded):
    group = single_process_context("cpu").tp_group
    logits, labels, weights = _case(dtype, padded)
    ref_loss, ref_grad = _reference(logits, labels, weights, 50)
    paths = {"local": lambda x: vocab_parallel_cross_entropy(x, labels, group, 0, 50),
             "sharded": lambda x: _VocabParallelCrossEntropy.apply(x, labels, group, 0, 50)}
    for name, fn in paths.items():
        loss, grad = _ours(fn, logits, labels, weights)
        torch.testing.assert_close(loss, ref_loss, **TOL, msg=name)
        assert grad.dtype == dtype
        assert torch.all(grad[..., 50:] == 0), name  # padding columns never get a gradient
        tol = TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(grad[..., :50].float(), ref_grad[..., :50], **tol, msg=name)


def test_the_local_path_reuses_the_logits_storage():
    group = single_process_context("cpu").tp_group
    logits, labels, _ = _case(torch.float32, 64)
    x = logits.clone().requires_grad_() * 1  # [s, b, v], as the output layer's logits
    seen = []
    x.register_hook(lambda grad: seen.append(grad.data_ptr()))
    vocab_parallel_cross_entropy(x, labels, group, 0, 50).sum().backward()
    # The logits' gradient is written where the logits were: no second logits-sized tensor.
    assert seen == [x.data_ptr()]

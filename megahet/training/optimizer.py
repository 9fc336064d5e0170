"""AdamW on fp32 master weights, with loss-scale unscaling, a job-wide skip on inf/nan and clipping.

Every bf16/fp16 parameter gets a separate fp32 master copy, and the model's params are only written
by casting the masters back. An fp32 parameter is its own master (a second copy would double the
model's memory and cost a copy back after every step for identical bits). Gradients are
the data-parallel buffers' fp32 `main_grad` (megahet.parallel.data_parallel), already summed over
replicas. Weight decay follows Megatron: none for biases and 1-D params (norms), decay for the rest,
embeddings included.

Checkpoints are layout-independent: `state_by_name` returns full (unsharded) fp32 tensors keyed by
`param.global_name`, and `load_state_by_name` slices them for whatever layout loads them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from megahet.errors import MegahetError
from megahet.parallel.sharding import gather_param_full, shard_param_full
from megahet.training.grad_norm import clip_grads, found_inf, global_grad_norm
from megahet.training.loss_scaler import ConstantLossScaler

log = logging.getLogger("megahet")

OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


class _NoTimer:
    def start(self):
        pass

    def stop(self):
        pass


_NO_TIMER = _NoTimer()


@dataclass
class StepResult:
    """What one optimizer step did. `grad_norm` is NaN when the step was skipped."""
    ok: bool
    grad_norm: float
    found_inf: bool


@dataclass
class Piece:
    """The part of one param this rank optimises: elements [lo, hi) of the flattened param.

    master and grad are fp32; for the non-sharded optimizer they cover the whole param (param's shape).
    `aliased`: master is a view of the (fp32) param itself, so nothing is copied back after a step.
    """
    param: nn.Parameter
    master: torch.Tensor
    grad: torch.Tensor
    lo: int
    hi: int
    aliased: bool = False


def fp32_master(param: torch.Tensor, lo: int, hi: int):
    """(master, aliased) for elements [lo, hi) of `param`: a view when param is fp32, else an fp32 copy."""
    flat = param.detach().reshape(-1)[lo:hi]  # [hi-lo]
    if param.dtype == torch.float32 and param.is_contiguous():
        return flat, True
    return flat.float().clone(), False


def optimizer_flags(implementation: str, device: torch.device) -> Dict[str, bool]:
    """torch.optim.AdamW keyword for --optimizer-implementation on this device.

    auto: the fused kernel where torch has one for the device type (CPU, CUDA and the registered
    accelerator backend in torch >= 2.4), else the multi-tensor (foreach) one, else the loop.
    """
    if implementation not in OPTIMIZER_IMPLEMENTATIONS:
        raise MegahetError(f"--optimizer-implementation {implementation!r} must be one of {list(OPTIMIZER_IMPLEMENTATIONS)}")
    if implementation == "auto":
        from torch.utils import _foreach_utils as fu  # torch's own list of device types with these kernels
        if device.type in fu._get_fused_kernels_supported_devices():
            implementation = "fused"
        elif device.type in fu._get_foreach_kernels_supported_devices():
            implementation = "foreach"
        else:
            implementation = "for-loop"
    return {"fused": {"fused": True, "foreach": False}, "foreach": {"fused": False, "foreach": True},
            "for-loop": {"fused": False, "foreach": False}}[implementation]


def no_weight_decay(param: torch.Tensor) -> bool:
    """Megatron's rule: biases and 1-D params (norm weights) are not decayed."""
    return param.ndim == 1 or getattr(param, "global_name", "").endswith(".bias")


def _check_hyperparameters(lr, weight_decay, betas, eps, clip_grad) -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise MegahetError(f"--lr {lr} must be a finite number >= 0")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise MegahetError(f"--weight-decay {weight_decay} must be a finite number >= 0")
    for flag, beta in zip(("--adam-beta1", "--adam-beta2"), betas):
        if not 0 <= beta < 1:
            raise MegahetError(f"{flag} {beta} must be in [0, 1)")
    if not eps > 0:
        raise MegahetError(f"--adam-eps {eps} must be > 0")
    if not (math.isfinite(clip_grad) and clip_grad >= 0):
        raise MegahetError(f"--clip-grad {clip_grad} must be a finite number >= 0 (0 turns clipping off)")


class MixedPrecisionOptimizer:
    """AdamW over fp32 masters of this rank's params; grads come from `ddp` (all-reduced main_grad).

    Args:
        model_chunks: this rank's model chunks (the same list given to DataParallel).
        ddp: the DataParallel that owns the gradient buffers.
        ctx: parallel context (the world group takes the norm and found-inf reductions).
        lr: initial learning rate (an LRScheduler then sets `param_groups[i]["lr"]` each step).
        weight_decay, betas, eps: AdamW hyperparameters.
        clip_grad: clip the global gradient norm to this (0: off).
        params_dtype: the model's parameter dtype (masters are fp32 whatever it is).
        loss_scaler: Constant/DynamicLossScaler; the backward loss was multiplied by its scale.
        implementation: AdamW kernel, one of OPTIMIZER_IMPLEMENTATIONS (--optimizer-implementation).
    """

    sharded_over_dp = False

    def __init__(self, model_chunks: Sequence[nn.Module], ddp, ctx, *, lr: float, weight_decay: float = 0.0,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, clip_grad: float = 0.0,
                 params_dtype: torch.dtype = torch.float32, loss_scaler=None, implementation: str = "auto"):
        _check_hyperparameters(lr, weight_decay, betas, eps, clip_grad)
        self.ctx, self.ddp = ctx, ddp
        self.clip_grad = float(clip_grad)
        self.params_dtype = params_dtype
        self.loss_scaler = loss_scaler if loss_scaler is not None else ConstantLossScaler(1.0)
        if params_dtype == torch.float16 and self.loss_scaler.scale == 1.0 and not self.loss_scaler.dynamic:
            log.warning("fp16 parameters without loss scaling: small gradients will underflow")
        in_chunks = {id(p) for chunk in model_chunks for p in chunk.parameters() if p.requires_grad}
        missing = in_chunks - {id(p) for p in ddp.params}
        if missing:
            raise ValueError(f"{len(missing)} trainable params have no gradient buffer: build DataParallel "
                             f"over the same model chunks as the optimizer")
        self.params: List[nn.Parameter] = list(ddp.params)  # the buffers' order: the same on every rank
        self.num_steps = 0  # successful (not skipped) steps
        self.pieces: List[Piece] = self._build_pieces()
        decay = [pc.master for pc in self.pieces if not no_weight_decay(pc.param)]
        no_decay = [pc.master for pc in self.pieces if no_weight_decay(pc.param)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # A rank that owns nothing still needs a valid torch optimizer (and two groups for the scheduler).
        for g in groups:
            if not g["params"]:
                g["params"] = [torch.zeros(0, dtype=torch.float32, device=ctx.device)]
        self.flags = optimizer_flags(implementation, torch.device(ctx.device))
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                           **self.flags)

    # ------------------------------------------------------------------ layout (overridden by ZeRO-1)
    def _build_pieces(self) -> List[Piece]:
        out = []
        for p in self.params:
            master, aliased = fp32_master(p, 0, p.numel())
            out.append(Piece(p, master.view_as(p), p.main_grad, 0, p.numel(), aliased))
        return out

    @torch.no_grad()
    def _copy_masters_to_params(self) -> None:
        for pc in self.pieces:
            if not pc.aliased:
                pc.param.copy_(pc.master)  # cast to the param dtype

    def _local_state(self) -> Dict[int, Dict[str, torch.Tensor]]:
        """id(param) -> this rank's (TP/EP-sharded, DP-complete) fp32 master and Adam state, param-shaped."""
        return {id(pc.param): {k: self._state_of(pc, k) for k in STATE_KEYS} for pc in self.pieces}

    @torch.no_grad()
    def _load_local_state(self, local: Dict[int, Dict[str, torch.Tensor]]) -> None:
        for pc in self.pieces:
            self._set_piece_state(pc, {k: v.reshape(-1)[pc.lo:pc.hi] for k, v in local[id(pc.param)].items()})

    # ------------------------------------------------------------------ shared
    def _state_of(self, pc: Piece, key: str) -> torch.Tensor:
        if key == "master":
            return pc.master
        st = self.optimizer.state.get(pc.master, {})
        return st[key] if key in st else torch.zeros_like(pc.master)

    def _set_piece_state(self, pc: Piece, flat: Dict[str, torch.Tensor]) -> None:
        """Set a piece's master and Adam state from flat fp32 slices of its elements [lo, hi)."""
        pc.master.copy_(flat["master"].view_as(pc.master))
        self.optimizer.state[pc.master] = {
            # The fused kernel reads the step count on the params' device, the others on the host.
            "step": torch.tensor(float(self.num_steps), dtype=torch.float32,
                                 device=pc.master.device if self.flags["fused"] else None),
            "exp_avg": flat["exp_avg"].reshape(pc.master.shape).to(pc.master).clone(),
            "exp_avg_sq": flat["exp_avg_sq"].reshape(pc.master.shape).to(pc.master).clone()}

    @property
    def param_groups(self) -> list:
        """The torch optimizer's groups (LRScheduler sets their "lr")."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.ddp.zero_grad()

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 masters from the model params (after loading weights without optimizer state).

        Adam state is kept. Without this, the next step would write the stale masters back.
        """
        for pc in self.pieces:
            if not pc.aliased:
                pc.master.copy_(pc.param.detach().reshape(-1)[pc.lo:pc.hi].view_as(pc.master))

    @torch.no_grad()
    def step(self, timers=None) -> StepResult:
        """Unscale, skip everywhere on inf/nan, clip by the global norm, AdamW, write params back.

        Without loss scaling the gradient norm (needed anyway) decides the skip: it is finite exactly
        when every counted gradient element is (replicated copies hold the same values after the
        reductions), so no separate pass over the gradients. A norm that overflows fp32 (above ~1e19)
        also counts as non-finite; clipping would have zeroed such a step anyway. With a loss scale,
        the grads are unscaled and checked per tensor first, as Megatron does for fp16.

        Call after `ddp.finish_grad_sync()`. `timers` (optional Timers) times "norm-clip" (unscale,
        checks, norm, clipping) and "optimizer" (AdamW and the copy back to the params).
        """
        timer = timers if timers is not None else (lambda name: _NO_TIMER)
        timer("norm-clip").start()
        result = self._unscale_check_clip()
        timer("norm-clip").stop()
        if not result.ok:
            return result
        timer("optimizer").start()
        for pc in self.pieces:
            pc.master.grad = pc.grad
        self.optimizer.step()
        for pc in self.pieces:
            pc.master.grad = None
        self.num_steps += 1
        self._copy_masters_to_params()
        timer("optimizer").stop()
        return result

    def _unscale_check_clip(self) -> StepResult:
        """The skip decision (agreed by every rank) and clipping; `ok` False means skip this step."""
        grads = [pc.grad for pc in self.pieces]
        scale = float(self.loss_scaler.scale)
        scaled = scale != 1.0 or self.loss_scaler.dynamic
        if scaled:
            if scale != 1.0 and grads:
                torch._foreach_mul_(grads, 1.0 / scale)
            if found_inf(grads, self.ctx):
                self.loss_scaler.update(True)
                return StepResult(ok=False, grad_norm=float("nan"), found_inf=True)
        norm = global_grad_norm([pc.param for pc in self.pieces], self.ctx, grads, self.sharded_over_dp)
        if not scaled and not math.isfinite(norm):
            self.loss_scaler.update(True)
            return StepResult(ok=False, grad_norm=float("nan"), found_inf=True)
        self.loss_scaler.update(False)
        if self.clip_grad > 0:
            clip_grads(grads, self.clip_grad, norm)
        return StepResult(ok=True, grad_norm=norm, found_inf=False)

    # ------------------------------------------------------------------ checkpoints
    def owned_state(self) -> Iterator[Tuple[nn.Parameter, int, int, Dict[str, torch.Tensor]]]:
        """(param, lo, hi, {state key: flat fp32 [hi - lo]}) of every piece this rank optimises: elements
        [lo, hi) of the flattened local param. No collective; sharded checkpoints store exactly these."""
        for pc in self.pieces:
            yield pc.param, pc.lo, pc.hi, {k: self._state_of(pc, k).reshape(-1) for k in STATE_KEYS}

    @torch.no_grad()
    def load_owned_state(self, read_piece: Callable, num_steps: int) -> None:
        """Inverse of `owned_state`: `read_piece(param, lo, hi) -> {key: flat fp32 [hi - lo]}` is called one
        piece at a time (bounded memory). The params are not touched: checkpoints load them directly
        (they equal the masters cast to the param dtype)."""
        self.num_steps = int(num_steps)
        for pc in self.pieces:
            self._set_piece_state(pc, read_piece(pc.param, pc.lo, pc.hi))

    @torch.no_grad()
    def state_by_name(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Full fp32 master and Adam state of every param this rank holds, keyed by global name.

        Each value is {"master", "exp_avg", "exp_avg_sq"} (full unsharded tensors; zeros before the
        first step) plus "step" (scalar tensor: successful steps so far). A collective: every rank of
        the job calls it. A tied embedding's two copies (first and last stage) carry identical state.
        """
        local = self._local_state()
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        step = torch.tensor(float(self.num_steps))
        for p in self.params:
            full = {k: gather_param_full(v, p, self.ctx).detach().float().clone() for k, v in local[id(p)].items()}
            full["step"] = step.clone()
            out[p.global_name] = full
        return out

    @torch.no_grad()
    def load_state_by_name(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Load full tensors written by `state_by_name` (any layout); also sets the model params."""
        local: Dict[int, Dict[str, torch.Tensor]] = {}
        steps = set()
        for p in self.params:
            name = p.global_name
            if name not in states:
                raise MegahetError(f"the checkpoint has no optimizer state for {name}; load a checkpoint of "
                                   f"the same model architecture (or do not load optimizer state)")
            st = states[name]
            local[id(p)] = {}
            for k in STATE_KEYS:
                piece = shard_param_full(st[k].to(device=p.device, dtype=torch.float32), p, self.ctx)
                if tuple(piece.shape) != tuple(p.shape):
                    raise MegahetError(f"optimizer state {k} of {name} has full shape {tuple(st[k].shape)}, "
                                       f"which does not fit this model's {tuple(p.shape)} shard; check --load "
                                       f"matches the model flags")
                local[id(p)][k] = piece
            steps.add(int(float(st["step"])))
        if len(steps) > 1:
            raise MegahetError(f"the checkpoint's optimizer state mixes step counts {sorted(steps)}; it is corrupt")
        self.num_steps = steps.pop() if steps else 0
        self._load_local_state(local)
        self._copy_masters_to_params()

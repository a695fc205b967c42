"""The torch.library ops of fusedlayers: schemas, fake implementations, autograd formulas.

Every public op runs through one of three op pairs in namespace ``fusedlayers``:

====================  ======================================================================
``attention_fwd``     (q, k, v, attn_mask?, seed?, scale, causal, bottom_right, dropout_p,
                      deterministic, backend, window_left, window_right, softcap,
                      alibi_slopes?, sinks?, dropout_layout?) -> (out (B,Hq,Nq,Dv), lse
                      (B,Hq,Nq) fp32)
``attention_bwd``     (dout, dlse, q, k, v, attn_mask?, out, lse, seed?, ..., bias_grad,
                      backend, <the variants>, sinks_grad, dropout_layout?) -> (dq, dk, dv,
                      dbias: mask's shape, or empty, dsinks (Hq,) or empty)
``varlen_fwd``        (q (Tq,Hq,D), k, v (Tk,Hkv,D), cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, seed?, ...) -> (out (Tq,Hq,Dv), lse (Hq,Tq))
``varlen_bwd``        -> (dq, dk, dv, dsinks)
``norm_fwd``          (x (M,N), residual?, weight?, bias?, seed?, eps, dropout_p, rms, prenorm,
                      residual_in_fp32, backend, needs_grad=True) -> (y (M,N), z, mean (M,), rstd (M,))
``norm_bwd``          (dy, dz?, zin, weight?, bias?, mean, rstd, seed?, eps, dropout_p, rms,
                      x_dtype, residual_dtype?, backend) -> (dx, dresidual, dweight, dbias)
====================  ======================================================================

Conventions every backend keeps: outputs are new contiguous tensors; ``attn_mask`` is
4-D, each dim either 1 (broadcast) or full size; ``lse`` is float32, natural log, -inf on
rows that see no key (the sink's logit when there is one); the score variants
(``ScoreMods``: window, softcap, ALiBi, sinks) reach a backend as one argument; sinks are
joined to the (out, lse) of a backend that does not take them itself (``join_sinks``), and
their gradient comes from the final (out, lse) (``sinks_gradient``); ``seed`` is a CPU int64 scalar drawn from torch's default generator
when ``dropout_p > 0`` (the backend turns it into its own keep-mask and regenerates the
same mask in backward). ``dropout_layout`` ``[row0, col0, rows, cols]`` (dense attention,
backends that list "dropout_layout" in their ``VARIANTS``) makes the keep-mask element of
(b, h, i, j) the element (b, h, row0 + i, col0 + j) of the keep-mask of a (B, Hq, rows, cols)
call of the same seed, i.e. ``dropout_keep_mask(seed, (B, Hq, rows, cols), p)[..., row0:row0 +
Nq, col0:col0 + Nk]``: a block of a larger problem (``fusedlayers.distributed``) draws that
problem's mask. None: (0, 0, Nq, Nk). For the norms, ``z = dropout(x) + residual`` is the pre-norm
residual stream: it is returned (dtype float32 if ``residual_in_fp32``, else residual's,
else x's) when there is a residual, dropout or ``prenorm``, otherwise it is empty and
``zin = x``; with ``needs_grad=False`` (no backward will run: the caller's inputs need no
gradient or grad mode is off) z is returned only for ``prenorm``, since only y needs it
(``keeps_stream``; an empty z has the stream's dtype all the same); ``mean`` is empty for RMS norm. Unneeded outputs are empty tensors, since a
custom op cannot return None.

Empty inputs never reach a kernel: an op body answers a call with no query, no key (or no
row) itself, as torch does (empty outputs; zeros and lse = -inf for queries with no key;
zero gradients), and sends the rest of the empty calls (head dim 0) to the reference.

Double backward (``create_graph=True``): when a backward formula runs with grad mode on
and one of its inputs requires grad, it computes the gradient with differentiable torch
ops instead of the opaque backward op: the reference backward for the norms (linear
memory), the reference attention (materialised scores, O(Nq * Nk) memory) and autograd
for attention; the dropout keep-mask is the forward backend's own.

The op bodies look up the backend in ``fusedlayers.dispatch`` by name; the backend name
is chosen before the op runs (``fusedlayers.ops``), so ``torch.compile(fullgraph=True)``
sees one opaque op per call and never a graph break.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import dispatch

_EMPTY = (0,)


def _seed(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


def _acc(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the precision of the differentiable backward."""
    return torch.promote_types(dtype, torch.float32)


def records_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records a graph through these tensors: grad mode is on and one of them
    requires grad. In a forward: whether a backward can run. In a backward formula: whether it
    runs under ``create_graph=True`` with an input that needs a graph, so that its result must
    itself be differentiable."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_PLAIN = (Tensor, torch.nn.Parameter)
_NO_FORMULA = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def refuse_unsupported_autodiff(op: str, *tensors: Optional[Tensor]) -> None:
    """Raises NotImplementedError for a call under forward-mode AD (``torch.autograd.forward_ad`` dual
    tensors, ``torch.func.jvp``) or ``torch.func.grad`` / ``vjp`` / ``jacrev``: the ops have no
    forward-mode formula, and a torch.library op under them gives a zero tangent without an error, or
    fails inside PyTorch. ``torch.func.vmap`` and ``torch.autograd`` are served. Costs one attribute
    read when no dual level and no transform is active."""
    if torch._C._are_functorch_transforms_active():
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        if any(i.key() in _NO_FORMULA for i in retrieve_all_functorch_interpreters()):
            raise NotImplementedError(
                f"fusedlayers.{op}: torch.func.grad / vjp / jacrev / jvp are not supported (the ops have no "
                "functorch rule); use torch.autograd.grad, or torch.func.vmap")
    if _forward_ad._current_level >= 0 and any(
            isinstance(t, Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"fusedlayers.{op}: forward-mode AD (a dual tensor's tangent) is not supported")


def eager(*tensors: Optional[Tensor]) -> bool:
    """Whether a call on these tensors may skip the torch.library op: not under torch.compile, no
    torch function or dispatch mode (fake tensors, opcheck, profilers of ops), no functorch
    transform, and plain tensors only (no subclass such as DTensor)."""
    return (not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in _PLAIN for t in tensors))


# ----------------------------------------------------------------------------- attention


class ScoreMods(NamedTuple):
    """The score variants of an attention call (``reference.attention``'s keyword arguments),
    handed to a backend as one argument: ``window_left`` / ``window_right`` (-1 unbounded),
    ``softcap`` (0 off), ``alibi_slopes`` (float32 (Hq,) or (B, Hq), or None), ``sinks``
    (float32 (Hq,) or None)."""

    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = None
    sinks: Optional[Tensor] = None

    def any(self) -> bool:
        return (self.window_left >= 0 or self.window_right >= 0 or self.softcap > 0 or self.alibi_slopes is not None
                or self.sinks is not None)

    def reference_kwargs(self) -> dict:
        """As keyword arguments of ``reference.attention``."""
        return dict(window_size=(self.window_left, self.window_right), softcap=self.softcap,
                    alibi_slopes=self.alibi_slopes, sinks=self.sinks)


NO_MODS = ScoreMods()


def _native_sinks(impl) -> bool:
    """Whether a backend takes sinks itself; the others get them joined (``join_sinks``)."""
    return "sinks" in getattr(impl, "VARIANTS", ())


def _mods_kw(mods: ScoreMods, impl) -> dict:
    """The ``mods`` argument of a backend call (none for plain attention); sinks only for a
    backend that takes them itself."""
    mods = mods if _native_sinks(impl) else mods._replace(sinks=None)
    return {"mods": mods} if mods.any() else {}


def _layout_kw(dropout_layout: Optional[list[int]], nq: int, nk: int, impl, backend: str) -> dict:
    """The ``dropout_layout`` argument of a call of backend ``impl`` (none when not given), checked."""
    if dropout_layout is None:
        return {}
    if "dropout_layout" not in getattr(impl, "VARIANTS", ()):
        raise ValueError(f"dropout_layout: the {backend} backend takes no dropout layout (backends 'cpu' and "
                         f"'reference' do)")
    layout = [int(x) for x in dropout_layout]
    if len(layout) != 4:
        raise ValueError(f"dropout_layout must be [row0, col0, rows, cols], got {layout}")
    row0, col0, rows, cols = layout
    if not (0 <= row0 and row0 + nq <= rows and 0 <= col0 and col0 + nk <= cols):
        raise ValueError(f"dropout_layout {layout} must hold the call's (Nq, Nk) = ({nq}, {nk}) rows and cols: "
                         f"0 <= row0, row0 + Nq <= rows, 0 <= col0, col0 + Nk <= cols")
    return {"dropout_layout": layout}


def layout_keep_mask(impl, seed: int, shape, dropout_p: float, device, dropout_layout) -> Tensor:
    """The keep-mask of a call of ``shape`` (B, Hq, Nq, Nk) under ``dropout_layout`` (or None),
    from backend ``impl``'s random stream."""
    if dropout_layout is None:
        return impl.dropout_keep_mask(seed, shape, dropout_p, device)
    row0, col0, rows, cols = (int(x) for x in dropout_layout)
    b, hq, nq, nk = shape
    full = impl.dropout_keep_mask(seed, (b, hq, rows, cols), dropout_p, device)
    return full[..., row0:row0 + nq, col0:col0 + nk]


def _no_key_lse(shape, sinks: Optional[Tensor], like: Tensor) -> Tensor:
    """lse of rows that see no key: -inf, or the head's sink logit."""
    if sinks is None:
        return like.new_full(shape, float("-inf"), dtype=torch.float32)
    return sinks.float().view(-1, 1).expand(shape).contiguous()


@torch.library.custom_op("fusedlayers::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], seed: Optional[Tensor],
                  scale: float, causal: bool, bottom_right: bool, dropout_p: float, deterministic: bool,
                  backend: str, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                  alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
                  dropout_layout: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
    return _attention_fwd_impl(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, deterministic,
                               backend, window_left, window_right, softcap, alibi_slopes, sinks, dropout_layout)


def _attention_fwd_impl(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, deterministic, backend,
                        window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None,
                        dropout_layout=None):
    """The body of attention_fwd (its arguments and outputs)."""
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        if q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0:  # no query, or no key
            b, hq, nq = q.shape[:3]
            return q.new_zeros((b, hq, nq, v.shape[3])), _no_key_lse((b, hq, nq), sinks, q)
        backend = "reference"  # head dim 0: the scores are the mask alone
    impl = dispatch.implementation("attention", backend)
    if (window_left == window_right == -1 and not softcap and alibi_slopes is None and sinks is None
            and dropout_layout is None):  # plain attention: no variant argument
        return impl.forward(q, k, v, attn_mask, _seed(seed), scale, causal, bottom_right, dropout_p)
    mods = ScoreMods(window_left, window_right, softcap, alibi_slopes, sinks)
    layout_kw = _layout_kw(dropout_layout, q.shape[2], k.shape[2], impl, backend)
    out, lse = impl.forward(q, k, v, attn_mask, _seed(seed), scale, causal, bottom_right, dropout_p,
                            **_mods_kw(mods, impl), **layout_kw)
    return (out, lse) if _native_sinks(impl) else join_sinks(out, lse, sinks, varlen=False)


@attention_fwd.register_fake
def _(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, deterministic, backend, window_left=-1,
      window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None, dropout_layout=None):
    b, hq, nq = q.shape[:3]
    return q.new_empty((b, hq, nq, v.shape[3])), q.new_empty((b, hq, nq), dtype=torch.float32)


@torch.library.custom_op("fusedlayers::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                  out: Tensor, lse: Tensor, seed: Optional[Tensor], scale: float, causal: bool, bottom_right: bool,
                  dropout_p: float, deterministic: bool, bias_grad: bool, backend: str, window_left: int = -1,
                  window_right: int = -1, softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                  sinks: Optional[Tensor] = None,
                  sinks_grad: bool = False,
                  dropout_layout: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _attention_bwd_impl(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right,
                               dropout_p, deterministic, bias_grad, backend, window_left, window_right, softcap,
                               alibi_slopes, sinks, sinks_grad, dropout_layout)


def _attention_bwd_impl(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p,
                        deterministic, bias_grad, backend, window_left=-1, window_right=-1, softcap=0.0,
                        alibi_slopes=None, sinks=None, sinks_grad=False, dropout_layout=None):
    """The body of attention_bwd (its arguments and outputs)."""
    mods = ScoreMods(window_left, window_right, softcap, alibi_slopes, sinks)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        if q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0:  # the output did not depend on them
            dbias = torch.zeros_like(attn_mask) if bias_grad else q.new_empty(_EMPTY)
            dsinks = sinks_gradient(dout, dlse, out, lse, sinks, varlen=False) if sinks_grad else q.new_empty(_EMPTY)
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias, dsinks
        backend = "reference"
    impl = dispatch.implementation("attention", backend)
    _check_joined_sinks(sinks, impl, backend)
    layout_kw = _layout_kw(dropout_layout, q.shape[2], k.shape[2], impl, backend)
    dq, dk, dv, dbias = impl.backward(dout, dlse, q, k, v, attn_mask, out, lse, _seed(seed), scale, causal,
                                      bottom_right, dropout_p, deterministic, bias_grad, **_mods_kw(mods, impl),
                                      **layout_kw)
    dsinks = sinks_gradient(dout, dlse, out, lse, sinks, varlen=False) if sinks_grad else q.new_empty(_EMPTY)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(_EMPTY), dsinks


SINK_LIMIT = 1024.0


def _check_joined_sinks(sinks: Optional[Tensor], impl, backend: str) -> None:
    """The kernels' backward recomputes the softmax statistics of rows whose |lse| >= 4096 from
    the keys alone; with |sink| < SINK_LIMIT such a row's joined lse equals its keys' lse in
    float32 (the sink's share is below exp(-3072)), so the backward stays exact (a -inf sink is
    no sink). Reads the values (a device sync on a GPU): called once per backward with sinks."""
    if sinks is None or _native_sinks(impl):
        return
    s = sinks.detach().float()
    bad = (s.abs() >= SINK_LIMIT) & (s != float("-inf"))  # -inf: no sink, harmless
    if bool(bad.any()):
        raise ValueError(f"sinks: the {backend} backend's backward needs |sink| < {SINK_LIMIT:g} or -inf (got "
                         f"{s[bad].tolist()[:4]}); backend='reference' has no such limit")


def join_sinks(out: Tensor, lse: Tensor, sinks: Optional[Tensor], *, varlen: bool) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention over the keys -> that of the softmax whose denominator also
    holds ``exp(sink_h)``: ``lse' = logaddexp(lse, sink)``, ``out' = out * exp(lse - lse')``
    (the merge of a split-KV combine with a block that carries no value). One pass over out,
    and the kernels see no sink. A row with no key gets out 0 and lse = sink; a kernel
    backward that takes P = exp(S - lse') from the saved lse is exact given (out', lse')."""
    if sinks is None:
        return out, lse
    sink = sinks.float().view(-1, 1)  # (Hq, 1): lse is (B, Hq, Nq), or (Hq, Tq) for varlen
    joined = torch.logaddexp(lse, sink)
    factor = torch.where(lse == float("-inf"), 0.0, torch.exp(lse - joined))  # 0 on rows with no key
    factor = factor.transpose(0, 1) if varlen else factor  # (Tq, Hq) like varlen out's leading dims
    return (out.float() * factor.unsqueeze(-1)).to(out.dtype), joined.contiguous()


def sinks_gradient(dout: Tensor, dlse: Tensor, out: Tensor, lse: Tensor, sinks: Tensor, *, varlen: bool) -> Tensor:
    """d loss / d sinks (Hq,), from the joined (out, lse): ``sum_i P_sink,i * (dlse_i -
    Delta_i)`` with ``P_sink,i = exp(sink - lse_i)`` and ``Delta_i = rowsum(dO * O)`` (dropout
    included). A fixed-order torch reduction: deterministic. Accumulated in float64, as the
    Triton kernels' Delta (dlse_i - Delta_i cancels, and the sum runs over every row of the
    batch); the products dO * O are exact in float32 for fp16 / bf16 inputs, so only float32 and
    float64 inputs are copied to float64."""
    wide = torch.float32 if torch.finfo(out.dtype).bits <= 16 else torch.float64
    delta = (dout.to(wide) * out.to(wide)).sum(dim=-1, dtype=torch.float64)  # (B, Hq, Nq), or (Tq, Hq) varlen
    delta = delta.transpose(0, 1) if varlen else delta
    p_sink = torch.exp(sinks.double().view(-1, 1) - lse.double())
    p_sink = torch.where(lse == float("-inf"), 0.0, p_sink)  # a -inf sink on a row with no key
    g = p_sink * (dlse.double() - delta)
    return g.sum(dim=tuple(i for i in range(g.dim()) if i != g.dim() - 2)).to(sinks.dtype)


@attention_bwd.register_fake
def _(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p, deterministic,
      bias_grad, backend, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None,
      sinks_grad=False, dropout_layout=None):
    dbias = attn_mask.new_empty(attn_mask.shape) if bias_grad else q.new_empty(_EMPTY)
    dsinks = sinks.new_empty(sinks.shape) if sinks_grad else q.new_empty(_EMPTY)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dsinks


def _attention_setup(ctx, inputs, output):
    (q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, deterministic, backend, window_left,
     window_right, softcap, alibi_slopes, sinks, dropout_layout) = inputs
    ctx.save_for_backward(q, k, v, attn_mask, seed, alibi_slopes, sinks, *output)
    ctx.args = (scale, causal, bottom_right, dropout_p, deterministic)
    ctx.dropout_layout = None if dropout_layout is None else [int(x) for x in dropout_layout]
    ctx.mods = (window_left, window_right, softcap)
    ctx.backend = backend


def attention_double_backward(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                              attn_mask: Optional[Tensor], seed: Optional[Tensor], scale: float, causal: bool,
                              bottom_right: bool, dropout_p: float, backend: str, needs_input_grad,
                              mods: ScoreMods = NO_MODS, dropout_layout: Optional[list[int]] = None) -> tuple:
    """(dq, dk, dv, dbias, dsinks) of ``attention_fwd`` as a differentiable function of (dout,
    dlse, q, k, v, attn_mask, sinks): autograd through the reference attention, recomputed with
    the forward backend's keep-mask (under ``dropout_layout``); None where ``needs_input_grad`` (4 or 5 flags: q, k, v,
    attn_mask, sinks) says no. For any autograd node of attention whose backward runs under
    ``create_graph=True``."""
    from . import reference

    b, hq, nq = q.shape[:3]
    keep = None
    if dropout_p > 0:
        keep = layout_keep_mask(dispatch.implementation("attention", backend), _seed(seed), (b, hq, nq, k.shape[2]),
                                dropout_p, q.device, dropout_layout)
    acc = _acc(q.dtype)
    mask = attn_mask.to(acc) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    out, lse = reference.attention(q.to(acc), k.to(acc), v.to(acc), mask, causal=causal,
                                   causal_align="bottom_right" if bottom_right else "top_left", dropout_p=dropout_p,
                                   dropout_mask=keep, scale=scale, **mods.reference_kwargs())
    needs = tuple(needs_input_grad) + (False,) * (5 - len(needs_input_grad))
    return _differentiable_grads((out, lse), (q, k, v, attn_mask, mods.sinks), needs, (dout.to(acc), dlse.to(acc)))


def _differentiable_grads(outputs, inputs, needs, grad_outputs) -> tuple:
    """The gradients of ``outputs`` with respect to the ``inputs`` that ``needs`` asks for, as a
    graph (create_graph=True), each in its input's dtype (zeros where unused); None elsewhere."""
    wanted = [i for i, t in enumerate(inputs) if needs[i] and t is not None]
    grads = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grad_outputs, create_graph=True,
                                allow_unused=True)
    result = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g.to(inputs[i].dtype)
    return tuple(result)


def _needs(ctx, i: int) -> bool:
    """ctx.needs_input_grad[i], False for a defaulted argument the caller did not pass."""
    return len(ctx.needs_input_grad) > i and ctx.needs_input_grad[i]


def _attention_backward(ctx, dout, dlse):
    q, k, v, attn_mask, seed, alibi_slopes, sinks, out, lse = ctx.saved_tensors
    scale, causal, bottom_right, dropout_p, deterministic = ctx.args
    mods = ScoreMods(*ctx.mods, alibi_slopes, sinks)
    n = len(ctx.needs_input_grad)  # the caller's argument count (trailing defaults omitted)
    nones = (None,) * 11  # seed ... alibi_slopes
    if records_grad(dout, dlse, q, k, v, attn_mask, sinks):
        needs = ctx.needs_input_grad[:4] + (_needs(ctx, 15),)
        dq, dk, dv, dbias, dsinks = attention_double_backward(dout, dlse, q, k, v, attn_mask, seed, scale, causal,
                                                              bottom_right, dropout_p, ctx.backend, needs, mods,
                                                              ctx.dropout_layout)
        return ((dq, dk, dv, dbias) + nones + (dsinks, None))[:n]
    bias_grad = attn_mask is not None and ctx.needs_input_grad[3]
    sinks_grad = sinks is not None and _needs(ctx, 15)
    bwd = _attention_bwd_impl if getattr(ctx, "eager", False) else attention_bwd
    dq, dk, dv, dbias, dsinks = bwd(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right,
                                    dropout_p, deterministic, bias_grad, ctx.backend, *ctx.mods, alibi_slopes, sinks,
                                    sinks_grad, ctx.dropout_layout)
    return ((dq, dk, dv, dbias if bias_grad else None) + nones + (dsinks if sinks_grad else None, None))[:n]


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


class _EagerAttention(torch.autograd.Function):
    """attention_fwd and its autograd formula without the torch.library dispatch (see _EagerNorm)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _attention_fwd_impl(*inputs)
        _attention_setup(ctx, inputs, output)
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _attention_backward(ctx, dout, dlse)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], seed: Optional[Tensor], scale: float,
              causal: bool, bottom_right: bool, dropout_p: float, deterministic: bool, backend: str,
              window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
              alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
              dropout_layout: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
    """``attention_fwd`` with its gradient: the torch.library op where it must be seen, else the
    same computation as an autograd.Function (see ``norm``)."""
    args = (q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, deterministic, backend, window_left,
            window_right, softcap, alibi_slopes, sinks, dropout_layout)
    refuse_unsupported_autodiff("attention", q, k, v, attn_mask, alibi_slopes, sinks)
    if eager(q, k, v, attn_mask, alibi_slopes, sinks):
        if records_grad(q, k, v, attn_mask, sinks):
            return _EagerAttention.apply(*args)
        return _attention_fwd_impl(*args)
    return attention_fwd(*args)


# ------------------------------------------------------------------- attention, varlen


@torch.library.custom_op("fusedlayers::varlen_fwd", mutates_args=())
def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
               max_seqlen_k: int, seed: Optional[Tensor], scale: float, causal: bool, bottom_right: bool,
               dropout_p: float, deterministic: bool, backend: str, window_left: int = -1, window_right: int = -1,
               softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
               sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    mods = ScoreMods(window_left, window_right, softcap, alibi_slopes, sinks)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        if q.shape[0] * q.shape[1] == 0 or k.shape[0] == 0:  # no query, or no key
            from .ops import check_cu_seqlens_values

            check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
            tq, hq = q.shape[:2]
            return q.new_zeros((tq, hq, v.shape[2])), _no_key_lse((hq, tq), sinks, q)
        backend = "reference"  # head dim 0: the scores are the mask alone
    impl = dispatch.implementation("attention", backend)
    out, lse = impl.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, _seed(seed),
                                   scale, causal, bottom_right, dropout_p, **_mods_kw(mods, impl))
    return (out, lse) if _native_sinks(impl) else join_sinks(out, lse, sinks, varlen=True)


@varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale, causal, bottom_right,
      dropout_p, deterministic, backend, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None):
    tq, hq = q.shape[:2]
    return q.new_empty((tq, hq, v.shape[2])), q.new_empty((hq, tq), dtype=torch.float32)


@torch.library.custom_op("fusedlayers::varlen_bwd", mutates_args=())
def varlen_bwd(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
               cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, out: Tensor, lse: Tensor,
               seed: Optional[Tensor], scale: float, causal: bool, bottom_right: bool, dropout_p: float,
               deterministic: bool, backend: str, window_left: int = -1, window_right: int = -1,
               softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
               sinks_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mods = ScoreMods(window_left, window_right, softcap, alibi_slopes, sinks)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        if q.shape[0] * q.shape[1] == 0 or k.shape[0] == 0:  # the output did not depend on them
            dsinks = sinks_gradient(dout, dlse, out, lse, sinks, varlen=True) if sinks_grad else q.new_empty(_EMPTY)
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dsinks
        backend = "reference"
    impl = dispatch.implementation("attention", backend)
    _check_joined_sinks(sinks, impl, backend)
    dq, dk, dv = impl.varlen_backward(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      out, lse, _seed(seed), scale, causal, bottom_right, dropout_p, deterministic,
                                      **_mods_kw(mods, impl))
    dsinks = sinks_gradient(dout, dlse, out, lse, sinks, varlen=True) if sinks_grad else q.new_empty(_EMPTY)
    return dq, dk, dv, dsinks


@varlen_bwd.register_fake
def _(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, seed, scale, causal,
      bottom_right, dropout_p, deterministic, backend, window_left=-1, window_right=-1, softcap=0.0,
      alibi_slopes=None, sinks=None, sinks_grad=False):
    dsinks = sinks.new_empty(sinks.shape) if sinks_grad else q.new_empty(_EMPTY)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _varlen_setup(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right, dropout_p, deterministic,
     backend, window_left, window_right, softcap, alibi_slopes, sinks) = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, seed, alibi_slopes, sinks, *output)
    ctx.args = (max_q, max_k, scale, causal, bottom_right, dropout_p, deterministic)
    ctx.mods = (window_left, window_right, softcap)
    ctx.backend = backend


_VARLEN_NONES = (None,) * 15  # cu_seqlens_q ... alibi_slopes


def _varlen_double_backward(ctx, dout, dlse, q, k, v, cu_q, cu_k, mods):
    """As :func:`attention_double_backward`, through the reference varlen attention."""
    from . import reference

    max_q, max_k, scale, causal, bottom_right, dropout_p, deterministic = ctx.args
    if dropout_p > 0:
        raise NotImplementedError("fusedlayers.attention_varlen: double backward (create_graph=True) is not "
                                  "supported with dropout_p > 0")
    acc = _acc(q.dtype)
    out, lse = reference.attention_varlen(q.to(acc), k.to(acc), v.to(acc), cu_q, cu_k, causal=causal,
                                          causal_align="bottom_right" if bottom_right else "top_left", scale=scale,
                                          **mods.reference_kwargs())
    needs = ctx.needs_input_grad[:3] + (_needs(ctx, 18),)
    result = _differentiable_grads((out, lse), (q, k, v, mods.sinks), needs, (dout.to(acc), dlse.to(acc)))
    return (tuple(result[:3]) + _VARLEN_NONES + (result[3],))[:len(ctx.needs_input_grad)]


def _varlen_backward(ctx, dout, dlse):
    q, k, v, cu_q, cu_k, seed, alibi_slopes, sinks, out, lse = ctx.saved_tensors
    mods = ScoreMods(*ctx.mods, alibi_slopes, sinks)
    if records_grad(dout, dlse, q, k, v, sinks):
        return _varlen_double_backward(ctx, dout, dlse, q, k, v, cu_q, cu_k, mods)
    max_q, max_k, scale, causal, bottom_right, dropout_p, deterministic = ctx.args
    sinks_grad = sinks is not None and _needs(ctx, 18)
    dq, dk, dv, dsinks = varlen_bwd(dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, seed, scale, causal,
                                    bottom_right, dropout_p, deterministic, ctx.backend, *ctx.mods, alibi_slopes,
                                    sinks, sinks_grad)
    return ((dq, dk, dv) + _VARLEN_NONES + (dsinks if sinks_grad else None,))[:len(ctx.needs_input_grad)]


varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


# ---------------------------------------------------------------------------- norms


def stream_dtype(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> torch.dtype:
    """dtype of z = dropout(x) + residual, the residual stream."""
    if residual_in_fp32:
        return torch.float32
    return residual.dtype if residual is not None else x.dtype


def keeps_stream(x: Tensor, residual: Optional[Tensor], dropout_p: float, prenorm: bool,
                 residual_in_fp32: bool, needs_grad: bool = True) -> bool:
    """Whether norm_fwd materialises z: the prenorm output, and the backward's input unless z is x
    itself. Without a backward (``needs_grad`` false) z is only the prenorm output; y is the same
    either way (the kernels that take y from z rounded to the stream's dtype round it whether or
    not they store it)."""
    if prenorm:
        return True
    if not needs_grad:
        return False
    return residual is not None or dropout_p > 0 or stream_dtype(x, residual, residual_in_fp32) != x.dtype


@torch.library.custom_op("fusedlayers::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
             seed: Optional[Tensor], eps: float, dropout_p: float, rms: bool, prenorm: bool, residual_in_fp32: bool,
             backend: str, needs_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _norm_fwd_impl(x, residual, weight, bias, seed, eps, dropout_p, rms, prenorm, residual_in_fp32, backend,
                          needs_grad)


def _norm_fwd_impl(x, residual, weight, bias, seed, eps, dropout_p, rms, prenorm, residual_in_fp32, backend,
                   needs_grad=True):
    """The body of norm_fwd (its arguments and outputs)."""
    if x.numel() == 0:  # no row, or rows of 0 elements: nothing to normalise
        m = x.shape[0]
        keep = keeps_stream(x, residual, dropout_p, prenorm, residual_in_fp32, needs_grad)
        z = x.new_empty(x.shape if keep else _EMPTY, dtype=stream_dtype(x, residual, residual_in_fp32))
        mean = x.new_zeros(_EMPTY if rms else (m,), dtype=torch.float32)
        return x.new_empty(x.shape), z, mean, x.new_zeros((m,), dtype=torch.float32)
    impl = dispatch.implementation("norm", backend)
    return impl.forward(x, residual, weight, bias, _seed(seed), eps, dropout_p, rms, prenorm, residual_in_fp32,
                        needs_grad)


@norm_fwd.register_fake
def _(x, residual, weight, bias, seed, eps, dropout_p, rms, prenorm, residual_in_fp32, backend, needs_grad=True):
    m = x.shape[0]
    keep = keeps_stream(x, residual, dropout_p, prenorm, residual_in_fp32, needs_grad)
    z = x.new_empty(x.shape if keep else _EMPTY, dtype=stream_dtype(x, residual, residual_in_fp32))
    mean = x.new_empty(_EMPTY if rms else (m,), dtype=torch.float32)
    return x.new_empty(x.shape), z, mean, x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("fusedlayers::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, dz: Optional[Tensor], zin: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             mean: Tensor, rstd: Tensor, seed: Optional[Tensor], eps: float, dropout_p: float, rms: bool,
             x_dtype: torch.dtype, residual_dtype: Optional[torch.dtype],
             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _norm_bwd_impl(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype, residual_dtype,
                          backend)


def _norm_bwd_impl(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype, residual_dtype, backend):
    """The body of norm_bwd (its arguments and outputs)."""
    if zin.numel() == 0:  # weight and bias got no contribution
        dres = zin.new_empty(zin.shape, dtype=residual_dtype) if residual_dtype is not None else None
        dw = torch.zeros_like(weight) if weight is not None else None
        db = torch.zeros_like(bias) if bias is not None else None
        dx, dres, dw, db = zin.new_empty(zin.shape, dtype=x_dtype), dres, dw, db
    else:
        impl = dispatch.implementation("norm", backend)
        dx, dres, dw, db = impl.backward(dy, dz, zin, weight, bias, mean, rstd, _seed(seed), eps, dropout_p, rms,
                                         x_dtype, residual_dtype)
    return tuple(t if t is not None else zin.new_empty(_EMPTY) for t in (dx, dres, dw, db))


@norm_bwd.register_fake
def _(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype, residual_dtype, backend):
    dres = zin.new_empty(zin.shape if residual_dtype is not None else _EMPTY, dtype=residual_dtype or zin.dtype)
    dw = weight.new_empty(weight.shape) if weight is not None else zin.new_empty(_EMPTY)
    db = bias.new_empty(bias.shape) if bias is not None else zin.new_empty(_EMPTY)
    return zin.new_empty(zin.shape, dtype=x_dtype), dres, dw, db


def _norm_setup(ctx, inputs, output):
    x, residual, weight, bias, seed, eps, dropout_p, rms, prenorm, residual_in_fp32, backend = inputs[:11]
    y, z, mean, rstd = output
    # a z left out by needs_grad=False that the backward would need (z is not x)
    ctx.z_missing = z.shape != x.shape and keeps_stream(x, residual, dropout_p, prenorm, residual_in_fp32)
    ctx.save_for_backward(z if z.numel() else x, weight, bias, mean, rstd, seed)
    ctx.args = (eps, dropout_p, rms, x.dtype, residual.dtype if residual is not None else None)
    ctx.backend = backend
    # Unused outputs get None, not zeros: dz is None unless z is used (prenorm, or a double
    # backward through a saved z), dy is None when only z is used.
    ctx.set_materialize_grads(False)


def norm_double_backward(dy: Tensor, dz: Optional[Tensor], zin: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], mean: Tensor, rstd: Tensor, seed: Optional[Tensor], eps: float,
                         dropout_p: float, rms: bool, x_dtype: torch.dtype, residual_dtype: Optional[torch.dtype],
                         backend: str) -> tuple:
    """(dx, dresidual, dweight, dbias) of ``norm_fwd`` (arguments as ``norm_bwd``'s) as a
    differentiable function of (dy, dz, zin, weight, bias): the reference backward (plain
    torch ops) with the forward backend's dropout keep-mask. For any autograd node of a
    norm whose backward runs under ``create_graph=True``."""
    acc = _acc(zin.dtype)
    reference = dispatch.implementation("norm", "reference")
    # without dropout, its dx is the gradient of z (dzin), here in the accumulation dtype
    dzin, _, dw, db = reference.backward(dy, dz, zin, weight, bias, mean, rstd, 0, eps, 0.0, rms, acc, None)
    dx = dzin
    if dropout_p > 0:
        keep = dispatch.implementation("norm", backend).dropout_keep_mask(_seed(seed), zin.shape, dropout_p,
                                                                          zin.device)
        dx = dzin * keep / (1.0 - dropout_p)
    return dx.to(x_dtype), dzin.to(residual_dtype) if residual_dtype is not None else None, dw, db


def _norm_backward(ctx, dy, dz, dmean, drstd):
    if ctx.z_missing:
        raise RuntimeError("fusedlayers::norm_fwd ran with needs_grad=False, so it kept no z for its backward; "
                           "call it with needs_grad=True when its inputs require grad")
    zin, weight, bias, mean, rstd, seed = ctx.saved_tensors
    eps, dropout_p, rms, x_dtype, residual_dtype = ctx.args
    if dy is None:  # only z was used
        dy = zin.new_zeros(zin.shape, dtype=x_dtype)
    if dz is not None and dz.shape != zin.shape:  # z was not kept (an empty output): no gradient
        dz = None
    if records_grad(dy, dz, zin, weight, bias):
        return norm_double_backward(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype,
                                    residual_dtype, ctx.backend) + (None,) * 8
    bwd = _norm_bwd_impl if getattr(ctx, "eager", False) else norm_bwd
    dx, dres, dw, db = bwd(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype,
                           residual_dtype, ctx.backend)
    return (dx, dres if residual_dtype is not None else None, dw if weight is not None else None,
            db if bias is not None else None) + (None,) * 8


norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup)


class _EagerNorm(torch.autograd.Function):
    """norm_fwd and its autograd formula (the same setup and backward) without the torch.library
    dispatch, whose Python layers cost most of a small call's host time: the eager path."""

    @staticmethod
    def forward(ctx, *inputs):  # (ctx first: a separate setup_context binds the arguments by signature per call)
        output = _norm_fwd_impl(*inputs)
        _norm_setup(ctx, inputs, output)
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx, dy, dz, dmean, drstd):
        return _norm_backward(ctx, dy, dz, dmean, drstd)


def norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
         seed: Optional[Tensor], eps: float, dropout_p: float, rms: bool, prenorm: bool, residual_in_fp32: bool,
         backend: str, needs_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``norm_fwd`` with its gradient: the torch.library op where it must be seen (torch.compile,
    modes, transforms, tensor subclasses), else the same computation as an autograd.Function."""
    args = (x, residual, weight, bias, seed, eps, dropout_p, rms, prenorm, residual_in_fp32, backend, needs_grad)
    refuse_unsupported_autodiff("norm", x, residual, weight, bias)
    if eager(x, residual, weight, bias):
        if needs_grad:
            return _EagerNorm.apply(*args)
        return _norm_fwd_impl(*args)
    return norm_fwd(*args)

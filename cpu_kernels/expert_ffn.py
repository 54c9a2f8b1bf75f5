"""One SwiGLU expert on the CPU: y_TD = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T.

Shape key: T tokens, D model dim, F expert hidden dim.

    x_TD   float32 | bfloat16                     activations (output has the same dtype)
    w13    [2F, D]: gate rows w1 = w13[:F], up rows w3 = w13[F:]
    w2     [D, F]
    each weight: float32 or bfloat16 tensor (read in place, bf16 widened in-kernel),
                 or an Int8Weight / Int4Weight from `quantize`.

Pipeline (every stage accumulates in fp32; weights are streamed once per call):

    x_TD --(bf16? widen)--> xf_TD --matmul w13--> gu_T2F --swiglu--> h_TF
         --matmul w2--> yf_TD --(bf16? round to nearest even)--> y_TD

2 <= T <= 16 (small_t.py, small_t_int4.py: fp32, bf16, int8, int4 group 128) decodes
each block of four weight rows once into registers and applies it to every token; larger
T goes through fp32 scratch chunks and register tiles (tiles.py). On Zen 4 (AVX-512
VNNI and BF16), at every T >= 2, a bf16 token against bf16 w13 takes bf16 dot products
instead (small_t_bf16dp.py: exact products, fp32 sums), int8 weights 16-bit integer dot
products against the token rounded as at T == 1 (small_t_int8dp.py), and int4 (group
128) byte dot products against the token rounded to 8 bits per group as at T == 1
(small_t_int4dp.py): 1.5-3.7x the tiles at T = 32..2048.

T == 1 with both weights bf16, int8 or int4 (group 128) takes the fused decode path
(decode.py): the whole expert in one kernel call with at most one thread-pool launch,
with each weight's checks and numpy views made once per weight object
(weight_views.weight_info).
On Zen 4 hosts (AVX-512 VNNI) int4 decode rounds the token and the hidden vector
to 8 bits per group of 128 (int4_dot8.py: ~1.5% of the output, a tenth of what int4
weights themselves do); elsewhere T == 1 keeps 16-bit or fp32 tokens.

`expert_ffn` releases the GIL inside the kernels and may be called from several Python
threads at once; see numba_util for the threading model and `num_threads`. A matmul
(or a fused decode) with fewer than SERIAL_BYTES of weights x tokens, or any call under
a cap of one thread, runs on the calling thread without launching numba's thread pool.
`expert_ffn_reference` is the plain-torch definition the kernels are tested against.
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch
import torch.nn.functional as F

from . import decode as Dk
from . import expert_ffn_kernels as K
from .gemv_madd import MADD_DECODE
from .int4_dot8 import DOT8_DECODE
from .int4_kernels import matmul_int4, matmul_int4_serial
from .small_t_bf16dp import BF16DP_SMALL_T, matmul_small_bf16dp, rows_small_bf16dp
from .small_t_int8dp import INT8DP_SMALL_T, matmul_small_int8dp
from .small_t_int8dp import MIN_T as INT8DP_MIN_T
from .small_t_int4 import SMALL_T, matmul_small_int4, matmul_small_int4_serial
from .small_t_int4dp import INT4DP_SMALL_T, matmul_small_int4dp
from .small_t_int4dp import MIN_T as INT4DP_MIN_T
from .tiles import narrow_to_bf16, swiglu_rows, widen_bf16
from .numba_util import launch_guard, launches_concurrent, max_threads, thread_cap, thread_cap_check
from .quant import Int4Weight, Int8Weight
from .weight_views import Weight, WeightInfo, weight_info

__all__ = ["expert_ffn", "expert_ffn_reference", "weight_nbytes"]

# Intermediate buffers up to this size are kept per thread and reused across calls;
# larger (prefill) buffers are allocated per call so idle threads do not pin them.
_WORKSPACE_KEEP_BYTES = 32 << 20
_tls = threading.local()
# Below this many weight bytes times tokens a matmul runs on the calling thread: a
# parallel launch costs ~10 us when the pool is idle and far more when another process
# holds a core (the launch waits for every thread), against ~15 us to stream 256 KiB.
SERIAL_BYTES = 256 << 10


def _workspace(n: int) -> np.ndarray:
    """A float32 buffer of at least n elements, reused per thread when small."""
    if 4 * n > _WORKSPACE_KEEP_BYTES:
        return np.empty(n, np.float32)
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1 << 16), np.float32)
        _tls.buf = buf
    return buf


def weight_nbytes(w: Weight) -> int:
    """Bytes one application of ``w`` reads (dense: numel * itemsize; packed: data + scales)."""
    if isinstance(w, (Int8Weight, Int4Weight)):
        return w.nbytes
    return w.numel() * w.element_size()


def _decode(x_TD: torch.Tensor, bf16: bool, i13: WeightInfo, i2: WeightInfo, out: torch.Tensor | None,
            num_threads: int | None) -> torch.Tensor:
    """The fused T == 1 path (decode.py); both weights have the decode format i13.fmt.

    Written for few torch calls: between two experts the caches hold weight bytes, not
    this code, and each torch call here costs microseconds (decode.py, "Why addresses").
    x_TD and out have passed _check (CPU, 2-D, [1, D], float32 or bfloat16).
    """
    if not x_TD.is_contiguous():  # [1, D]: only a non-unit column stride
        x_TD = x_TD.contiguous()
    y_TD = out if out is not None else torch.empty(x_TD.shape, dtype=x_TD.dtype)
    args = (x_TD.data_ptr(), y_TD.data_ptr(), bf16) + i13.views + i2.views
    kernels = _DECODE[i13.fmt]
    if num_threads == 1 or i13.nbytes + i2.nbytes < SERIAL_BYTES or max_threads() == 1:
        kernels[0](*args)  # on the calling thread: no launch, so no thread cap or launch lock
        return y_TD
    # The pool kernel settles the thread count itself (decode._threads_enter): 0 = the
    # calling thread's numba setting, -n = a cap of n for this call. No get/set of numba's
    # setting and no context manager here, each several microseconds from cold caches.
    nch = 0 if num_threads is None else -num_threads
    if launches_concurrent():
        kernels[1](*args, nch)
    else:
        with launch_guard():
            kernels[1](*args, nch)
    return y_TD


# decode format -> (calling-thread kernel, thread-pool kernel)
# int8 and int4: 16-bit multiply-add where measured faster (numba_util.REG_GEMV;
# gemv_madd.py, int4_madd.py), int4 against an 8-bit token where VNNI makes that
# faster still (int4_dot8.DOT8_DECODE); the fp32 kernels elsewhere.
if MADD_DECODE:
    _DECODE = {"bf16": (Dk.decode_bf16, Dk.decode_bf16_pool), "int8": (Dk.decode_int8_madd, Dk.decode_int8_madd_pool),
               "int4": ((Dk.decode_int4_dot8, Dk.decode_int4_dot8_pool) if DOT8_DECODE
                        else (Dk.decode_int4_madd, Dk.decode_int4_madd_pool))}
else:
    _DECODE = {"bf16": (Dk.decode_bf16, Dk.decode_bf16_pool), "int8": (Dk.decode_int8, Dk.decode_int8_pool),
               "int4": (Dk.decode_int4, Dk.decode_int4_pool)}


def _small_int4_views(x_TK: np.ndarray, w: Weight) -> tuple | None:
    """The (packed, words, scales) views when w takes a register-blocked int4 kernel
    (small_t_int4dp.py, or small_t_int4.py up to SMALL_T tokens), else None."""
    T = x_TK.shape[0]
    if not isinstance(w, Int4Weight) or T < 2 or (T > SMALL_T and not _int4dp(x_TK)):
        return None
    info = weight_info(w, "w")
    return info.views if info.fmt == "int4" else None


def _int8dp(x_TK: np.ndarray) -> bool:
    """Whether int8 weights against these tokens take 16-bit integer dot products
    (small_t_int8dp.py): T >= INT8DP_MIN_T on the hosts of INT8DP_SMALL_T."""
    return INT8DP_SMALL_T and x_TK.shape[0] >= INT8DP_MIN_T


def _int4dp(x_TK: np.ndarray) -> bool:
    """Whether int4 weights (group 128) against these tokens take byte dot products
    against 8-bit tokens (small_t_int4dp.py): T >= INT4DP_MIN_T on the hosts of
    INT4DP_SMALL_T."""
    return INT4DP_SMALL_T and x_TK.shape[0] >= INT4DP_MIN_T


def _matmul(x_TK: np.ndarray, w: Weight, out_TR: np.ndarray) -> None:
    """out_TR = x_TK @ w.T with the kernel for w's format."""
    nthreads = numba.get_num_threads()
    if nthreads == 1 or x_TK.shape[0] * weight_nbytes(w) < SERIAL_BYTES:
        _matmul_serial(x_TK, w, out_TR)
        return
    # One contiguous row range per thread (numba's prange schedule is static anyway).
    nch = max(1, min(out_TR.shape[1], nthreads))
    small = _small_int4_views(x_TK, w)
    if small is not None and _int4dp(x_TK):
        matmul_small_int4dp(x_TK, *small, out_TR, nch)
    elif small is not None:
        matmul_small_int4(x_TK, *small, out_TR, nch)
    elif isinstance(w, Int8Weight) and _int8dp(x_TK):
        matmul_small_int8dp(x_TK, w.q_RC.numpy(), w.scale_R.numpy(), out_TR, nch)
    elif isinstance(w, Int8Weight):
        K.matmul_int8(x_TK, w.q_RC.numpy(), w.scale_R.numpy(), out_TR, nch)
    elif isinstance(w, Int4Weight):
        matmul_int4(x_TK, w.packed_RB.numpy(), w.scale_RG.numpy(), w.group_size, out_TR, nch)
    elif w.dtype == torch.bfloat16:
        K.matmul_bf16(x_TK, w.detach().view(torch.int16).numpy().view(np.uint16), out_TR, nch)
    else:
        K.matmul_f32(x_TK, w.detach().numpy(), out_TR, nch)


def _matmul_bf16dp(x16_TK: np.ndarray, w: torch.Tensor, out_TR: np.ndarray) -> None:
    """out_TR = x16_TK @ w.T for bf16 token bits and bf16 weights, T >= 2, by
    bf16 dot products (small_t_bf16dp.py), on the pool or the calling thread as _matmul."""
    w_RK = w.detach().view(torch.int16).numpy().view(np.uint16)
    R = out_TR.shape[1]
    nthreads = numba.get_num_threads()
    if nthreads == 1 or x16_TK.shape[0] * weight_nbytes(w) < SERIAL_BYTES:
        rows_small_bf16dp(x16_TK, w_RK, out_TR, 0, R)
    else:
        matmul_small_bf16dp(x16_TK, w_RK, out_TR, max(1, min(R, nthreads)))


def _matmul_serial(x_TK: np.ndarray, w: Weight, out_TR: np.ndarray) -> None:
    """_matmul on the calling thread, without waking numba's thread pool."""
    R = out_TR.shape[1]
    small = _small_int4_views(x_TK, w)
    if small is not None and _int4dp(x_TK):
        matmul_small_int4dp(x_TK, *small, out_TR, 1)  # 1: no launch
    elif small is not None:
        matmul_small_int4_serial(x_TK, *small, out_TR)
    elif isinstance(w, Int8Weight) and _int8dp(x_TK):
        matmul_small_int8dp(x_TK, w.q_RC.numpy(), w.scale_R.numpy(), out_TR, 1)  # 1: no launch
    elif isinstance(w, Int8Weight):
        K.rows_int8(x_TK, w.q_RC.numpy(), w.scale_R.numpy(), out_TR, 0, R)
    elif isinstance(w, Int4Weight):
        matmul_int4_serial(x_TK, w.packed_RB.numpy(), w.scale_RG.numpy(), w.group_size, out_TR)
    elif w.dtype == torch.bfloat16:
        K.rows_bf16(x_TK, w.detach().view(torch.int16).numpy().view(np.uint16), out_TR, 0, R)
    else:
        K.rows_f32(x_TK, w.detach().numpy(), out_TR, 0, R)


def _check(x_TD: torch.Tensor, w13: Weight, w2: Weight,
           out: torch.Tensor | None) -> tuple[int, int, int, WeightInfo, WeightInfo, bool]:
    """(T, D, F, w13 info, w2 info, x is bfloat16) after checking every argument.

    Each tensor attribute is read once (see _decode on why torch calls are counted).
    """
    if not isinstance(x_TD, torch.Tensor):
        raise TypeError(f"x_TD must be a torch.Tensor, got {type(x_TD).__name__}")
    shape = x_TD.shape
    if len(shape) != 2:
        raise ValueError(f"x_TD must be 2-D [tokens, model_dim], got shape {tuple(shape)}")
    dtype = x_TD.dtype
    if dtype is not torch.float32 and dtype is not torch.bfloat16:
        raise ValueError(f"x_TD must be float32 or bfloat16, got {dtype}")
    if not x_TD.is_cpu:
        raise ValueError(f"x_TD must be on the CPU, got device {x_TD.device}")
    T, D = shape
    i13, i2 = weight_info(w13, "w13"), weight_info(w2, "w2")
    r13, c13 = i13.shape
    r2, c2 = i2.shape
    if r13 % 2:
        raise ValueError(f"w13 must stack gate and up rows, [2F, D], with an even row count; got {r13} rows")
    F_ = r13 // 2
    if c13 != D:
        raise ValueError(f"w13 is [{r13}, {c13}] but x_TD has model dim {D}; expected w13 [2F, {D}]")
    if (r2, c2) != (D, F_):
        raise ValueError(f"w2 must be [D, F] = [{D}, {F_}] to match x_TD and w13, got [{r2}, {c2}]")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        o_shape, o_dtype = out.shape, out.dtype
        if o_shape != shape or o_dtype is not dtype or not out.is_cpu:
            raise ValueError(f"out must be a CPU {dtype} tensor of shape ({T}, {D}); "
                             f"got {o_dtype} {tuple(o_shape)} on {out.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    return T, D, F_, i13, i2, dtype is torch.bfloat16


def expert_ffn(x_TD: torch.Tensor, w13: Weight, w2: Weight, out: torch.Tensor | None = None, *,
               num_threads: int | None = None) -> torch.Tensor:
    """One SwiGLU expert: ``(silu(x @ w1.T) * (x @ w3.T)) @ w2.T`` with w13 = [w1; w3].

    x_TD: [T, D] float32/bfloat16 CPU tensor (T may be 0). w13: [2F, D]; w2: [D, F];
    each a contiguous float32/bfloat16 CPU tensor or an Int8Weight/Int4Weight.
    out: optional [T, D] tensor of x's dtype to write into. Returns y_TD (x's dtype).
    num_threads: cap on numba threads for this call, in the calling thread only
    (None: the thread's current numba setting, by default all cores). Inference only:
    no autograd.
    """
    T, D, F_, i13, i2, bf16 = _check(x_TD, w13, w2, out)
    if num_threads is not None:
        thread_cap_check(num_threads)
    if T == 1 and D > 0 and F_ > 0 and i13.fmt is not None and i13.fmt == i2.fmt:
        return _decode(x_TD, bf16, i13, i2, out, num_threads)
    y_TD = out if out is not None else torch.empty((T, D), dtype=x_TD.dtype)
    if T == 0 or D == 0:
        return y_TD
    if F_ == 0:  # no hidden units: the expert maps everything to zero
        return y_TD.zero_()
    if x_TD.requires_grad:
        x_TD = x_TD.detach()
    x_TD = x_TD.contiguous()
    # Layout of the workspace: gu_T2F | h_TF | (bf16 only) xf_TD | yf_TD.
    n_mid = T * 3 * F_
    ws = _workspace(n_mid + (2 * T * D if bf16 else 0))
    gu_T2F = ws[: 2 * T * F_].reshape(T, 2 * F_)
    h_TF = ws[2 * T * F_: n_mid].reshape(T, F_)
    if bf16:
        xf_TD = ws[n_mid: n_mid + T * D].reshape(T, D)
        yf_TD = ws[n_mid + T * D: n_mid + 2 * T * D].reshape(T, D)
    else:
        xf_TD = x_TD.numpy()
        yf_TD = y_TD.numpy()
    with thread_cap(num_threads), launch_guard():
        x16_TD = x_TD.view(torch.int16).numpy().view(np.uint16) if bf16 else None
        if bf16 and BF16DP_SMALL_T and T >= 2 and isinstance(w13, torch.Tensor) \
                and w13.dtype == torch.bfloat16:
            _matmul_bf16dp(x16_TD, w13, gu_T2F)  # bf16 token x bf16 weights: exact products
        else:
            if bf16:
                widen_bf16(x16_TD, xf_TD)
            _matmul(xf_TD, w13, gu_T2F)
        swiglu_rows(gu_T2F, h_TF)
        _matmul(h_TF, w2, yf_TD)
        if bf16:
            narrow_to_bf16(yf_TD, y_TD.view(torch.int16).numpy().view(np.uint16))
    return y_TD


def _dense_f32(w: Weight) -> torch.Tensor:
    if isinstance(w, (Int8Weight, Int4Weight)):
        return w.dequantize(torch.float32)
    return w.to(torch.float32)


def expert_ffn_reference(x_TD: torch.Tensor, w13: Weight, w2: Weight) -> torch.Tensor:
    """Plain-torch definition of `expert_ffn` (fp32 math; quantised weights dequantised)."""
    T, D, F_, _, _, _ = _check(x_TD, w13, w2, None)
    w13_2FD, w2_DF = _dense_f32(w13), _dense_f32(w2)
    gu_T2F = x_TD.to(torch.float32) @ w13_2FD.T
    h_TF = F.silu(gu_T2F[:, :F_]) * gu_T2F[:, F_:]
    return (h_TF @ w2_DF.T).to(x_TD.dtype)

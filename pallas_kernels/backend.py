"""What a kernel backend provides (`KernelBackend`) and what it is asked (`KernelRequest`).

A backend is any object — typically a module such as ``pallas_kernels.triton`` — with
the members of `KernelBackend`. `pallas_kernels/registry.py` names it; the custom VJP
(pallas_kernels/flash_vjp.py) calls its forward and backward; `jaxattn` asks it
`supports(request)` before a call and `default_config(request)` for its tiles. The
full contract (tile lists, operand kinds, mask function, lse and dbias conventions) is
written in pallas_kernels/README.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from pallas_kernels.metadata import OPERAND_KINDS


@dataclasses.dataclass(frozen=True)
class KernelRequest:
    """One attention call as a backend sees it before any array exists: enough to say
    whether it can serve the call and with which tiles. Shapes as in the shape legend
    (query [B, T, N, H], key/value [B, S, K, H], bias [Bb, Hb, T|1, S|1]).

    dtype              numpy dtype of query, key and value (one dtype)
    batch, q_len, kv_len, num_heads, num_kv_heads, head_dim   B, T, S, N, K, H (unpadded)
    has_bias, bias_shape  whether an additive bias comes, and its 4-d shape
    operand_kinds      ((kind, layout_block), ...) of the mask operands the kernels load
    has_partial_tiles  the mask has a function to evaluate inside PARTIAL tiles
                       (False only for the full mask: every visited tile is FULL)
    logits_soft_cap    c of c·tanh(logits / c), or None
    dropout_rate       attention dropout's rate (0.0: none; pallas_kernels/dropout.py)
    has_score_mod      a score function (FlashStatic.score_mod) changes the logits
    platform           jax.default_backend() of the call ("gpu", "cpu", ...)
    device_kind        e.g. "NVIDIA H200" (None when unknown)
    """

    dtype: np.dtype
    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    has_bias: bool = False
    bias_shape: tuple[int, int, int, int] | None = None
    operand_kinds: tuple = ()
    has_partial_tiles: bool = False
    logits_soft_cap: float | None = None
    dropout_rate: float = 0.0
    has_score_mod: bool = False
    platform: str = "cpu"
    device_kind: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.has_bias != (self.bias_shape is not None):
            raise ValueError(f"KernelRequest: has_bias={self.has_bias} but bias_shape="
                             f"{self.bias_shape}; give a 4-d bias_shape exactly when has_bias.")
        if self.bias_shape is not None and len(self.bias_shape) != 4:
            raise ValueError(f"KernelRequest.bias_shape: expected 4 dims [Bb, Hb, T|1, S|1], "
                             f"got {self.bias_shape}.")
        for kind, _ in self.operand_kinds:
            if kind not in OPERAND_KINDS:
                raise ValueError(f"KernelRequest.operand_kinds: expected kinds from "
                                 f"{OPERAND_KINDS}, got {kind!r}.")

    @property
    def groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads


@runtime_checkable
class KernelBackend(Protocol):
    """The members every kernel backend has. Arrays are unpadded; the backend pads.

    name: the implementation name users pass (e.g. "pallas_triton").

    padded_head_dim(h): the head dim the kernels run at (q, k, v zero padded to it).

    supports(request, *, interpret) -> None when the backend can serve the request,
        otherwise the reason as one sentence (jaxattn raises NotImplementedError with
        it, so implementation=None moves on to the next implementation). Must be cheap
        and must not raise for a valid request.

    default_config(request, *, interpret) -> a frozen, hashable config whose
        ``metadata_tiles()`` maps "forward", "dkdv" and "dq" to the (block_q, block_kv)
        of the tile lists each kernel walks. With interpret=True it should choose small
        tiles, so CPU tests cross several tiles on small shapes.

    forward(static, q, k, v, bias, metas, operands) -> (out [B, T, N, H] in q's dtype,
        lse [B, N, T] in the accumulation dtype, natural log, -inf on empty rows).

    backward(static, q, k, v, bias, out, lse, dout, delta, metas, operands, parts)
        -> (dq, dk, dv, dbias). lse is the backward lse (+inf on empty rows), delta is
        D = rowsum(dO ∘ O) − dlse [B, N, T], as an array or as a
        pallas_kernels.common.DeltaOfOutput (not yet formed: the backend forms it from
        out and dout, in a kernel or by common.delta_array). parts ⊆ ("dq", "dkdv",
        "dbias"): the halves asked for; the others come back None. dbias has the bias's shape and dtype.

    decode: the KV-cache decode entry, or None when the backend has none:
        decode(static, q, k_cache, v_cache, lengths, page_table=None, operands=(),
               score_operands=()) -> (out [B, Tq, N, H], lse [B, N, Tq] float32), `static` a
        pallas_kernels.decode_static.DecodeStatic (contract written there).

    metadata_reason (optional): metadata_reason(static, metas) -> None, or why this call
        cannot run once its block metadata is known (e.g. the mask leaves keys inside a
        PARTIAL tile that no query of the tile attends, and the kernels do not zero such
        rows: BlockMetadata.partial_isolates_keys). Checked before any kernel is traced,
        with the same NotImplementedError fallback as supports().

    `static` is a pallas_kernels.flash_vjp.FlashStatic; `metas` maps the names of
    ``config.metadata_tiles()`` to BlockMetadata; `operands` are the mask operand arrays
    in the order of ``static.operand_kinds``.
    """

    name: str
    decode: Callable | None

    def padded_head_dim(self, h: int) -> int: ...

    def supports(self, request: KernelRequest, *, interpret: bool) -> str | None: ...

    def default_config(self, request: KernelRequest, *, interpret: bool) -> Any: ...

    def forward(self, static, q, k, v, bias, metas, operands): ...

    def backward(self, static, q, k, v, bias, out, lse, dout, delta, metas, operands,
                 parts=("dq", "dkdv", "dbias")): ...

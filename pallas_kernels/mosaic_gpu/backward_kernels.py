"""FlashAttention backward on Hopper with Pallas Mosaic GPU: entry point, config, and
what it declines.

Two kernels, no floating-point atomics, so two runs are bitwise identical:

* dK/dV: work items (kv-block, kv head, batch row) walking the TRANSPOSED tile lists,
  the G query heads of its KV head looped in-kernel;
* dQ: work items (q-block, query head, batch row) walking the forward lists.

By default each kernel is persistent (backward_dkdv_persistent.py,
backward_dq_persistent.py): one CTA per SM loops over a balanced share of the items,
loading the next item's resident tiles during the current one. With
MosaicBackwardConfig(persistent=False), one CTA per item (backward_dkdv.py,
backward_dq.py). Either way a tile's products are backward_tiles.py's. At head dim 256
the dK/dV warpgroups split the columns instead of the rows and the dQ kernel runs one
warpgroup (MosaicBackwardConfig's docstring).

Or, with MosaicBackwardConfig.fused, one kernel: the dK/dV kernel also adding dQ's
partial sums in a fixed order (backward_fused.py; deterministic too, but measured slower
on the H200, so off).

Both skip EMPTY tiles (never loaded), do no mask work on FULL tiles, and on PARTIAL
tiles select P (and dS) to exactly 0 where static.mask_fn or kv_pos >= kv_len rules a
pair out, and in the dK/dV kernels where q_pos >= T (below).
D = rowsum(dO ∘ O) − dlse comes precomputed, or, when it comes as a DeltaOfOutput
(pallas_kernels/common.py) and the persistent dQ kernel runs, that kernel forms it from
the O and dO rows of its items and the dK/dV kernel, run after it, reads its D. The
backward lse comes precomputed (+inf on rows with no allowed key, so P = 0 there).

Inputs are zero-padded to whole tiles along T and S and to a multiple of 64 along the
head dim (wgmma's K). Padded query rows get lse = 0, D = 0 and dO = 0, so with finite
inputs their P is finite and their dS and dV contributions are zero. With a mask, the
dK/dV kernels' PARTIAL tiles also rule them out (q_pos < T): evaluated past T, a mask
would let them reach keys no query attends, where a NaN/Inf in K or V (padding,
unwritten slots) would meet their P = 1 (the dQ kernel drops their rows anyway). Padded
keys sit only in PARTIAL tiles, where kv_pos < kv_len masks them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import DeltaOfOutput, delta_array, padded_query_len
from pallas_kernels.mosaic_gpu.backward_dkdv import dkdv_call
from pallas_kernels.mosaic_gpu.backward_dq import dq_call
from pallas_kernels.mosaic_gpu.backward_dq_persistent import dq_persistent_call
from pallas_kernels.mosaic_gpu.backward_dkdv_persistent import dkdv_persistent_call
from pallas_kernels.mosaic_gpu.backward_fused import contributor_ranks
from pallas_kernels.mosaic_gpu.backward_walk import LOG2E
from pallas_kernels.mosaic_gpu.common import prepare_operands

ROWS_PER_WARPGROUP = 64     # the M of one wgmma
SMEM_BYTES = 227 * 1024     # what one sm90 CTA may allocate (checked at lowering)


@dataclasses.dataclass(frozen=True)
class MosaicBackwardConfig:
    """Tiles of the two backward kernels. The dK/dV kernel splits block_kv_dkv between
    `compute_warpgroups` warpgroups of 64 rows each (or, with `split_columns`, both
    share its 64 rows and split the head dim), the dQ kernel block_q_dq between
    `dq_warpgroups`; `num_stages` tiles of the streamed operand are in flight.

    fused (off): one kernel for dK, dV and dQ (backward_fused.py); it needs
    block_q_dkv = 64 and adds 16 KB of dSᵀ and 64 KB of float32 dQ staging to the dK/dV
    kernel's shared memory at D128 (~209 KB in all).

    Defaults (bf16, D 64/128, jax 0.11.2): tokamax's sm90 VJP heuristic and
    FlashAttention-3's backward (64-row warpgroup tiles, 2 stages), with two compute
    warpgroups per CTA. Shared memory at D128: dK/dV K and V of 128 rows (64 KB) + 2
    stages of Q and dO (64 KB); dQ Q and dO of 128 rows (64 KB) + 2 stages of K and V
    (64 KB); the persistent kernels hold two of the resident pair (~193 and 192 KB).
    Registers per compute thread at D128: dK and dV accumulators 64 + 64, Sᵀ and dPᵀ
    32 + 32 (of the 232 the default memory_registers leaves each of two compute
    warpgroups).

    Head dim 256 (default_backward_config): dK and dV of 64 keys over 256 columns would
    be 256 registers a thread, and a second resident buffer does not fit in shared
    memory. So the dK/dV kernel's two warpgroups share 64 keys and split the columns
    (`split_columns`: each accumulates dK and dV over 128 of them, 64 + 64 registers)
    and share the tile's full-depth products (`share_products`: warpgroup 0 forms Sᵀ and
    Pᵀ, warpgroup 1 dPᵀ and dSᵀ, handed over through shared memory), the dQ kernel runs
    one warpgroup of 64 query rows over all 256 columns (`dq_warpgroups` = 1: dQ 128
    registers, S and dP 32 + 32, of the 256 a lone compute warpgroup may take), and both
    keep one buffer of their resident tiles (`resident_buffers` = 1): ~210 and ~193 KiB of
    shared memory. On an H200 sharing the products made the D256 S16k training step 17–20 %
    faster than both warpgroups forming both (causal 417 against 355 TFLOP/s, full 434
    against 363; cuDNN 394, 390; BENCHMARKS.md, thirteenth run)."""
    block_q_dkv: int = 64
    block_kv_dkv: int = 128
    block_q_dq: int = 128
    block_kv_dq: int = 64
    compute_warpgroups: int = 2
    num_stages: int = 2
    # One kernel for dK, dV and dQ (backward_fused.py: 5 products per tile instead of 7,
    # dQ's partial sums added in a fixed order) instead of the dK/dV and dQ kernels, when
    # both are wanted (it runs one CTA per kv-block; `persistent` then applies only to a
    # backward that wants dQ alone or dK/dV alone).
    fused: bool = False
    # Both kernels as one CTA per SM looping over their blocks, the next block's resident
    # tiles (K/V for dK/dV, Q/dO for dQ) and first streamed tiles loaded during the current
    # one (backward_dkdv_persistent.py, backward_dq_persistent.py), instead of one CTA per
    # block. On an H200 the persistent pair ran every measured case faster than the
    # per-block kernels, same gradients bitwise (BENCHMARKS.md, "Sixth run of the day").
    # Their dK/dV deal is an LPT table from the masks' static counts: up to ~1 s of host
    # time for a new shape at the table's item limit, then cached.
    persistent: bool = True
    # Registers per thread left to the memory warpgroup (setmaxnreg); each compute
    # warpgroup gets (512 - memory_registers) / compute_warpgroups, rounded down to 8 and
    # at most 256 (232 with the defaults).
    memory_registers: int = 40
    # Compute warpgroups of the dQ kernel (block_q_dq = 64 × this); None: as many as
    # `compute_warpgroups`, the dK/dV kernel's.
    dq_warpgroups: int | None = None
    # The dK/dV kernel's two warpgroups share block_kv_dkv = 64 keys and each keeps half
    # of dK's and dV's columns (head dim 256; the persistent kernel only).
    split_columns: bool = False
    # Buffers of the resident tiles (K/V, Q/dO) in the persistent kernels: with 2 the
    # next item's load overlaps this item; 1 where two do not fit (head dim 256).
    resident_buffers: int = 2
    # With split_columns: each of Sᵀ and dPᵀ formed once, by one warpgroup, Pᵀ and dSᵀ
    # handed over through shared memory (4 products a tile instead of 6; calls with a soft
    # cap keep the 6: dSᵀ would need the cap's tanh too). On at head dim 256.
    share_products: bool = False

    def __post_init__(self):
        for name in ("block_q_dkv", "block_kv_dq"):
            value = getattr(self, name)
            if value <= 0 or value % 64:
                raise ValueError(f"MosaicBackwardConfig.{name} must be a positive multiple of 64 "
                                 f"(wgmma's K), got {value}.")
        for flag in ("fused", "persistent", "split_columns", "share_products"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"MosaicBackwardConfig.{flag} must be True or False, got "
                                 f"{getattr(self, flag)!r}.")
        if self.dq_warpgroups is None:
            object.__setattr__(self, "dq_warpgroups", self.compute_warpgroups)
        for name in ("compute_warpgroups", "dq_warpgroups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value not in (1, 2):
                raise ValueError(f"MosaicBackwardConfig.{name} must be 1 or 2, got {value!r}.")
        dkdv_owners = 1 if self.split_columns else self.compute_warpgroups
        for name, owners, what in (("block_kv_dkv", dkdv_owners, "dK/dV"),
                                   ("block_q_dq", self.dq_warpgroups, "dQ")):
            value = getattr(self, name)
            if value != ROWS_PER_WARPGROUP * owners:
                shared = " (split_columns: both share the rows)" if name == "block_kv_dkv" \
                    and self.split_columns else ""
                knob = "dq_warpgroups" if name == "block_q_dq" else "compute_warpgroups"
                raise ValueError(
                    f"MosaicBackwardConfig.{name} must be {ROWS_PER_WARPGROUP} rows per {what} "
                    f"warpgroup × {owners} = {ROWS_PER_WARPGROUP * owners}{shared}, got {value}: "
                    f"set {name}={ROWS_PER_WARPGROUP * owners} or change {knob}.")
        if (not isinstance(self.resident_buffers, int) or isinstance(self.resident_buffers, bool)
                or self.resident_buffers not in (1, 2)):
            raise ValueError(f"MosaicBackwardConfig.resident_buffers must be 1 or 2, got "
                             f"{self.resident_buffers!r}.")
        if self.split_columns and (self.compute_warpgroups != 2 or not self.persistent
                                   or self.fused):
            raise ValueError(
                "MosaicBackwardConfig(split_columns=True) runs the persistent dK/dV kernel "
                "with two compute warpgroups, one per column half: it needs "
                "compute_warpgroups=2, persistent=True and fused=False, got "
                f"compute_warpgroups={self.compute_warpgroups}, persistent={self.persistent}, "
                f"fused={self.fused}.")
        if self.num_stages < 1:
            raise ValueError(f"MosaicBackwardConfig.num_stages must be >= 1, got {self.num_stages}.")
        if (not isinstance(self.memory_registers, int) or isinstance(self.memory_registers, bool)
                or self.memory_registers % 8 or not 24 <= self.memory_registers <= 256):
            raise ValueError("MosaicBackwardConfig.memory_registers must be a multiple of 8 "
                             f"between 24 and 256 (setmaxnreg's range), got {self.memory_registers}.")
        if self.share_products and not self.split_columns:
            raise ValueError("MosaicBackwardConfig(share_products=True) hands products between the "
                             "warpgroups of split_columns, got split_columns=False: start from "
                             "default_backward_config(256).")
        if self.fused and self.block_q_dkv != ROWS_PER_WARPGROUP:
            raise ValueError(
                f"MosaicBackwardConfig(fused=True) needs block_q_dkv={ROWS_PER_WARPGROUP} (its "
                f"dQ partial is one [{ROWS_PER_WARPGROUP}, D] float32 accumulator per warpgroup "
                f"beside dK and dV), got {self.block_q_dkv}.")

    def metadata_tiles(self) -> dict[str, tuple[int, int]]:
        return {"dkdv": (self.block_q_dkv, self.block_kv_dkv),
                "dq": (self.block_q_dq, self.block_kv_dq)}

    def kernel_smem_bytes(self, head_dim: int, itemsize: int) -> dict[str, int]:
        """Shared memory of each kernel this config can run ("dkdv", "dq", and "fused"
        when fused): operand tiles, the fused kernel's dSᵀ and float32 dQ staging, the
        shared products' Pᵀ and dSᵀ hand-overs, and 1 KB for barriers and alignment."""
        row = head_dim * itemsize
        resident_buffers = self.resident_buffers if self.persistent else 1
        streamed_dkdv = self.num_stages * (2 * self.block_q_dkv * row + 2 * self.block_q_dkv * 4)
        handover = 2 * self.block_kv_dkv * self.block_q_dkv * itemsize if self.share_products else 0
        sizes = {"dkdv": resident_buffers * 2 * self.block_kv_dkv * row + streamed_dkdv + handover,
                 "dq": resident_buffers * 2 * self.block_q_dq * row
                 + self.num_stages * 2 * self.block_kv_dq * row}
        if self.fused:
            sizes["fused"] = (2 * self.block_kv_dkv * row + streamed_dkdv
                              + self.block_kv_dkv * self.block_q_dkv * itemsize
                              + self.compute_warpgroups * self.block_q_dkv * head_dim * 4)
        return {name: size + 1024 for name, size in sizes.items()}

    def smem_bytes(self, head_dim: int, itemsize: int) -> int:
        """The largest shared memory of the kernels this config can run."""
        return max(self.kernel_smem_bytes(head_dim, itemsize).values())


def default_backward_config(head_dim: int) -> MosaicBackwardConfig:
    """Config for a padded head dim: one shape serves 64 and 128 (more stages did not
    fit a measured gain yet); 256 splits the dK/dV columns (class docstring)."""
    if head_dim <= 128:
        return MosaicBackwardConfig()
    return MosaicBackwardConfig(block_kv_dkv=ROWS_PER_WARPGROUP, block_q_dq=ROWS_PER_WARPGROUP,
                                dq_warpgroups=1, split_columns=True, resident_buffers=1,
                                share_products=True)


def padded_head_dim(h: int) -> int:
    """Head dim the backward kernels run at: wgmma's K is a multiple of 64; above 128,
    256 (the column halves of split_columns are 128 wide)."""
    return -(-h // 64) * 64 if h <= 128 else 256


def backward_supports(request) -> str | None:
    """None if the backward kernels can serve `request` (a KernelRequest: dtype,
    head_dim, has_bias, operand_kinds); otherwise why not."""
    dtype = jnp.dtype(request.dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"the Mosaic GPU backward runs bfloat16 and float16, not {dtype}"
    if request.head_dim > 256:
        return f"the Mosaic GPU backward runs head dims up to 256, got {request.head_dim}"
    hp = padded_head_dim(request.head_dim)
    if request.has_bias:
        return ("the Mosaic GPU backward kernels add no bias and compute no bias gradient (the "
                "backend's default_config gives such calls the Triton backward)")
    return _operands_reason(request.operand_kinds, default_backward_config(hp))


def _operands_reason(kinds, config: MosaicBackwardConfig) -> str | None:
    """Mask operands the kernels read: segment ids ("q", "kv") and block layouts whose
    blocks are whole tiles of both kernels ("block"); not dense [T, S] masks ("qkv")."""
    for kind, layout_block in kinds:
        if kind == "qkv":
            return ("the Mosaic GPU backward kernels read no dense ('qkv') mask operands (the "
                    "backend's default_config gives such calls the Triton backward)")
        if kind == "block":
            lbq, lbk = layout_block
            for name, (bq, bk) in config.metadata_tiles().items():
                if lbq % bq or lbk % bk:
                    return (f"block-sparse layout blocks {layout_block} are not multiples of "
                            f"the Mosaic GPU backward's {name} tiles {(bq, bk)}")
    return None


def _pad(x, axis: int, size: int):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def backward(static, q, k, v, bias, out, lse, dout, delta, metas, operands,
             parts=("dq", "dkdv", "dbias")):
    """(dq, dk, dv, dbias) per the backend contract; what `parts` does not ask for is
    None. Raises NotImplementedError for what backward_supports declines."""
    if bias is not None:
        raise NotImplementedError("the Mosaic GPU backward has no bias yet")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"the Mosaic GPU backward runs bfloat16/float16, not {q.dtype}")
    config = static.config if isinstance(static.config, MosaicBackwardConfig) else getattr(
        static.config, "backward", None)
    if not isinstance(config, MosaicBackwardConfig):
        config = default_backward_config(padded_head_dim(q.shape[-1]))
    t, h = q.shape[1], q.shape[3]
    s = k.shape[1]
    if h > 256:
        raise NotImplementedError(f"the Mosaic GPU backward runs head dims up to 256, got {h}")
    hp = padded_head_dim(h)
    if config.split_columns and hp != 256:
        raise ValueError(f"MosaicBackwardConfig(split_columns=True) splits head dim 256 into "
                         f"two halves of 128; this call's head dim pads to {hp}: use "
                         f"default_backward_config({hp}).")
    if hp > 128 and "dkdv" in parts and not config.split_columns:
        raise ValueError(f"MosaicBackwardConfig at head dim {hp} needs split_columns=True (dK and "
                         f"dV of 64 keys × {hp} columns in float32 would take {hp} registers a "
                         f"thread); got split_columns=False: use default_backward_config({hp}).")
    want_dq, want_dkdv = "dq" in parts, "dkdv" in parts
    tiles = {name: (metas[name].block_q, metas[name].block_kv)
             for name, wanted in (("dq", want_dq), ("dkdv", want_dkdv)) if wanted}
    for name, (bq, bk) in tiles.items():
        if (bq, bk) != config.metadata_tiles()[name]:
            raise ValueError(f"metas[{name!r}] is built for tiles {(bq, bk)}, the Mosaic GPU "
                             f"backward config expects {config.metadata_tiles()[name]}: build "
                             "the metadata from config.metadata_tiles()")
    # whole tiles of every kernel that runs (block sizes are multiples of 64, not
    # necessarily of each other)
    tp = _round_up(t, math.lcm(*(bq for bq, _ in tiles.values()))) if tiles else t
    sp = _round_up(s, math.lcm(*(bk for _, bk in tiles.values()))) if tiles else s
    reason = _operands_reason(static.operand_kinds, config)
    if reason is not None:
        raise NotImplementedError(reason)
    running = ("fused",) if want_dkdv and want_dq and config.fused else tuple(tiles)
    # with a soft cap the dK/dV warpgroups form both products (no hand-over buffers)
    share = config.share_products and static.logits_soft_cap is None
    sizes = dataclasses.replace(config, share_products=share).kernel_smem_bytes(hp, q.dtype.itemsize)
    for kernel in running:
        if sizes[kernel] > SMEM_BYTES:
            persistent_fix = ""
            if config.persistent and kernel != "fused" and config.resident_buffers == 2:
                persistent_fix = (", or set resident_buffers=1 (one buffer of the resident "
                                  "tiles instead of two)" if config.split_columns else
                                  ", or set persistent=False or resident_buffers=1 (one buffer "
                                  "of the resident tiles instead of two)")
            raise ValueError(
                f"MosaicBackwardConfig's {kernel} kernel needs {sizes[kernel]} bytes of shared "
                f"memory per CTA at head dim {hp} ({q.dtype.name}), more than the {SMEM_BYTES} "
                f"an sm90 CTA may allocate: lower num_stages or its block sizes"
                f"{persistent_fix}; got {config}.")

    def btnh(x, length):
        return _pad(_pad(x, 1, length), 3, hp)

    qp, dop = btnh(q, tp), btnh(dout.astype(q.dtype), tp)
    kp, vp = btnh(k.astype(q.dtype), sp), btnh(v.astype(q.dtype), sp)
    # The kernels read lse·log2e (exp2 with log2e folded in); +inf stays +inf.
    lse2 = _pad(lse.astype(jnp.float32) * LOG2E, 2, tp)
    # D formed by the persistent dQ kernel, or by XLA here.
    dq_forms_delta = (isinstance(delta, DeltaOfOutput) and want_dq and config.persistent
                      and not (want_dkdv and config.fused))
    delta_p = None if dq_forms_delta else _pad(
        delta_array(delta, out, dout).astype(jnp.float32), 2, tp)
    dq_args = dict(wgs=config.dq_warpgroups, resident_buffers=config.resident_buffers)
    common = dict(stages=config.num_stages,
                  memory_registers=config.memory_registers, scale=static.scale,
                  cap=static.logits_soft_cap, mask_fn=static.mask_fn, kv_len=s,
                  operands=prepare_operands(operands, static.operand_kinds, q_pad=tp, kv_pad=sp),
                  operand_kinds=static.operand_kinds)

    # The dK/dV kernels' padding rows past T must attend nothing (the forward's and dQ's
    # padding rows only write rows that are dropped; keys they reach are checked like any
    # unattended key, nonfinite_fallback.py).
    padded_q_len = padded_query_len(static.mask_fn, t, tp)
    dq = dk = dv = None
    fused = want_dkdv and want_dq and config.fused
    if want_dq and not fused:
        # Before dK/dV: when the dQ kernel forms D, the dK/dV kernel reads it.
        m = metas["dq"]
        lists = (m.full_count, m.full_index, m.partial_count, m.partial_index)
        lists = tuple(jnp.asarray(a, jnp.int32) for a in lists)
        if dq_forms_delta:
            dlse = None if delta.dlse is None else _pad(delta.dlse.astype(jnp.float32), 2, tp)
            dq, delta_p = dq_persistent_call(qp, kp, vp, dop, lse2, None, lists, block_q=m.block_q,
                                             block_kv=m.block_kv, meta=m, out=btnh(out, tp),
                                             dlse=dlse, **dq_args, **common)
            # D holds the dQ kernel's q-blocks; the dK/dV kernel's may reach further (tiles
            # whose sizes do not divide each other): zeros there, as for every padded row.
            delta_p = _pad(delta_p, 2, tp)
        elif config.persistent:
            dq = dq_persistent_call(qp, kp, vp, dop, lse2, delta_p, lists, block_q=m.block_q,
                                    block_kv=m.block_kv, meta=m, **dq_args, **common)
        else:
            dq = dq_call(qp, kp, vp, dop, lse2, delta_p, lists, block_q=m.block_q,
                         block_kv=m.block_kv, wgs=config.dq_warpgroups, **common)
        dq = dq[:, :t, :, :h]
    if fused:
        m = jax.tree.map(lambda a: jnp.asarray(a, jnp.int32), metas["dkdv"])
        lists = (m.t_full_count, m.t_full_index, m.t_partial_count, m.t_partial_index)
        rank_full, rank_partial, visitors = contributor_ranks(m)
        sums, dk, dv = dkdv_call(qp, kp, vp, dop, lse2, delta_p, lists, block_q=m.block_q,
                                 block_kv=m.block_kv, rank_arrays=(rank_full, rank_partial),
                                 q_len=padded_q_len, wgs=config.compute_warpgroups, **common)
        # q-blocks that no kv-block visits were never written: their dQ is 0.
        b, n = q.shape[0], q.shape[2]
        seen = _pad(jnp.broadcast_to(visitors > 0, (b, n, visitors.shape[-1])), 2,
                    tp // m.block_q)
        seen = jnp.repeat(seen, m.block_q, axis=2)[..., None]
        dq = jnp.swapaxes(jnp.where(seen, sums * static.scale, 0.0), 1, 2)
        dq = dq[:, :t, :, :h].astype(q.dtype)
        return dq, dk[:, :s, :, :h].astype(k.dtype), dv[:, :s, :, :h].astype(v.dtype), None
    if want_dkdv:
        m = metas["dkdv"]
        lists = (m.t_full_count, m.t_full_index, m.t_partial_count, m.t_partial_index)
        lists = tuple(jnp.asarray(a, jnp.int32) for a in lists)
        if config.persistent:
            dk, dv = dkdv_persistent_call(qp, kp, vp, dop, lse2, delta_p, lists, block_q=m.block_q,
                                          block_kv=m.block_kv, meta=m, q_len=padded_q_len,
                                          wgs=config.compute_warpgroups,
                                          resident_buffers=config.resident_buffers,
                                          split_columns=config.split_columns,
                                          share_products=share, **common)
        else:
            dk, dv = dkdv_call(qp, kp, vp, dop, lse2, delta_p, lists, block_q=m.block_q,
                               block_kv=m.block_kv, q_len=padded_q_len,
                               wgs=config.compute_warpgroups, **common)
        dk, dv = dk[:, :s, :, :h].astype(k.dtype), dv[:, :s, :, :h].astype(v.dtype)
    return dq, dk, dv, None

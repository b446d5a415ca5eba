"""What the GPU compile check compiles: one ``CompileSpec`` per (kernel, launch config) that a launcher's heuristic
can pick for the supported models' shapes. Each kernel module exposes ``compile_specs() -> list[CompileSpec]``;
``llmkern.inspect`` compiles them for sm_80 / sm_90 and reads registers, shared memory and spills."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileSpec:
    name: str  # e.g. "rms_norm[BLOCK_M=1,BLOCK_N=1024,fp16]": unique, human-readable
    fn: object  # the @triton.jit function
    signature: dict  # non-constexpr argument name -> Triton type string ("*fp16", "*i32", "i32", "i64", "fp32")
    constexprs: dict  # constexpr argument name -> value, plus any integer args Triton would specialise (== 1)
    num_warps: int = 4
    num_stages: int = 3
    meta: dict = field(default_factory=dict)  # free-form: the shape/model this config serves
    maxnreg: int | None = None  # a register cap per thread passed to ptxas (``.maxnreg``); None: ptxas chooses

"""jaxattn benchmarks: FLOP model, GPU timing harness, named cases, and the engines
behind the `jaxattn compare` and `jaxattn bench` commands.

Modules:
  flops    FLOP model of ../shared/ANCHORS.md, with exact allowed-pair counts per mask
  timing   warm-up + median timing with block_until_ready and rotated inputs
  cases    the named bench cases (ANCHORS.md) and the compare methods
  compare  the length sweep behind `jaxattn compare`
  bench    the TFLOP/s table behind `jaxattn bench`
  report   text tables and JSON
  plots    PNG plots (matplotlib, Agg backend)
"""

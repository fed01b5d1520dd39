"""The engines behind `jaxattn compare` and `jaxattn bench`, one concern per module.

  flops     the FLOP model (useful work only) and exact allowed-pair counts per mask
  timing    warm-up, then the median of timed calls, with inputs rotated past the GPU's L2
  cases     the named bench cases and the methods `jaxattn compare` sweeps
  compare   the length sweep: time, memory, FLOPs and errors, measured case by case
  bench     TFLOP/s of our kernels beside jax.nn's xla and cudnn, in the same process
  report    run metadata, the run header, JSON files and text tables (rich.table)
  progress  one progress display per run, or one line per measurement without a terminal
  plots     PNG plots (matplotlib, Agg backend)
  commands  what `jaxattn compare` and `jaxattn bench` run once their options are parsed

Nothing is imported here, so `import jaxattn.cli` stays light; import the module you need.
"""

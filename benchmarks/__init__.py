"""Performance harness: paired speed and memory measurements that print tables and write JSON.

Suites (``python -m benchmarks [--quick] [--only ...]``): ``training`` (meta-training step time
and peak memory of smat, pmf and lora, plus a profile of one SMAT step), ``pipeline`` (episode
loading per reader), ``evaluation`` (zero-shot and fine-tuning protocols), ``scaling`` (cost vs
support size), ``distributed`` (meta-training tasks/s with 1 vs 2 torchrun processes), ``paper`` (the paper preset's
steps, ViT-S at 128 and 224 px in bf16, and a short end-to-end ``paper`` run; needs a GPU beyond smoke). Speed
targets live here, never in timed tests: each suite reports its targets with the measured value
and a pass flag.
"""

SUITES: tuple[str, ...] = ("training", "pipeline", "evaluation", "scaling", "distributed", "paper")

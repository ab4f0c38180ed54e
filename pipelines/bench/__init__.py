"""All measurement code of the project; the package `dcfeat` never imports it.

* `speed`: decoding, extraction, training-step, epoch and query timings (CPU and GPU).
* `quality`: learning quality and query speed of every method on the synthetic feature city.
* `finetune`: tuning the last backbone blocks from cached tokens.
* `cpu`: the CPU run behind BENCHMARKS.md (`measure`); `render`: BENCHMARKS.md from recorded results.

The scripts in pipelines/ that use it put the repository root on sys.path first.
"""

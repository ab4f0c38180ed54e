"""Seeded synthetic cities for the demo, the tests and the benchmarks.

* `features`: a city of backbone *features* (no images), fast enough for learning-quality tests.
* `streets` and `photos`: a city of rendered street *photos* with SF-XL file names, for the whole
  pipeline from images (the demo).
"""

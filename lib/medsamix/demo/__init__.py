"""Demo and benchmarks: phantoms, the embedded sample studies, the ../shared/data task sets, tiny-pool training."""

"""DEC (Deep Embedded Clustering, Xie et al. 2016) with E²CM early exits: unsupervised early exit.

The ``dec`` backbone (``backbone``: the d–500–500–2000–10 encoder) and the ``dec-e2cm`` exit
strategy (``strategy``: DEC_small / DEC_middle / DEC_large with class-means exits on cluster
centres), registered lazily by ``eebench_plugins.manifests.dec``; this package imports nothing.
"""

"""The MLAAN paper's analyses of trained runs: linear CKA (`cka`), layer-wise linear probes (`probe`) and
their figures (`figures`). `python -m fastlocal.analyze` runs them on run directories."""

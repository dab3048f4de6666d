"""Tools: the benchmark, the GPU stage, shipping a model, and the generators of docs/ (run as python -m tools.<name>)."""

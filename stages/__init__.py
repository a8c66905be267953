"""The MNIST pipeline: a module per DVC stage (prepare, split, check_params, train, evaluate) and per command (tune,
promote, predict, runs, numerics); `common/` and `lib/` say in their docstrings which stages import them."""

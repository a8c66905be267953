"""The MNIST pipeline: one module per DVC stage (prepare, split, train, evaluate).

`common/` is imported by every stage, so dvc.yaml lists the folder once per stage; `lib/`
holds what only some stages use, listed module by module where it is used.
"""

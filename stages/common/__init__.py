"""What every stage imports: errors and the CLI, params, paths, atomic outputs, the dataset's shape
and the record format. A change here reruns the whole pipeline."""

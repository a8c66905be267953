"""What only some stages use; dvc.yaml lists each module for the stages that import it."""

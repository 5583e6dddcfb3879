"""Task-vector maths: statistics, blocks, merge methods (a registry), selection scores."""

"""The offline example zoo (a tiny CLIP on scikit-learn's digits) and the `tvtool demo` pipeline."""

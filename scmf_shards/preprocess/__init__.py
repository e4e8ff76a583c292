"""Fitting the preprocessing that needs the whole dataset: highly variable genes (out of
core, scanpy-exact) and scran pooled size factors; the conversion stages that stream the
inputs for them; and ``preprocess_h5ad`` (``scmf-convert preprocess``)."""

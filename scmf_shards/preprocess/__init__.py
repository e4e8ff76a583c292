"""The converter's preprocessing passes: the conversion stages that stream the inputs to fit
highly variable genes and scran size factors out of core (:mod:`.stats`), and
``preprocess_h5ad`` (``scmf-convert preprocess``, :mod:`.h5ad`). The fitting math itself
lives in :mod:`scmf_loader.preprocess` (``hvg``, ``scran``)."""

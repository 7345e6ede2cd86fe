"""Gradients in a layout the recorder's reductions can read.

``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)`` (a recommender's tables,
trained by ``SparseAdam`` or ``Adagrad``) give their weight a sparse COO gradient: only the
rows the batch touched, as indices and values, a row repeated once per lookup. Torch's norms
do not run on that layout (``aten::linalg_vector_norm`` has no SparseCPU kernel). Coalesced
(repeats summed), its values hold every non-zero of the whole gradient, so their L2 norm,
largest |x| and NaN/Inf count are the whole gradient's; a moment over every element (a mean,
a standard deviation) also counts the zeros, and reads the dense tensor.
"""

from __future__ import annotations

import torch

#: Layouts that hold values apart from their indices (COO, CSR, CSC, BSR, BSC).
SPARSE_LAYOUTS = frozenset(
    {torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc}
)


def is_sparse(t: torch.Tensor) -> bool:
    return t.layout in SPARSE_LAYOUTS


def norm_view(t: torch.Tensor) -> torch.Tensor:
    """A strided tensor with ``t``'s L2 norm, largest |x| and non-finite count: a sparse
    tensor's coalesced values (COO: (nnz, *dense dims)), any other tensor itself."""
    if not is_sparse(t):
        return t
    return t.coalesce().values() if t.layout == torch.sparse_coo else t.values()


def dense_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every element, zeros included, for moments over the whole tensor: a sparse
    tensor densified (as large as its parameter), any other tensor itself."""
    return t.to_dense() if is_sparse(t) else t

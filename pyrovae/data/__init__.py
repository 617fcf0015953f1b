"""Data: loaders for standard formats (each takes a local directory), splits and device-resident batching.

The batch contract
------------------

A batch is a dict of tensors with the examples on dim 0 (B rows). The loop, ``evaluate``,
``sample``, the plots and the analysis pass the whole dict to the model and the guide as keyword
arguments, and :meth:`pyrovae.DataSpec.check_batch` (run by ``Model.check_batch`` on the first
training batch) checks the keys it knows:

============  =============================  ===================================================
key           dtype, shape                   meaning
============  =============================  ===================================================
``x``         float (B, *x_shape), or int    the data; integer tokens/categories when the spec's
              (B, T, ...) for tokens         ``support`` is ``"categorical"`` (values in
                                             ``[0, num_categories)`` at real positions); for
                                             ``variable_length`` data 1 <= T <= ``x_shape[0]``
``y``         int (B,)                       labels: class indices in ``[0, num_classes)``
              or 0/1 (B, num_classes)        (``label_format = "integer"``), or multi-hot
                                             (``label_format = "multi_hot"``)
``y_mask``    bool (B,)                      which labels are observed (semi-supervised data);
                                             hidden labels still hold a valid class (0)
``mask``      bool (B, T)                    which positions of a sequence are real
``lengths``   int (B,)                       sequence lengths, 1 <= length <= T; with ``mask``,
                                             mask[n, t] == (t < lengths[n])
anything      tensor (B, ...)                passed through untouched (e.g. a context ``c``)
============  =============================  ===================================================

Variable-length data need ``mask`` or ``lengths`` (or both) in every batch. When the pair is
called, the loop adds the current values of scheduled inputs (python floats, e.g.
``temperature``) to the dict; they are not batch keys and are never checked as such.
Each failed check is a :class:`pyrovae.errors.DataError` naming the key, the row and an
offending value, e.g. ``batch['lengths'] row 3 holds 0, but lengths must lie in [1, 12]``.

The loader contract
-------------------

A data set is a function ``loader(**options) -> DataSplits``, named in TOML by a registered short
name (``"digits"``, ``"mnist"``, ``"fashion-mnist"``) or by import path
(``name = "mypackage.mymodule:loader"``, a function decorated with ``@pyrovae.data_loader``: an
import path must name a declared part). Its keyword options are the ``[data]`` table's keys,
checked against the signature (their annotations and defaults: an unknown key, a missing one or a
wrong type is a ``ConfigError``). It returns :class:`DataSplits` with

- ``spec``: a :class:`pyrovae.DataSpec` (``name``, ``x_shape`` of one example, ``support``, and as
  they apply ``num_categories``, ``num_classes``/``label_format``, ``variable_length``/
  ``padding_index``, ``image_shape`` for plots);
- ``train``, ``valid``, ``test``: dicts of tensors following the batch contract, with the same
  keys in all three (one model is called on each).

:func:`make_splits` carves ``valid`` off ``train`` with a seed (and binarizes);
:func:`sequence_splits` builds all of it from lists of token lists::

    # mypackage/mymodule.py               [data]
    import torch                         # name = "mypackage.mymodule:loader"
    import pyrovae                       # noise = 0.1
    from pyrovae import DataSpec
    from pyrovae.data import make_splits

    @pyrovae.data_loader
    def loader(noise: float = 0.1, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1000, 2, generator=g) * noise + torch.tensor([1.0, -1.0])
        y = (x[:, 0] > 1.0).long()
        spec = DataSpec("blobs", (2,), "real", num_classes=2)
        return make_splits(spec, {"x": x[:800], "y": y[:800]}, {"x": x[800:], "y": y[800:]},
                           validation=100, binarize="none", seed=seed)

Semi-supervised labels: the built-in image loaders take ``labels_per_class`` (see
:mod:`pyrovae.data.labels`).

Text: the ``text`` loader (one sentence per line) and ``reviews`` (rated clothing reviews, ``y`` =
rating - 1) tokenize with :func:`tokenize`, encode with a :class:`Vocabulary` built from the
training split (ids ``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, ``<eos>`` = 3; a row is its word
ids then ``<eos>``) and return :class:`TextSplits`, whose shuffled training batches hold sentences
of similar length and whose every batch is trimmed to its longest row (see :mod:`pyrovae.data.text`).
``synthetic_lstm`` generates sequences from a random LSTM with a scalar latent (He et al. 2019's
synthetic posterior-collapse data; :mod:`pyrovae.data.synthetic_sequences`).

Sparse data: :class:`SparseSplits` keeps per-row matrices (interactions, TF-IDF features, multi-hot
labels) as CSR on the host and makes each batch dense on the device (:mod:`pyrovae.data.sparse`).
``movielens`` (GroupLens ``u.data``, the strong-generalization fold-in split), ``xml_sparse`` (the
extreme-classification repository's text format), ``synthetic_xml`` (power-law labels that depend on
sparse features) and ``yeast`` (dense, multi-hot labels) use it or the dense splits.
"""

from pyrovae.data.images import digits, download_idx, fashion_mnist, load_idx_images, mnist, read_idx
from pyrovae.data.labels import keep_labels_per_class
from pyrovae.data.memmap import MemmapSplits, open_memmap, write_memmap
from pyrovae.data.movielens import movielens, read_ratings, strong_generalization
from pyrovae.data.multilabel import generate_xml, read_xml_sparse, synthetic_xml, write_xml_sparse, xml_sparse, yeast
from pyrovae.data.sequences import pad_sequences, sequence_splits
from pyrovae.data.sparse import SparseRows, SparseSplits, make_sparse_splits
from pyrovae.data.splits import Batch, DataSplits, check_loader_result, check_splits, make_splits
from pyrovae.data.synthetic_sequences import LatentLSTMGenerator, synthetic_lstm
from pyrovae.data.text import BOS, EOS, PAD, UNK, TextSplits, Vocabulary, bucketed_batches, reviews, text_corpus, tokenize

__all__ = [
    "Batch",
    "DataSplits",
    "check_loader_result",
    "check_splits",
    "digits",
    "download_idx",
    "fashion_mnist",
    "keep_labels_per_class",
    "load_idx_images",
    "make_splits",
    "MemmapSplits",
    "open_memmap",
    "write_memmap",
    "mnist",
    "movielens",
    "read_ratings",
    "strong_generalization",
    "SparseRows",
    "SparseSplits",
    "make_sparse_splits",
    "generate_xml",
    "read_xml_sparse",
    "synthetic_xml",
    "write_xml_sparse",
    "xml_sparse",
    "yeast",
    "LatentLSTMGenerator",
    "synthetic_lstm",
    "pad_sequences",
    "read_idx",
    "sequence_splits",
    "BOS",
    "EOS",
    "PAD",
    "UNK",
    "TextSplits",
    "Vocabulary",
    "bucketed_batches",
    "reviews",
    "text_corpus",
    "tokenize",
]

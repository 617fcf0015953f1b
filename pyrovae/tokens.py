"""The special token ids every vocabulary begins with, shared by the text loaders
(:mod:`pyrovae.data.text`), the sequence networks (:mod:`pyrovae.nn.sequence`), the sentence
models and the decoders.

    <pad> = PAD = 0,   <unk> = UNK = 1,   <bos> = BOS = 2,   <eos> = EOS = 3;   words from id 4.

They live below both ``data`` and ``nn`` so that a network can read them without importing the
data layer.
"""

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")

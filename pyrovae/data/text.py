"""Text data for sentence models: special tokens (the rest of this module is being written)."""

# Special token ids shared by the vocabulary, the loaders and the decoders.
PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")

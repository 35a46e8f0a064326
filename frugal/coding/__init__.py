"""Coding weights in bytes: building blocks that two ideas share (compression in the loop, and the
kernels' bytes), kept in the spine so that no idea imports another.

`entropy`: a range coder (`constriction`) with the symbols' histogram stored in the stream;
`codecs`: lossy codes for weight tensors whose size is the length of real, decodable bytes (uniform
quantisation, pruning, k-means sharing, a JPEG-like DCT code, structured and unit codes); `learned`: a code whose integers are range-coded under a small learned density
(what compression trains against, `frugal.compress.rate`); `tied`:
weights replaced by their cluster's mean.
"""

from frugal.coding.codecs import CODECS, DCT, Codec, KMeans, Prune, Raw, Uniform, codec_from_spec, dct2, idct2
from frugal.coding.learned import Learned
from frugal.coding.entropy import CodecError, decode_symbols, encode_symbols, entropy_bits
from frugal.coding.tied import tied

__all__ = ["CODECS", "DCT", "Codec", "CodecError", "KMeans", "Learned", "Prune", "Raw", "Uniform", "codec_from_spec", "dct2",
           "decode_symbols", "encode_symbols", "entropy_bits", "idct2", "tied"]

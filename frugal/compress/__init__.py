"""Parameter compression: lossy codes for weight tensors whose size is the length of real,
decodable, entropy-coded bytes.

`codecs` holds the codes (uniform quantisation, magnitude pruning, k-means weight sharing, a
JPEG-like DCT code for kernels); `entropy` the range coder they share (`constriction`, with the
symbols' histogram stored in the stream).
"""

from frugal.compress.codecs import CODECS, DCT, Codec, KMeans, Prune, Uniform, codec_from_spec, dct2, idct2
from frugal.compress.entropy import CodecError, decode_symbols, encode_symbols, entropy_bits

__all__ = ["CODECS", "DCT", "Codec", "CodecError", "KMeans", "Prune", "Uniform", "codec_from_spec", "dct2",
           "decode_symbols", "encode_symbols", "entropy_bits", "idct2"]

"""Parameter compression: lossy codes for weight tensors whose size is the length of real,
decodable, entropy-coded bytes.

`codecs` holds the codes (uniform quantisation, magnitude pruning, k-means weight sharing, a
JPEG-like DCT code for kernels); `entropy` the range coder they share (`constriction`, with the
symbols' histogram stored in the stream); `container` the `.frugal` model file.
"""

from frugal.coding.codecs import CODECS, DCT, Codec, KMeans, Prune, Uniform, codec_from_spec, dct2, idct2
from frugal.compress.container import (ModelFileError, decode_model, encode_model, load, read_model_file, save,
                                       write_model_file)
from frugal.compress.loop import CompressInTheLoop, LoopConfig
from frugal.coding.entropy import CodecError, decode_symbols, encode_symbols, entropy_bits

from frugal.compress.rate import RateCode, baked, learn_code
from frugal.models import register_transform

register_transform("learn_code", learn_code)

from frugal.compress import genes as _genes  # noqa: E402,F401  registers the model `genes_lenet5`
from frugal.compress import bench as _bench  # noqa: E402,F401  registers the bench method `compress`
from frugal.compress import cli as _cli  # noqa: E402,F401  registers `frugal compress` and `frugal eval`

__all__ = ["CODECS", "DCT", "Codec", "CodecError", "KMeans", "ModelFileError", "Prune", "Uniform", "codec_from_spec", "dct2",
           "decode_model", "decode_symbols", "encode_model", "encode_symbols", "entropy_bits", "idct2",
           "read_model_file", "write_model_file", "save", "load", "CompressInTheLoop", "LoopConfig",
           "RateCode", "baked", "learn_code"]

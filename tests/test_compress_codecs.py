import numpy as np
import pytest
import scipy.fft
import torch

from frugal.coding.codecs import (DCT, KMeans, Prune, Structured, Uniform, Units, codec_from_spec, dct2,
                                    from_blocks, idct2, to_blocks)
from frugal.coding.entropy import CodecError, decode_symbols, encode_symbols, entropy_bits


def test_dct_matches_scipy_and_inverts():
    x = torch.randn(7, 5, 5, dtype=torch.float64)
    ref = scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho")  # independent oracle
    np.testing.assert_allclose(dct2(x).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(idct2(dct2(x)).numpy(), x.numpy(), atol=1e-12)
    y = torch.randn(3, 8, 3, dtype=torch.float64)  # not square
    np.testing.assert_allclose(dct2(y).numpy(), scipy.fft.dctn(y.numpy(), axes=(-2, -1), norm="ortho"), atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 1, 3, 3), (10, 84), (120, 400), (17,), (8, 8)])
def test_blocks_round_trip(shape):
    w = torch.randn(shape, dtype=torch.float64)
    blocks = to_blocks(w)
    assert blocks.dim() == 3
    assert torch.equal(from_blocks(blocks, shape), w)


@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (30, 70), (50,)])
def test_uniform_is_rounding_to_the_step(shape):
    w = torch.randn(shape) * 0.1
    step = 0.01
    out, n = Uniform(step).roundtrip(w)
    s32 = float(np.float32(step))
    expected = (np.round(w.double().numpy() / s32) * s32).astype(np.float32)  # numpy reference
    assert np.array_equal(out.numpy(), expected) and n == len(Uniform(step).encode(w))


def test_dct_codec_against_scipy_quantisation():
    w = torch.randn(8, 4, 5, 5) * 0.1
    step, cutoff = 0.005, 4
    out, _ = DCT(step, cutoff).roundtrip(w)
    s32 = float(np.float32(step))
    coef = scipy.fft.dctn(w.double().numpy(), axes=(-2, -1), norm="ortho")
    u, v = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    coef = np.where(u + v < cutoff, np.round(coef / s32) * s32, 0.0)
    expected = scipy.fft.idctn(coef, axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    # smooth kernels cost far less than noise at the same step
    smooth = torch.outer(torch.hann_window(7, periodic=False), torch.hann_window(7, periodic=False)).expand(16, 4, 7, 7)
    noise = torch.randn(16, 4, 7, 7) * smooth.std()
    assert len(DCT(0.01, 6).encode(smooth)) * 2 < len(DCT(0.01, 6).encode(noise))


def test_prune_zeros_the_smallest_fraction():
    w = torch.randn(1000)
    out, _ = Prune(0.7, 1e-4).roundtrip(w)
    assert (out == 0).float().mean() >= 0.7
    kept = out != 0
    assert w.abs()[kept].min() >= w.abs()[~kept].max()  # exactly the largest survive


def test_structured_drops_whole_units_of_smallest_norm():
    torch.manual_seed(0)
    w = torch.randn(20, 10, 3, 3) * torch.linspace(0.1, 2, 20)[:, None, None, None]  # row norms grow with o
    out, n = Structured(0.5, 0.2, 1e-3).roundtrip(w)
    rows_kept = out.flatten(1).abs().sum(1) > 0
    assert rows_kept.tolist() == [False] * 10 + [True] * 10  # the 10 weakest rows went
    assert (out.abs().sum((0, 2, 3)) == 0).sum() == 2  # and 2 of the 10 input units
    kept = out != 0
    torch.testing.assert_close(out[kept], w[kept], atol=5e-4, rtol=0)
    big = torch.randn(400, 300)
    assert len(Structured(0.7, 0.7, 0.05).encode(big)) < len(Prune(0.91, 0.05).encode(big))  # same density
    with pytest.raises(ValueError, match="2 or more dimensions"):
        Structured(0.5, 0.5, 0.1).encode(torch.zeros(5))


def test_kmeans_shares_at_most_k_values_and_keeps_zero():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * 0.1
    out, _ = KMeans(8).roundtrip(w)
    vals = out.unique()
    assert vals.numel() <= 8 and (vals == 0).any()
    # each weight went to its nearest shared value
    d = (w.reshape(-1, 1) - vals.reshape(1, -1)).abs()
    assert torch.allclose(d.min(1).values, (w.reshape(-1) - out.reshape(-1)).abs())


@pytest.mark.parametrize("codec", [Uniform(0.02), Prune(0.5, 0.02), KMeans(16), DCT(0.02, 3), DCT(0.02),
                                   Structured(0.5, 0.25, 0.02)])
def test_decode_of_encode_is_deterministic_and_exact(codec):
    w = torch.randn(5, 2, 3, 3) * 0.2
    data = codec.encode(w)
    a, b = codec.decode(data, tuple(w.shape)), codec.decode(data, tuple(w.shape))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert codec.encode(a) == codec.encode(a)  # encoding is deterministic too


def test_entropy_coder_round_trips_and_approaches_the_entropy():
    rng = np.random.default_rng(0)
    s = np.round(rng.laplace(0, 3, 50_000)).astype(np.int64)
    data = encode_symbols(s)
    out, end = decode_symbols(data)
    assert np.array_equal(out, s) and end == len(data)
    bound = entropy_bits(s) / 8
    assert bound < len(data) < 1.01 * bound + 200  # within 1 % plus the histogram
    # pinned: a fixed input codes to a fixed size (any change of format or model shows here)
    assert len(encode_symbols(np.array([0, 1, 0, 2, 0, 0, 1, -3] * 10))) == 30


@pytest.mark.parametrize("symbols", [np.zeros(0, np.int64), np.full(7, -5), np.array([3]), np.array([0, 2**19])])
def test_entropy_coder_edge_cases(symbols):
    out, end = decode_symbols(encode_symbols(symbols))
    assert np.array_equal(out, symbols)


def test_damaged_streams_are_refused():
    data = encode_symbols(np.arange(100) % 7)
    for cut in (1, 3, 10, len(data) - 1):
        with pytest.raises(CodecError):
            decode_symbols(data[:cut])
    with pytest.raises(CodecError, match="alphabet"):
        decode_symbols(bytes([5, 0, 0xFF, 0xFF, 0xFF, 0x7F]))
    with pytest.raises(CodecError, match="histogram counts"):
        decode_symbols(bytes([5, 0, 2, 1, 1]) + b"\x00" * 8)
    with pytest.raises(CodecError, match="exceeds the 5 symbols"):  # a count beyond int64, found by the fuzzer
        decode_symbols(bytes([5, 0, 2]) + b"\xff" * 9 + b"\x7f" + b"\x00" * 8)
    with pytest.raises(ValueError, match="span"):
        encode_symbols(np.array([0, 2**21]))
    with pytest.raises(CodecError, match="trailing"):
        Uniform(0.1).decode(Uniform(0.1).encode(torch.zeros(4)) + b"x", (4,))
    with pytest.raises(CodecError, match="stream holds 4 values, 5 expected"):
        Uniform(0.1).decode(Uniform(0.1).encode(torch.zeros(4)), (5,))


def test_codec_specs_and_bad_parameters():
    assert codec_from_spec({"codec": "dct", "step": 0.01, "cutoff": 3}) == DCT(0.01, 3)
    with pytest.raises(ValueError, match="unknown codec .jpeg.; known: raw, uniform, prune, structured, kmeans, dct, units"):
        codec_from_spec({"codec": "jpeg"})
    with pytest.raises(ValueError, match="bad parameters for codec 'uniform'"):
        codec_from_spec({"codec": "uniform", "quality": 3})
    with pytest.raises(ValueError, match="positive finite"):
        Uniform(0.0)
    with pytest.raises(ValueError, match="prune fraction"):
        Prune(1.0, 0.1)


@pytest.mark.parametrize("codec, shape", [
    (c, s) for c in (Uniform(0.03), Prune(0.6, 0.03), KMeans(8), DCT(0.03), DCT(0.03, 3), Structured(0.5, 0.3, 0.03),
                     Units(Prune(0.9, 0.03)), Units(KMeans(4)))
    for s in ((6, 3, 5, 5), (10, 100), (13, 84), (50,)) if not (isinstance(c, (Structured, Units)) and len(s) < 2)])
def test_codes_are_idempotent(codec, shape):
    # what training in the loop leaves behind must be exactly what the file decodes to
    torch.manual_seed(1)
    once, _ = codec.roundtrip(torch.randn(shape) * 0.2)
    twice, _ = codec.roundtrip(once)
    assert torch.equal(once, twice)


def _dead_units(shape, seed=3):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.1
    w[1::3] = 0  # dead output units
    w[:, ::2] = 0  # dead input units
    return w


@pytest.mark.parametrize("inner", [Uniform(0.02), Prune(0.8, 0.02), KMeans(4), KMeans(16)])
@pytest.mark.parametrize("shape", [(30, 12, 3, 3), (60, 40)])
def test_units_decodes_to_what_its_inner_code_decodes_to_in_fewer_bytes(inner, shape):
    w = _dead_units(shape)
    units = Units(inner)
    decoded, nbytes = units.roundtrip(w)
    reference, inner_bytes = inner.roundtrip(w)
    assert torch.equal(decoded, reference)
    assert nbytes < inner_bytes  # 20 of 60 rows and half the inputs cost a bit each, not a symbol per weight
    assert codec_from_spec(units.spec()) == units
    assert units.spec() == {"codec": "units", "inner": inner.spec()}
    # with no dead unit the masks are all the extra there is
    full = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    assert len(Units(Uniform(0.02)).encode(full)) == len(Uniform(0.02).encode(full)) + 1 + (shape[0] + shape[1] + 7) // 8


def test_units_refuses_damaged_data_and_bad_settings():
    w = _dead_units((20, 10))
    data = Units(KMeans(4)).encode(w)
    with pytest.raises(CodecError, match="block code 7"):
        Units.decode(bytes([7]) + data[1:], (20, 10))
    for cut in (0, 2):
        with pytest.raises(CodecError, match="truncated"):
            Units.decode(data[:cut], (20, 10))
    flipped = bytearray(data)
    flipped[1] ^= 0x01  # one more (or fewer) output unit than the block holds
    with pytest.raises(CodecError, match="expected"):
        Units.decode(bytes(flipped), (20, 10))
    with pytest.raises(CodecError, match="2 or more"):
        Units.decode(data, (200,))
    with pytest.raises(ValueError, match="wraps a uniform, prune, kmeans or learned"):
        Units(DCT(0.1))
    with pytest.raises(ValueError, match="2 or more"):
        Units(Uniform(0.1)).encode(torch.ones(5))


def _streams():
    """Real streams of every shape the bound must let through: random, skewed, tiny, large."""
    rng = np.random.default_rng(7)
    out = [np.array([0, 1]), np.array([5, -5]), np.array([0, 0, 1]), np.array([0, 2**19]), np.arange(300) % 3]
    for n in (2, 3, 10, 100, 1000, 10_000):
        for _ in range(6):
            k = int(rng.integers(2, min(n, 2000) + 1))
            p = rng.dirichlet(np.full(k, float(rng.choice([0.05, 0.5, 5.0]))))
            out.append(rng.choice(k, size=n, p=p) - k // 2)
    for n in (2, 1000, 1_000_000):
        skewed = np.zeros(n, dtype=np.int64)
        skewed[int(rng.integers(n))] = 1  # [n - 1, 1]: the stream with the fewest bits per symbol
        out.append(skewed)
    out.append(np.round(rng.laplace(0, 2, 1_000_000)).astype(np.int64))
    out.append(np.round(rng.standard_cauchy(1000) * 3).clip(-2**18, 2**18).astype(np.int64))  # many singletons
    out.append(rng.permutation(2**16))  # every value once
    return out


def test_real_streams_round_trip_exactly_through_the_length_bound():
    from frugal.coding.entropy import MARGIN_BITS, min_bits, read_varint

    slack = []
    for s in _streams():
        data = encode_symbols(s)
        out, end = decode_symbols(data)
        assert np.array_equal(out, s) and end == len(data), s[:10]
        n, pos = read_varint(data, 0)
        _, pos = read_varint(data, pos)
        k, pos = read_varint(data, pos)
        if k == 1:
            continue  # one value: no words at all
        counts = []
        for _ in range(k):
            c, pos = read_varint(data, pos)
            counts.append(c)
        n_words, _ = read_varint(data, pos)
        assert n_words >= 1
        slack.append(32 * n_words - min_bits(np.array(counts)))
    assert min(slack) > -MARGIN_BITS  # what the decoder requires
    assert min(slack) < 64  # and the bound is tight: for some real stream it nearly binds


def test_a_stream_with_words_cut_from_its_payload_is_refused_before_decoding():
    from frugal.coding.entropy import read_varint, write_varint

    s = np.random.default_rng(0).integers(0, 16, 100_000)
    data = encode_symbols(s)  # about 4 bits a symbol
    pos = 0
    for _ in range(3 + 16):  # n, lo, K, then the 16 counts
        _, pos = read_varint(data, pos)
    n_words, start = read_varint(data, pos)
    for keep in (n_words // 2, n_words - 10):
        cut = bytearray(data[:pos])
        write_varint(cut, keep)
        with pytest.raises(CodecError, match=f"payload of {keep} words cannot hold 100000 symbols"):
            decode_symbols(bytes(cut) + data[start:start + 4 * keep])


def test_a_payload_that_strays_from_its_histogram_is_refused():
    s = np.random.default_rng(1).integers(0, 4, 5000)
    data = bytearray(encode_symbols(s))
    data[len(data) // 2] ^= 0x40  # inside the words
    with pytest.raises(CodecError, match="symbols other than its histogram|does not decode"):
        decode_symbols(bytes(data))


def test_symbol_streams_past_the_cap_are_not_written():
    from frugal.coding import entropy

    cap = entropy.MAX_SYMBOLS
    try:
        entropy.MAX_SYMBOLS = 100  # the check, not 2**28 values of memory
        with pytest.raises(ValueError, match="101 symbols in one stream"):
            encode_symbols(np.zeros(101, dtype=np.int64))
        with pytest.raises(CodecError, match="more than the 100 a stream may"):
            decode_symbols(bytes([101, 0, 1, 101]))
    finally:
        entropy.MAX_SYMBOLS = cap


@pytest.mark.parametrize("codec", [Uniform(0.02), DCT(0.02, 3), Structured(0.5, 0.25, 0.02)])
@pytest.mark.parametrize("step", [0.0, -0.02, float("nan"), float("inf")])
def test_a_step_read_from_damaged_data_is_refused(codec, step):
    import struct

    w = torch.randn(6, 4, 3, 3) * 0.2
    data = codec.encode(w)
    with pytest.raises(CodecError, match="quantisation step"):
        codec.decode(struct.pack("<f", step) + data[4:], tuple(w.shape))

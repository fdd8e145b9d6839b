"""GGUF reading: the real model's config, tensor views, and a clear error for every kind of bad file."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from dllp2p.formats import ModelFileError, QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("m") / "small.gguf", SyntheticSpec(n_layers=1))


def test_real_model_config(real_model):
    c = real_model.config
    assert (c.arch, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == ("llama", 576, 30, 9, 3, 64)
    assert (c.ffn_dim, c.vocab_size, c.context_length, c.rope_dim) == (1536, 49152, 8192, 64)
    assert c.rope_base == 100000.0 and c.tied_output and abs(c.norm_eps - 1e-5) < 1e-9
    emb = real_model.tensor("token_embd.weight")
    assert emb.qtype == QType.Q8_0 and emb.shape == (49152, 576) and emb.data.shape == (49152, 612)
    q = real_model.tensor("blk.0.attn_q.weight")
    assert q.qtype == QType.Q4_1 and q.shape == (576, 576)


def test_tensors_are_memory_mapped_not_copied(real_model):
    data = real_model.tensor("blk.3.ffn_down.weight").data
    base = data
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, np.memmap) or not isinstance(base, np.ndarray)


def test_row_slices_dequantize_like_the_whole(real_model):
    t = real_model.tensor("blk.1.attn_k.weight")
    np.testing.assert_array_equal(t.rows(64, 128).dequantize(), t.dequantize()[64:128])


def test_column_slices_dequantize_like_the_whole(real_model):
    t = real_model.tensor("blk.1.attn_output.weight")  # block type: whole blocks of 32 columns
    part = t.columns(64, 192)
    assert part.shape == (t.shape[0], 128) and part.data.flags.c_contiguous
    np.testing.assert_array_equal(part.dequantize(), t.dequantize()[:, 64:192])
    with pytest.raises(ValueError, match="columns \\[64, 100\\) cut"):
        t.columns(64, 100)
    with pytest.raises(ValueError, match="not a range"):
        t.columns(0, t.shape[1] + 32)
    norm = real_model.tensor("blk.1.attn_norm.weight")
    with pytest.raises(ValueError, match="not a range"):
        norm.columns(0, 32)


def test_synthetic_model_loads_and_says_it_is_random(small_gguf):
    m = load_model(small_gguf)
    assert m.config.n_kv_heads == 8 and not m.config.tied_output
    assert "random weights" in m.metadata["general.name"]


def _expect(path, fragment):
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg and fragment in msg, msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.gguf", "cannot open")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    _expect(p, "truncated")


def test_wrong_magic(tmp_path, small_gguf):
    p = tmp_path / "bad_magic.gguf"
    p.write_bytes(b"GGML" + small_gguf.read_bytes()[4:])
    _expect(p, "not a GGUF file")


def test_wrong_version(tmp_path, small_gguf):
    raw = bytearray(small_gguf.read_bytes())
    raw[4:8] = (99).to_bytes(4, "little")
    p = tmp_path / "v99.gguf"
    p.write_bytes(bytes(raw))
    _expect(p, "unsupported GGUF version 99")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, small_gguf, keep):
    raw = small_gguf.read_bytes()
    p = tmp_path / f"cut{keep}.gguf"
    p.write_bytes(raw[: int(len(raw) * keep)])
    _expect(p, "truncated")


def test_truncated_inside_header(tmp_path, small_gguf):
    p = tmp_path / "cut_header.gguf"
    p.write_bytes(small_gguf.read_bytes()[:300])
    _expect(p, "truncated")


def test_corrupted_header_counts(tmp_path, small_gguf):
    raw = bytearray(small_gguf.read_bytes())
    raw[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    p = tmp_path / "count.gguf"
    p.write_bytes(bytes(raw))
    _expect(p, "corrupted")


def _rewrite(src, dst, *, arch="llama", drop=(), retype=None):
    """Copy a GGUF with changes, through the gguf package's writer."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = key.replace("llama.", f"{arch}.", 1)
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, field.contents(), vtype)
    for t in r.tensors:
        if t.name in drop:
            continue
        shape = [int(x) for x in reversed(list(t.shape))]
        if retype and t.name == retype:
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType.MXFP4)
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_unsupported_tensor_type(tmp_path, small_gguf):
    p = _rewrite(small_gguf, tmp_path / "mxfp4.gguf", retype="blk.0.ffn_up.weight")
    _expect(p, "unsupported type MXFP4")


def test_missing_tensor(tmp_path, small_gguf):
    p = _rewrite(small_gguf, tmp_path / "missing.gguf", drop=("blk.0.attn_v.weight",))
    _expect(p, "missing tensor 'blk.0.attn_v.weight'")


def test_unsupported_architecture(tmp_path, small_gguf):
    p = _rewrite(small_gguf, tmp_path / "arch.gguf", arch="mamba")
    _expect(p, "unsupported architecture 'mamba'")


# --- string arrays: the vectorized fast path must agree with the plain loop, or step aside ---


def _string_array(strings: list[bytes]) -> bytes:
    return b"".join(len(s).to_bytes(8, "little") + s for s in strings)


@pytest.mark.parametrize("seed", range(12))
def test_string_arrays_parse_the_same_fast_or_slow(seed):
    from dllp2p.formats.gguf_container import _Reader, _strings_vectorized

    rng = random.Random(seed)
    pieces = ["a", "Ġ", "the", "日本", "😀", " ", "<|im_end|>", "\n"]
    strings = ["".join(rng.choices(pieces, k=rng.randint(1, 6))) for _ in range(3000)]
    tricky = ["", "\0", "x\0\0\0\0\0\0\0\0y", "z" * 300, "\0" * 20, "é" * 200]
    if seed % 2:  # odd seeds: sprinkle strings that the fast path must notice it cannot handle
        for s in rng.sample(tricky, 2):
            strings.insert(rng.randrange(len(strings)), s)
    raw = _string_array([s.encode() for s in strings]) + bytes(rng.randrange(256) for _ in range(64))
    end = len(raw) - 64
    reader = _Reader(raw)
    assert reader.strings(len(strings)) == strings and reader.pos == end
    fast = _strings_vectorized(raw, 0, len(strings))
    if seed % 2 == 0:
        assert fast is not None  # plain vocabularies do take the fast path
    assert fast is None or fast == (strings, end)


def test_bad_utf8_in_a_long_string_array_is_a_bad_value():
    from dllp2p.formats.gguf_container import _BadValue, _Reader

    raw = _string_array([b"ok"] * 2000 + [b"\xff\xfe"] + [b"ok"] * 10)
    with pytest.raises(_BadValue):
        _Reader(raw).strings(2011)


def test_loading_does_not_import_the_gguf_package(model_path):
    """gguf's reader (and its import) cost seconds per start: load_model parses the file itself."""
    code = (
        "import sys; from dllp2p.formats import load_model; "
        f"m = load_model({str(model_path)!r}); "
        "assert len(m.metadata['tokenizer.ggml.tokens']) == 49152; "
        "assert 'gguf' not in sys.modules, 'gguf imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_own_parser_agrees_with_gguf_package(model_path):
    """load_model parses GGUF itself (the gguf package's reader took ~4 s on SmolLM2's 49k-token
    vocabulary); the package stays the oracle: same metadata values, same tensor bytes and shapes."""
    import gguf

    from dllp2p.formats import load_model

    ours = load_model(model_path)
    theirs = gguf.GGUFReader(model_path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        value = theirs.fields[key].contents()
        assert ours.metadata[key] == value, key
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(x) for x in reversed(list(t.shape)))
        assert np.array_equal(np.asarray(mine.data).view(np.uint8).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)), t.name


# --- families (formats/arch.py): what each file turns on, and one line for everything unsupported ---


def _variant(src, dst, *, arch="llama", kv=None, retype_raw=None, add=None):
    """Copy a GGUF under another architecture name, with extra key/values, some tensors' storage
    replaced by raw bytes of another ggml type ({name: GGMLQuantizationType}; the bytes are junk, never
    read, since the file must be refused) and extra F32 tensors."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = key.replace("llama.", f"{arch}.", 1)
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, field.contents(), vtype)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
        else:
            w.add_float32(f"{arch}.{key}", value)
    for t in r.tensors:
        shape = [int(x) for x in reversed(list(t.shape))]
        if retype_raw and t.name in retype_raw:
            qt = retype_raw[t.name]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            raw = np.zeros((shape[0], shape[1] // block * size), np.uint8)
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=qt)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    for name, values in (add or {}).items():
        w.add_tensor(name, np.asarray(values, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_every_unsupported_item_in_one_line(tmp_path, small_gguf):
    import gguf

    p = _variant(
        small_gguf,
        tmp_path / "many.gguf",
        kv={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0},
        retype_raw={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q2_K},
        add={"blk.0.attn_q.bias": np.zeros(256)},
    )
    _expect(p, "tensor 'blk.0.ffn_up.weight' has unsupported type Q2_K")
    for fragment in ("unsupported RoPE scaling 'yarn'", "tensors llama does not use: 'blk.*.attn_q.bias (1 layers)'"):
        _expect(p, fragment)


def test_cli_refuses_with_one_line_and_exit_1(tmp_path, small_gguf):
    import gguf

    p = _variant(small_gguf, tmp_path / "bad.gguf", kv={"rope.scaling.type": "longrope"},
                 retype_raw={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q2_K})
    r = subprocess.run([sys.executable, "-m", "dllp2p.cli", "run", "--model", str(p), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert str(p) in lines[0] and "Q2_K" in lines[0] and "RoPE scaling 'longrope'" in lines[0]


def test_unknown_architecture_and_tensor_types_in_one_line(tmp_path, small_gguf):
    import gguf

    q2k = gguf.GGMLQuantizationType.Q2_K
    p = _variant(small_gguf, tmp_path / "m.gguf", arch="mamba",
                 retype_raw={"blk.0.ffn_up.weight": q2k, "blk.0.ffn_gate.weight": q2k})
    _expect(p, "unsupported architecture 'mamba' (supported: llama, qwen2, qwen3, gemma3)")
    _expect(p, "2 tensors ('blk.0.ffn_gate.weight', 'blk.0.ffn_up.weight') have unsupported type Q2_K")


def test_llama3_scaling_needs_its_rope_freqs_tensor(tmp_path, small_gguf):
    p = _variant(small_gguf, tmp_path / "l3.gguf", kv={"rope.scaling.type": "llama3"})
    _expect(p, "RoPE scaling 'llama3' without its rope_freqs.weight tensor")


def test_linear_rope_scaling_is_read(tmp_path, small_gguf):
    p = _variant(small_gguf, tmp_path / "lin.gguf", kv={"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})
    c = load_model(p).config
    assert c.rope_scaling_factor == 4.0 and c.layer_rope(0) == (c.rope_base, 4.0)


def test_llama_defaults_are_todays_behaviour(small_gguf):
    c = load_model(small_gguf).config
    assert (c.qkv_bias, c.qk_norm, c.post_norms, c.activation, c.embed_scale) == (False, False, False, "silu", 1.0)
    assert (c.rope_neox, c.rope_freq_factors, c.rope_scaling_factor) == (False, None, 1.0)
    assert (c.sliding_window, c.sliding_layers, c.rope_base_local) == (0, (), None)
    assert c.score_scale == c.head_dim**-0.5


def test_model_config_travels_the_wire_unchanged():
    """The protocol's generic codec carries every new field (a Gemma-like config) to the workers."""
    import dataclasses

    import msgpack

    from dllp2p.wire import codec as protocol
    from dllp2p.formats import ModelConfig

    c = ModelConfig("gemma3", 640, 6, 4, 1, 256, 2048, 1024, 32768, 1e6, 256, 1e-6, True, qk_norm=True,
                    post_norms=True, activation="gelu_tanh", embed_scale=640**0.5, attn_scale=0.0625,
                    rope_neox=True, rope_freq_factors=tuple(range(1, 129)), sliding_window=512,
                    sliding_layers=(True,) * 5 + (False,), rope_base_local=10000.0)
    wire = msgpack.unpackb(msgpack.packb(protocol._to_wire(c, ModelConfig, "c")), use_list=False)
    back = protocol._from_wire(wire, ModelConfig, "c")
    assert back == c and dataclasses.asdict(back) == dataclasses.asdict(c)
    with pytest.raises(protocol.MalformedFrame):
        protocol._from_wire({**wire, "activation": "relu"}, ModelConfig, "c")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_each_family_reads_as_its_description(tmp_path, arch):
    from dllp2p.formats.arch import FAMILIES
    from dllp2p.formats.gguf_model import expected_shapes
    from dllp2p.formats.synthetic import write_random_model

    f = FAMILIES[arch]
    spec = SyntheticSpec(arch=arch, n_layers=6, n_heads=2, n_kv_heads=1, key_length=128 if f.qk_norm else 0,
                         sliding_window=64 if f.sliding_pattern else 0, qtype=QType.Q8_0)
    m = load_model(write_random_model(tmp_path / f"{arch}.gguf", spec))
    c = m.config
    assert (c.arch, c.head_dim, c.n_kv_heads) == (arch, spec.head_dim, 1)
    assert (c.qkv_bias, c.qk_norm, c.post_norms, c.activation, c.rope_neox) == (
        f.qkv_bias, f.qk_norm, f.post_norms, f.activation, f.rope_neox)
    assert c.embed_scale == (256**0.5 if f.embed_scale_sqrt_dim else 1.0)
    assert c.sliding_window == spec.sliding_window
    assert c.sliding_layers == ((True,) * 5 + (False,) if f.sliding_pattern else ())
    assert c.rope_base_local == f.rope_base_local
    assert set(m.tensors) == set(expected_shapes(c))


def test_a_family_tensor_missing_is_named(tmp_path):
    from dllp2p.formats.synthetic import write_random_model

    src = write_random_model(tmp_path / "q3.gguf", SyntheticSpec(arch="qwen3", n_layers=1, key_length=128))
    p = _rewrite(src, tmp_path / "no_norm.gguf", arch="qwen3", drop=("blk.0.attn_k_norm.weight",))
    _expect(p, "missing tensor 'blk.0.attn_k_norm.weight'")

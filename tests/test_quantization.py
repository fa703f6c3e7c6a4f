"""Weight-only int8/int4 quantization in ChatGLM-6B's checkpoint format (glmtune.models.quantization)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from glmtune.models.quantization import (
    QuantizedLinear,
    QuantizedMergeError,
    dequantize_modules,
    dequantize_weight,
    dequantized_linear,
    empty_quantized_modules,
    has_quantized_modules,
    pack_int4,
    quantize_linear,
    quantize_modules,
    quantize_weight,
    register_quantized_lora,
    unpack_int4,
)

NAMES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


class Block(nn.Module):
    """The four quantized linears of a ChatGLM-6B block, plus one that must stay float."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.query_key_value = nn.Linear(width, 3 * width)
        self.dense = nn.Linear(3 * width, width)
        self.dense_h_to_4h = nn.Linear(width, 4 * width)
        self.dense_4h_to_h = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, 8)

    def forward(self, x):
        x = x + self.dense(torch.tanh(self.query_key_value(x)))
        x = x + self.dense_4h_to_h(torch.tanh(self.dense_h_to_4h(x)))
        return self.head(x)


class Tiny(nn.Module):
    def __init__(self, width: int = 32, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)[..., :1].expand_as(x) + x
        return x


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_within_half_a_step(bits):
    torch.manual_seed(0)
    weight = torch.randn(48, 64) * torch.rand(48, 1) * 3  # rows of different magnitude
    weight[5] = 0.0  # an all-zero row must not divide by zero
    qweight, scale = quantize_weight(weight, bits)
    assert qweight.dtype == torch.int8 and scale.dtype == torch.float16
    assert qweight.shape == ((48, 64) if bits == 8 else (48, 32)) and scale.shape == (48,)
    values = qweight if bits == 8 else unpack_int4(qweight)
    limit = 127 if bits == 8 else 7
    assert values.min() >= -limit and values.max() <= limit
    assert values.abs().amax(dim=1)[torch.arange(48) != 5].eq(limit).all()  # absmax maps to the top level
    assert scale[5] == 0 and values[5].eq(0).all()
    restored = dequantize_weight(qweight, scale, bits, torch.float32)
    bound = scale.float().unsqueeze(1) / 2 * (1 + 1e-5) + 1e-7
    assert ((restored - weight).abs() <= bound).all()


def test_int4_packing_matches_the_official_order():
    # scale = absmax / 7: row 0 -> 1.0, values [7, -7, 2, -1]; row 1 -> 2.0, values [-3, 5, -7, 0].
    # Official byte j = (value[2j] << 4) | (value[2j+1] & 0xF):
    #   row 0: 0x70|0x9 = 0x79 = 121, 0x20|0xF = 0x2F = 47
    #   row 1: 0xD0|0x5 = 0xD5 = -43 as int8, 0x90|0x0 = 0x90 = -112 as int8
    weight = torch.tensor([[7.0, -7.0, 2.0, -1.0], [-6.0, 10.0, -14.0, 0.0]])
    qweight, scale = quantize_weight(weight, 4)
    assert qweight.tolist() == [[121, 47], [-43, -112]]
    assert scale.tolist() == [1.0, 2.0]
    assert torch.equal(dequantize_weight(qweight, scale, 4), weight)


def test_int4_unpacking_of_every_byte_follows_the_official_kernel():
    # The official CPU kernel: column 2j = (signed byte) >> 4, column 2j+1 = the low nibble sign-extended.
    byte = torch.arange(-128, 128, dtype=torch.int8).reshape(1, 256)
    expected = []
    for b in range(-128, 128):
        low = b & 0xF
        expected += [b >> 4, low - 16 if low > 7 else low]
    assert unpack_int4(byte).tolist() == [expected]
    assert torch.equal(pack_int4(unpack_int4(byte)), byte)  # so official bytes survive a repack
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))


def test_int8_values_and_odd_width_for_int4():
    weight = torch.tensor([[127.0, -127.0, 63.4, 63.6]])
    qweight, scale = quantize_weight(weight, 8)
    assert qweight.tolist() == [[127, -127, 63, 64]] and scale.tolist() == [1.0]
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(4, 5), 4)
    with pytest.raises(ValueError):
        QuantizedLinear(5, 4, bits=4)
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(4, 4), 3)


@pytest.mark.parametrize("bits,tolerance", [(8, 0.01), (4, 0.15)])
def test_output_close_to_float_linear(bits, tolerance):
    torch.manual_seed(1)
    linear = nn.Linear(256, 128)
    q = quantize_linear(linear, bits)
    x = torch.randn(4, 7, 256)
    with torch.no_grad():
        reference, out = linear(x), q(x)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert relative_error(out, reference) < tolerance
    # exactly a float layer with the dequantized weight
    with torch.no_grad():
        assert torch.allclose(out, dequantized_linear(q, torch.float32)(x), atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_as_official(bits):
    q = quantize_linear(nn.Linear(64, 24), bits)
    state = q.state_dict()
    assert list(state) == ["weight", "weight_scale", "bias"]
    assert state["weight"].dtype == torch.int8 and state["weight"].shape == (24, 64 if bits == 8 else 32)
    assert state["weight_scale"].dtype == torch.float16 and state["weight_scale"].shape == (24,)
    assert state["bias"].shape == (24,)
    assert "bias" not in quantize_linear(nn.Linear(64, 24, bias=False), bits).state_dict()

    empty = QuantizedLinear(64, 24, bits)
    assert not empty.weight.any() and not empty.weight_scale.any()
    empty.load_state_dict(state)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(empty(x), q(x))
    with pytest.raises(RuntimeError):  # a checkpoint of the other bit width does not fit
        QuantizedLinear(64, 24, 12 - bits).load_state_dict(state)


@pytest.mark.parametrize("bits", [8, 4])
def test_gradients_reach_the_input_only(bits):
    torch.manual_seed(2)
    q = quantize_linear(nn.Linear(32, 16), bits)
    assert not any(p.requires_grad for p in q.parameters())
    with pytest.raises(RuntimeError):
        q.weight.requires_grad_(True)  # int tensors cannot require grad

    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    x = torch.randn(5, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = q(x)
    out.square().sum().backward()
    reference = dequantized_linear(q, torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert all(p.grad is None for p in q.parameters())
    # backward keeps the int weight, never a float [out, in] copy
    assert not any(dtype.is_floating_point and shape == (16, 32) for dtype, shape in saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_in_the_input_dtype(dtype):
    torch.manual_seed(3)
    q = quantize_linear(nn.Linear(64, 32), 8)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        reference = q(x)
        out = q(x.to(dtype))
    assert out.dtype == dtype
    assert relative_error(out, reference) < 0.02
    y = x.to(dtype).requires_grad_(True)
    q(y).float().sum().backward()
    assert y.grad.dtype == dtype


def test_meta_tensors_give_shapes():
    with torch.device("meta"):
        linear = nn.Linear(8, 4)
    q = quantize_linear(linear, 4)
    assert q.weight.device.type == "meta" and q.weight.shape == (4, 4)
    assert q(torch.empty(2, 8, device="meta")).shape == (2, 4)


def test_autocast_computes_in_the_autocast_dtype():
    q = quantize_linear(nn.Linear(64, 32), 4)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_modules_replaces_by_name_and_frees_floats(bits):
    torch.manual_seed(4)
    model = Tiny()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        reference = model(x)
    old = weakref.ref(model.layers[0].query_key_value.weight)
    assert quantize_modules(model, bits, NAMES) == 8
    gc.collect()
    assert old() is None
    for layer in model.layers:
        for name in NAMES:
            assert isinstance(getattr(layer, name), QuantizedLinear) and getattr(layer, name).bits == bits
        assert type(layer.head) is nn.Linear
    assert quantize_modules(model, bits, NAMES) == 0  # already quantized
    assert has_quantized_modules(model)
    with torch.no_grad():
        assert relative_error(model(x), reference) < (0.01 if bits == 8 else 0.15)


def test_quantize_modules_takes_a_single_name_and_keeps_the_mode():
    model = Tiny().eval()
    assert quantize_modules(model, 8, "dense") == 2
    assert isinstance(model.layers[1].dense, QuantizedLinear) and not model.layers[1].dense.training
    assert type(model.layers[1].dense_h_to_4h) is nn.Linear


@pytest.mark.parametrize("bits", [8, 4])
def test_empty_modules_load_a_quantized_checkpoint(bits):
    torch.manual_seed(5)
    source = Tiny()
    quantize_modules(source, bits, NAMES)
    checkpoint = source.state_dict()
    assert "layers.0.query_key_value.weight_scale" in checkpoint

    with torch.device("meta"):  # as a model built before its weights are loaded
        target = Tiny()
    assert empty_quantized_modules(target, bits, NAMES) == 8
    assert target.layers[0].dense.weight.device.type == "meta"
    target.load_state_dict(checkpoint, assign=True)

    target2 = Tiny()
    empty_quantized_modules(target2, bits, NAMES)
    target2.load_state_dict(checkpoint)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x)) and torch.equal(target2(x), source(x))


def test_dequantize_modules_restores_float_layers():
    model = Tiny()
    quantize_modules(model, 4, NAMES)
    x = torch.randn(2, 32)
    with torch.no_grad():
        quantized = model(x)
    assert dequantize_modules(model, torch.float32) == 8
    assert not has_quantized_modules(model)
    assert type(model.layers[0].dense) is nn.Linear and model.layers[0].dense.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(model(x), quantized, atol=1e-5)


def _train_lora(model, steps: int = 30):
    torch.manual_seed(6)
    x, target = torch.randn(16, 32), torch.randn(16, 32)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (model(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert trainable and all("lora_" in n for n in trainable)
    for name, before in frozen.items():
        assert torch.equal(before, dict(model.named_parameters())[name]), name
    assert any(not torch.equal(v, dict(model.named_parameters())[n]) for n, v in trainable.items())
    return x, losses


@pytest.mark.parametrize("bits", [8, 4])
def test_peft_lora_trains_over_quantized_layers(bits):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(7)
    model = Tiny()
    quantize_modules(model, bits, NAMES)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query_key_value", "dense"]))
    wrapped = peft_model.base_model.model.layers[0].query_key_value
    assert isinstance(wrapped, LoraLayer) and isinstance(wrapped.base_layer, QuantizedLinear)
    assert wrapped.lora_A["default"].weight.dtype == torch.float32  # not cast to the int dtype
    _, losses = _train_lora(peft_model)
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_merging_lora_into_quantized_layers_refuses(bits):
    from peft import LoraConfig, get_peft_model

    model = Tiny()
    quantize_modules(model, bits, NAMES)
    config = register_quantized_lora(LoraConfig(r=4, target_modules=["query_key_value"], init_lora_weights=False))
    peft_model = get_peft_model(model, config)
    assert type(peft_model.base_model.model.layers[0].query_key_value).__name__ == "QuantizedLoraLinear"
    x, _ = _train_lora(peft_model, steps=3)
    for safe_merge in (False, True):
        with pytest.raises(QuantizedMergeError, match="quantized"):
            peft_model.merge_and_unload(safe_merge=safe_merge)
    with torch.no_grad():
        adapted = peft_model(x)

    # the way to merge: float layers first, then peft's own exact merge
    assert dequantize_modules(peft_model, torch.float32) == 8
    merged = peft_model.merge_and_unload()
    assert not has_quantized_modules(merged)
    with torch.no_grad():
        assert torch.allclose(merged(x), adapted, atol=1e-4)


def test_lora_over_a_quantized_transformers_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(8)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert quantize_modules(model, 4, names) == 14
    model.init_weights()  # transformers' initializer must leave the int weights alone
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 64, (4, 12))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.to(torch.bfloat16)  # int weights keep their dtype
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.dtype == torch.int8
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.bfloat16


def test_importing_does_not_import_peft():
    import subprocess
    import sys

    code = "import sys, glmtune.models.quantization; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    from glmtune.models import quantization

    assert quantization.QuantizedLoraLinear.__name__ == "QuantizedLoraLinear"  # built on first use

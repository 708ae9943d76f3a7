"""torch_ref on models as they come: capture points by path, tuple/dict inputs and outputs, in-place ops.

Each penalty is checked against an independent computation: forward hooks
written here that keep the module outputs, and ``torch.autograd.grad`` with
respect to them (valid where no in-place op follows the capture point).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ref
from agp_common.errors import ModelInputError
from torch_ref.penalty import second_derivative_hint

# float64 rounding only: the same operations, some in another order (a zero leaf added, a batch split).
RTOL, ATOL = 1e-12, 1e-14


def manual_penalty(model, call, label, points, logits_of=lambda out: out):
    """``(loss, sum_l ||d loss / d h_l||^2)``: hooks keep ``h_l`` (element 0 of a tuple), then autograd.grad.

    ``points``: ``[(module, call index)]``.
    """
    kept, handles = {}, []
    for module, index in points:
        calls = []

        def hook(mod, inputs, output, calls=calls, index=index, key=(module, index)):
            if len(calls) == index:
                kept[key] = output[0] if isinstance(output, tuple) else output
            calls.append(None)

        handles.append(module.register_forward_hook(hook))
    try:
        out = call()
    finally:
        for handle in handles:
            handle.remove()
    loss = F.cross_entropy(logits_of(out), label)
    grads = torch.autograd.grad(loss, [kept[p] for p in points], create_graph=True)
    return loss, sum(g.pow(2).sum() for g in grads)


def param_grads(model, total):
    model.zero_grad()
    total.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_same_training_gradient(model, total, expected_total):
    for got, want in zip(param_grads(model, total), param_grads(model, expected_total), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)  # double backprop: sums reordered


class Block(nn.Module):
    """Returns ``(hidden, None)``, as a Hugging Face layer does."""

    def __init__(self, width):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.dense(x)), None


class Nothing(nn.Module):
    def forward(self, x):
        return None


class TupleNet(nn.Module):
    """embed -> relu -> block (tuple output) -> relu (reused) -> head; ``note`` returns None, ``unused``'s
    output is discarded."""

    def __init__(self, width=4, classes=5):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.relu = nn.ReLU()
        self.block1 = Block(width)
        self.note = Nothing()
        self.unused = nn.Linear(width, 2)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.relu(self.embed(x))
        h, _ = self.block1(h)
        self.note(h)
        self.unused(h)
        return self.head(self.relu(h))


@pytest.fixture
def tuple_net():
    torch.manual_seed(0)
    return TupleNet().double(), torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 4, 2])


def test_capture_points_lists_each_call_in_call_order_with_its_output_shape(tuple_net):
    net, x, _ = tuple_net
    points = torch_ref.capture_points(net, x)
    assert list(points.items()) == [
        ("embed", (3, 4)), ("relu", (3, 4)),
        ("block1", (3, 4)), ("block1.dense", (3, 4)), ("block1.act", (3, 4)),  # a block before its children
        ("unused", (3, 2)), ("relu:1", (3, 4)), ("head", (3, 5)),  # "note" returned None: not a capture point
    ]


def test_capture_points_of_net_end_with_its_stored_activations():
    net = torch_ref.Net(in_channels=1, image_size=16).double()
    points = torch_ref.capture_points(net, torch.zeros(2, 1, 16, 16, dtype=torch.float64))
    assert list(points) == ["conv1", "pool", "relu", "conv2", "pool:1", "relu:1", "linear", "relu1", "relu2"]
    assert points["relu:1"] == points["relu2"] == (2, 64, 1, 1)


def test_a_flax_style_path_names_the_same_module(tuple_net):
    net, x, y = tuple_net
    _, dotted = torch_ref.penalized_loss(net, x, y, 1.0, capture_modules={"d": "block1.dense"})
    _, slashed = torch_ref.penalized_loss(net, x, y, 1.0, capture_modules={"d": "block1/dense"})
    torch.testing.assert_close(slashed["penalty"], dotted["penalty"], rtol=0, atol=0)  # the same computation


def test_a_tuple_output_contributes_its_first_element(tuple_net):
    net, x, y = tuple_net
    total, aux = torch_ref.penalized_loss(net, x, y, 2.0, capture_modules={"b": "block1", "r": "relu:1"})
    loss, penalty = manual_penalty(net, lambda: net(x), y, [(net.block1, 0), (net.relu, 1)])
    torch.testing.assert_close(aux["penalty"], penalty, rtol=RTOL, atol=0)
    torch.testing.assert_close(aux["loss"], loss, rtol=RTOL, atol=0)
    assert_same_training_gradient(net, total, loss + 2.0 * penalty)


@dataclasses.dataclass
class Hidden:
    hidden: torch.Tensor
    note: str = "extra fields that are not tensors are fine"


class Wrap(nn.Module):
    """A linear layer whose output comes back in a dict (with a second tensor or not) or a dataclass."""

    def __init__(self, kind):
        super().__init__()
        self.inner, self.kind = nn.Linear(3, 4), kind

    def forward(self, x):
        h = self.inner(x)
        if self.kind == "dict":
            return {"hidden": h, "note": None}
        if self.kind == "two_tensors":
            return {"hidden": h, "other": h * 2}
        return Hidden(h)


class FieldsNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.wrap = Wrap(kind)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out = self.wrap(x)
        h = out.hidden if isinstance(out, Hidden) else out["hidden"]
        return self.head(torch.tanh(h))


def fields_net(kind):
    torch.manual_seed(1)
    return FieldsNet(kind).double()


@pytest.mark.parametrize("kind", ["dict", "dataclass"])
def test_an_output_with_one_tensor_field_contributes_that_field(kind):
    net = fields_net(kind)
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.tensor([1, 0])
    _, aux = torch_ref.penalized_loss(net, x, y, 1.0, capture_modules={"h": "wrap"})
    kept = []
    handle = net.wrap.inner.register_forward_hook(lambda m, i, o: kept.append(o))
    loss = F.cross_entropy(net(x), y)
    handle.remove()
    (g,) = torch.autograd.grad(loss, kept)
    torch.testing.assert_close(aux["penalty"], g.pow(2).sum(), rtol=RTOL, atol=0)


def test_an_output_with_several_tensor_fields_is_an_error():
    net = fields_net("two_tensors")
    with pytest.raises(TypeError, match=r"several tensor fields \['hidden', 'other'\]"):
        torch_ref.penalized_loss(net, torch.randn(2, 3, dtype=torch.float64), torch.tensor([1, 0]), 1.0,
                                 capture_modules={"h": "wrap"})


class TwoInputs(nn.Module):
    """``forward(x, mask)``: a masked mean of per-token features, like a text model's inputs."""

    def __init__(self, vocab=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, 4) if vocab else nn.Linear(2, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 3)

    def forward(self, x, mask):
        h = self.act(self.embed(x))  # (B, T, 4)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def test_tuple_and_dict_inputs_are_positional_and_keyword_arguments():
    torch.manual_seed(2)
    net = TwoInputs().double()
    x = torch.randn(2, 5, 2, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    cm = {"act": "act"}
    _, by_position = torch_ref.penalized_loss(net, (x, mask), y, 1.0, capture_modules=cm)
    _, by_keyword = torch_ref.penalized_loss(net, {"mask": mask, "x": x}, y, 1.0, capture_modules=cm)
    _, penalty = manual_penalty(net, lambda: net(x, mask), y, [(net.act, 0)])
    torch.testing.assert_close(by_position["penalty"], penalty, rtol=RTOL, atol=0)
    torch.testing.assert_close(by_keyword["penalty"], penalty, rtol=RTOL, atol=0)
    assert torch_ref.capture_points(net, {"x": x, "mask": mask})["act"] == (2, 5, 4)


def test_integer_inputs_work_and_the_input_capture_point_refuses_them():
    torch.manual_seed(3)
    net = TwoInputs(vocab=7).double()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 6]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    inputs = {"x": ids, "mask": mask}
    _, aux = torch_ref.penalized_loss(net, inputs, y, 1.0, capture_modules={"emb": "embed"})
    _, penalty = manual_penalty(net, lambda: net(**inputs), y, [(net.embed, 0)])
    torch.testing.assert_close(aux["penalty"], penalty, rtol=RTOL, atol=0)
    with pytest.raises(ModelInputError, match=r"'input' capture point needs a floating-point input tensor"):
        torch_ref.penalized_loss(net, inputs, y, 1.0, ["emb", "input"], capture_modules={"emb": "embed"})


def test_the_input_capture_point_differentiates_the_first_tensor_of_a_dict_input():
    torch.manual_seed(4)
    net = TwoInputs().double()
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    y = torch.tensor([0, 1])
    _, aux = torch_ref.penalized_loss(net, {"x": x, "mask": mask}, y, 1.0, ["input"],
                                      capture_modules={"act": "act"})
    leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(leaf, mask), y), leaf)
    torch.testing.assert_close(aux["penalty"], g.pow(2).sum(), rtol=RTOL, atol=0)


class WithLogits(nn.Module):
    """Returns an object with ``.logits``, as Hugging Face's ``SequenceClassifierOutput``."""

    @dataclasses.dataclass
    class Output:
        logits: torch.Tensor
        hidden: torch.Tensor

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(3, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.dense(x))
        return self.Output(logits=self.head(h), hidden=h)


def test_default_loss_reads_logits_and_loss_fn_gets_the_raw_output():
    torch.manual_seed(5)
    net = WithLogits().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    cm = {"act": "act"}
    _, aux = torch_ref.penalized_loss(net, x, y, 1.0, capture_modules=cm)
    loss, penalty = manual_penalty(net, lambda: net(x), y, [(net.act, 0)], logits_of=lambda out: out.logits)
    torch.testing.assert_close(aux["loss"], loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(aux["penalty"], penalty, rtol=RTOL, atol=0)
    assert aux["logits"].shape == (4, 3) and isinstance(aux["outputs"], WithLogits.Output)

    seen = []

    def loss_fn(outputs, labels):  # per-example loss of the raw output: (B,)
        seen.append(type(outputs))
        return 0.5 * F.cross_entropy(outputs.logits, labels, reduction="none")

    _, custom = torch_ref.penalized_loss(net, x, y, 1.0, capture_modules=cm, loss_fn=loss_fn)
    assert seen == [WithLogits.Output]
    torch.testing.assert_close(custom["penalty"], 0.25 * penalty, rtol=RTOL, atol=0)  # (0.5 g)^2


def conv_bn_relu(inplace):
    """conv -> bn -> ReLU(inplace) -> conv -> flatten -> linear: timm's ResNet pattern after bn1."""
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=inplace), nn.Conv2d(3, 2, 3),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 4),
    ).double()


@pytest.mark.parametrize("approx", ["exact", "finite_difference"])
@pytest.mark.parametrize("layers", [["bn"], ["bn", "input"]])
def test_an_in_place_op_after_the_capture_point_does_not_change_the_penalty(approx, layers):
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 3, 1])
    results = []
    for inplace in (True, False):
        net = conv_bn_relu(inplace)
        total, aux = torch_ref.penalized_loss(net, x, y, 3.0, layers, approx=approx,
                                              capture_modules={"bn": "1"})
        results.append((aux["penalty"].detach(), param_grads(net, total)))
    (pen_inplace, grads_inplace), (pen_plain, grads_plain) = results
    torch.testing.assert_close(pen_inplace, pen_plain, rtol=RTOL, atol=ATOL)
    for a, b in zip(grads_inplace, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_differentiating_the_hooked_output_itself_is_wrong_after_an_in_place_op():
    """The case above bites: the naive hook (keep the output, grad w.r.t. it) sees ReLU's result instead."""
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 3, 1])
    net = conv_bn_relu(inplace=True)
    _, naive = manual_penalty(net, lambda: net(x), y, [(net[1], 0)])
    _, aux = torch_ref.penalized_loss(net, x, y, 3.0, capture_modules={"bn": "1"})
    assert abs(naive.detach().item() / aux["penalty"].detach().item() - 1) > 0.1


class Attention(nn.Module):
    """One head of self-attention through ``F.scaled_dot_product_attention`` (fused kernel on CPU)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # (B, T, 4)
        h = self.act(self.proj(x))
        a = F.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None])[:, 0]  # (B, T, 4)
        return self.head(a.mean(1))


def test_fused_attention_without_a_second_derivative_names_the_fix():
    torch.manual_seed(8)
    net = Attention().double()
    x, y = torch.randn(2, 5, 4, dtype=torch.float64), torch.tensor([0, 2])
    total, _ = torch_ref.penalized_loss(net, x, y, 1.0, capture_modules={"act": "act"})
    fix = r'attn_implementation="eager".*approx="finite_difference"'
    with pytest.raises(RuntimeError, match=fix) as info:
        total.backward()
    assert "derivative for" in str(info.value.__cause__)  # raise ... from the error PyTorch gave
    total, aux = torch_ref.penalized_loss(net, x, y, 1.0, capture_modules={"act": "act"},
                                          approx="finite_difference")
    total.backward()  # first derivatives only
    assert torch.isfinite(aux["penalty"]) and aux["penalty"].detach().item() > 0


@pytest.mark.parametrize(("message", "expected"), [
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented", "eager"),
    ("derivative for aten::_scaled_dot_product_efficient_attention_backward is not implemented", "eager"),
    ("derivative for aten::_efficient_attention_backward is not implemented", "eager"),
    ("derivative for aten::_flash_attention_backward is not implemented", "eager"),
    ("derivative for aten::some_op_backward is not implemented", "finite_difference"),
    ("CUDA out of memory", None),
])
def test_second_derivative_hint_rewrites_only_missing_derivative_errors(message, expected):
    hint = second_derivative_hint(message)
    assert (hint is None) if expected is None else (expected in hint and message in hint)


class NoCaptures(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)

    def captures(self):
        return {}


@pytest.mark.parametrize(("capture_modules", "labels", "error", "message"), [
    ({}, [0, 1], ValueError, r"capture_modules is empty: nothing to penalise"),
    ({"input": "act"}, [0, 1], ValueError, r"capture name 'input' is reserved"),
    ({"a": "act", "b": "act"}, [0, 1], ValueError, r"captures 'a' and 'b' both name 'act'"),
    ({"a": "act", "b": "act:0"}, [0, 1], ValueError, r"captures 'a' and 'b' both name 'act'"),
    ({"a": "acts"}, [0, 1], ValueError, r"no submodule 'acts'.*nearest paths: \['act'\]"),
    ({"a": "act:3"}, [0, 1], ValueError, r"\['a'\] were not reached"),
    ({"a": 7}, [0, 1], TypeError, r"capture spec 7: expected a string"),
    ({"a": "act"}, [0, 3], ModelInputError, r"in \[0, 3\) \(K from the logits\), found values from 0 to 3"),
    ({"a": "act"}, [-1, 0], ModelInputError, r"class indices in \[0, K\), found values from -1 to 0"),
    ({"a": "act"}, [0.0, 1.0], ModelInputError, r"expected integer class labels"),
])
def test_bad_capture_specs_and_labels_are_one_line_errors(capture_modules, labels, error, message):
    torch.manual_seed(9)
    net = TwoInputs().double()
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(error, match=message):
        torch_ref.penalized_loss(net, (x, mask), torch.tensor(labels), 1.0, capture_modules=capture_modules)


def test_zero_capture_points_is_an_error():
    net = NoCaptures().double()
    with pytest.raises(ValueError, match=r"no capture points"):
        torch_ref.penalized_loss(net, torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]), 1.0)


def test_a_capture_point_the_loss_does_not_use_is_an_error(tuple_net):
    net, x, y = tuple_net
    with pytest.raises(ValueError, match=r"\['n'\] do not affect the loss"):
        torch_ref.penalized_loss(net, x, y, 1.0, capture_modules={"n": "unused", "h": "head"})


def tiny_bert(attn_implementation):
    """A random-initialised tiny ``BertForSequenceClassification`` (no download)."""
    transformers = pytest.importorskip("transformers")  # the dev extra; skips only the Hugging Face tests
    torch.manual_seed(10)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, attn_implementation=attn_implementation,
    )
    # eval(): dropout off, so the penalty and the hand computation see the same forward pass.
    return transformers.BertForSequenceClassification(config).double().eval()


BERT_INPUTS = {
    "input_ids": torch.tensor([[2, 7, 11, 5, 0], [3, 9, 4, 8, 6]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
}
BERT_LABELS = torch.tensor([1, 0])
BERT_LAYERS = {"layer0": "bert.encoder.layer.0", "layer1": "bert.encoder.layer.1"}


def test_hugging_face_bert_penalty_on_tuple_layer_outputs_matches_hand_hooks():
    model = tiny_bert("eager")
    points = torch_ref.capture_points(model, BERT_INPUTS)
    assert points["bert.encoder.layer.0"] == (2, 5, 16) and points["classifier"] == (2, 2)
    total, aux = torch_ref.penalized_loss(model, BERT_INPUTS, BERT_LABELS, 1.0, capture_modules=BERT_LAYERS)
    loss, penalty = manual_penalty(model, lambda: model(**BERT_INPUTS), BERT_LABELS,
                                   [(model.bert.encoder.layer[0], 0), (model.bert.encoder.layer[1], 0)],
                                   logits_of=lambda out: out.logits)
    assert torch.isfinite(aux["penalty"]) and aux["penalty"].detach().item() > 0
    torch.testing.assert_close(aux["loss"], loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(aux["penalty"], penalty, rtol=1e-10, atol=0)  # attention: sums reordered
    assert_same_training_gradient(model, total, loss + penalty)


def test_hugging_face_bert_model_output_with_pooler_is_refused_not_silently_zero():
    model = tiny_bert("eager")
    with pytest.raises(TypeError, match=r"several tensor fields \['last_hidden_state', 'pooler_output'\]"):
        torch_ref.penalized_loss(model, BERT_INPUTS, BERT_LABELS, 1.0, capture_modules={"bert": "bert"})


def test_hugging_face_bert_with_sdpa_attention_names_the_fix():
    model = tiny_bert("sdpa")
    total, _ = torch_ref.penalized_loss(model, BERT_INPUTS, BERT_LABELS, 1.0, capture_modules=BERT_LAYERS)
    with pytest.raises(RuntimeError, match=r'attn_implementation="eager"'):
        total.backward()
    total, _ = torch_ref.penalized_loss(model, BERT_INPUTS, BERT_LABELS, 1.0, capture_modules=BERT_LAYERS,
                                        approx="finite_difference")
    total.backward()

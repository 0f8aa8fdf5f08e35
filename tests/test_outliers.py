"""quantlab.studies.outliers: finding outliers, the per-token int8 arithmetic, SmoothQuant and
rotation as exact rewrites that beat round to nearest on planted outliers, and the chapter's
figures."""

import math

import pytest
import torch
from torch import nn

from quantlab import viz
from quantlab.eval import sqnr_db
from quantlab.nn import QuantLinear
from quantlab.studies import outliers as ol


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def with_outliers(tokens=64, k=32, channels=(5, 9), factors=(50.0, 20.0), seed=0):
    x = torch.randn(tokens, k, generator=gen(seed))
    for c, f in zip(channels, factors, strict=True):
        x[:, c] *= f
    return x


class Toy(nn.Module):
    """Embedding, then `a` and `b` read the same tensor (like q/k/v), `c` reads a's output."""

    def __init__(self, k=32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, k)
        self.a, self.b, self.c = nn.Linear(k, 48), nn.Linear(k, 8), nn.Linear(48, 16)
        with torch.no_grad():
            self.emb.weight[:, 3] *= 40  # an outlier channel in every token

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        return self.c(torch.relu(self.a(x))).sum(-1, keepdim=True) + self.b(x)


def toy_batch():
    ids = torch.randint(0, 50, (3, 10), generator=gen(1))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:], mask[2, 3:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


# --- finding outliers --------------------------------------------------------------------------

def test_linear_inputs_drop_padding_and_share_one_tensor_between_readers():
    model, batch = Toy().eval(), toy_batch()
    xs = ol.linear_inputs(model, batch)
    assert set(xs) == {"a", "b", "c"}
    n_real = int(batch["attention_mask"].sum())
    assert xs["a"].shape == (n_real, 32) and xs["c"].shape == (n_real, 48)
    assert xs["a"] is xs["b"]  # one stored tensor for readers of the same input
    assert list(ol.distinct_inputs(xs)) == ["a", "c"]
    emb = model.emb(batch["input_ids"]).reshape(-1, 32)[batch["attention_mask"].reshape(-1).bool()]
    torch.testing.assert_close(xs["a"], emb.detach())
    assert ol.linear_inputs(model, batch, skip=("b",)).keys() == {"a", "c"}


def test_outlier_channels_absmax_and_kurtosis():
    x = with_outliers()
    amax = ol.channel_absmax(x)
    assert amax.shape == (32,) and torch.equal(amax, x.abs().amax(0))
    assert ol.outlier_channels(amax).tolist() == [5, 9]  # sorted by size
    assert ol.outlier_channels(amax, ratio=1e6).numel() == 0
    big = torch.randn(200_000, generator=gen(2))
    assert abs(ol.kurtosis(big) - 3) < 0.1
    assert abs(ol.kurtosis(torch.rand(200_000, generator=gen(3))) - 1.8) < 0.05
    spike = torch.zeros(1000)
    spike[0] = 1
    assert ol.kurtosis(spike) > 900


def test_layer_map_matches_the_suffix_after_the_layer_index():
    t = lambda v: torch.full((4, 6), float(v))
    tensors = {"enc.0.output.dense": t(1), "enc.0.attention.output.dense": t(7),
               "enc.1.output.dense": t(2)}
    m = ol.layer_map(tensors, "output.dense")
    assert m.shape == (2, 6) and m[:, 0].tolist() == [1.0, 2.0]
    assert ol.layer_map(tensors, "attention.output.dense").shape == (1, 6)
    with pytest.raises(ValueError, match="no name ends with"):
        ol.layer_map(tensors, "mlp.down_proj")


def test_outlier_rows_and_the_worst_per_kind():
    xs = {"m.0.fc": with_outliers(seed=0), "m.1.fc": with_outliers(factors=(90.0, 20.0), seed=1),
          "m.0.attn": torch.randn(64, 32, generator=gen(4))}
    rows = ol.outlier_rows(xs)
    assert [r["input of"] for r in rows] == list(xs)
    assert rows[1]["top channel"] == 5 and rows[1]["outlier channels"] == 2
    assert rows[2]["outlier channels"] == 0 and rows[2]["ratio"] < 6
    worst = {r["input of"]: r for r in ol.worst_per_kind(rows)}
    assert set(worst) == {"m.N.fc", "m.N.attn"}
    assert worst["m.N.fc"]["in layer"] == 1 and worst["m.N.fc"]["worst ratio"] == rows[1]["ratio"]
    assert worst["m.N.fc"]["max kurtosis"] == max(rows[0]["kurtosis"], rows[1]["kurtosis"])


def test_weight_rows_find_an_outlier_column():
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight[3, 7] = 40 * lin.weight.abs().max()
    model = nn.Sequential(lin, nn.Linear(16, 4))
    rows = ol.weight_rows(model, ["0", "1"])
    assert rows[0]["top column"] == 7 and rows[0]["column ratio"] > 30
    assert rows[0]["int8 per-channel SQNR dB"] < rows[1]["int8 per-channel SQNR dB"] - 5


# --- per-token int8 ----------------------------------------------------------------------------

def test_one_value_takes_its_tokens_levels():
    x = torch.randn(8, 64, generator=gen(5))
    x[0, 10] = 200.0  # one token, one channel
    codes = ol.token_codes(x)
    assert codes.shape == x.shape and codes.abs().max() == 127
    assert codes[0, 10] == 127 and codes[0].abs().sort().values[-2] < 10
    assert all(codes[t].abs().max() == 127 for t in range(1, 8))  # the others keep the range
    ch = torch.tensor([10])
    reach = ol.inlier_reach(x, ch)
    torch.testing.assert_close(reach[0], x[0, 11:].abs().max().clamp(min=x[0, :10].abs().max())
                               / 200 * 127)
    assert torch.allclose(reach[1:], torch.full((7,), 127.0))
    tok = torch.zeros(8, dtype=torch.bool)
    tok[0] = True
    rows = ol.inlier_sqnr_rows(x, ch, {"token": ol.PER_TOKEN_INT8}, {"hit": tok, "rest": ~tok})
    shared, kept = rows
    assert shared["outlier channels"] == "share the scale" and kept["SQNR dB, rest"] > 35
    assert kept["SQNR dB, hit"] > shared["SQNR dB, hit"] + 20
    assert shared["SQNR dB, rest"] == kept["SQNR dB, rest"]


# --- SmoothQuant and rotation ------------------------------------------------------------------

def test_smooth_and_rotate_keep_the_product():
    x, w = with_outliers(k=48), torch.randn(24, 48, generator=gen(6)) * 0.05
    for xs, ws in (ol.smooth(x, w, 0.5), ol.smooth(x, w, 0.8), ol.rotate(x, w)):
        torch.testing.assert_close(xs @ ws.T, x @ w.T, rtol=1e-4, atol=1e-4)
    xs, _ = ol.smooth(x, w, 1.0)  # alpha = 1: every activation channel's absmax becomes 1
    torch.testing.assert_close(ol.channel_absmax(xs), torch.ones(48))
    assert ol.smooth(x, w, None)[0] is x
    with pytest.raises(ValueError, match="alpha=1.5"):
        ol.smooth(x, w, 1.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ol.smooth_linears(Toy(), {"a": x}, alpha=-0.1)
    with pytest.raises(ValueError, match="power-of-two|pad the dimension"):
        ol.rotate(torch.randn(2, 112), torch.randn(3, 112))  # 7 * 16: no Hadamard here


def test_rotation_spreads_a_spike_evenly():
    for k in (32, 48):  # 2**5 and 12 * 2**2
        x = torch.zeros(1, k)
        x[0, 7] = 30.0
        xr, _ = ol.rotate(x, torch.zeros(2, k))
        torch.testing.assert_close(xr.abs(), torch.full((1, k), 30 / math.sqrt(k)))
    x = with_outliers()
    assert ol.kurtosis(ol.rotate(x, torch.zeros(1, 32))[0]) < ol.kurtosis(x) / 5


def test_alpha_sweep_trades_activation_for_weight_error():
    x, w = with_outliers(tokens=256, k=64), torch.randn(32, 64, generator=gen(7)) * 0.05
    rows = ol.alpha_sweep(x, w, (0.0, 0.5, 1.0))
    assert [r["alpha"] for r in rows] == [None, 0.0, 0.5, 1.0]
    assert rows[-1]["activation SQNR dB"] > rows[0]["activation SQNR dB"] + 5
    assert rows[-1]["weight SQNR dB"] < rows[0]["weight SQNR dB"]
    assert rows[2]["output SQNR dB"] > rows[0]["output SQNR dB"] + 3
    assert rows[0]["x_amax"].shape == rows[0]["w_amax"].shape == (64,)
    rot = ol.w8a8_errors(*ol.rotate(x, w))
    assert rot["output SQNR dB"] > rows[0]["output SQNR dB"] + 3


# --- whole models ------------------------------------------------------------------------------

def test_smooth_and_rotate_linears_keep_the_function_and_w8a8_variants_beat_rtn():
    model, batch = Toy().eval(), toy_batch()
    xs = ol.linear_inputs(model, batch)
    with torch.no_grad():
        ref = model(**batch)
        for transformed in (ol.smooth_linears(Toy().eval(), xs, 0.5),
                            ol.rotate_linears(Toy().eval(), ["a", "b", "c"])):
            assert isinstance(transformed.a, (ol.ScaledInput, ol.HadamardInput))
            torch.testing.assert_close(transformed(**batch), ref, rtol=1e-4, atol=1e-4)
        made = ol.w8a8_variants(model, {"a": xs["a"], "b": xs["b"]}, alphas=(0.5, 0.8))
        assert list(made) == ["RTN", "SmoothQuant 0.5", "SmoothQuant 0.8", "rotation"]
        assert isinstance(made["RTN"].a, QuantLinear) and isinstance(made["RTN"].c, nn.Linear)
        assert isinstance(made["rotation"].b.linear, QuantLinear)
        err = {k: sqnr_db(ref, m(**batch)) for k, m in made.items()}
    assert err["SmoothQuant 0.5"] > err["RTN"] + 3 and err["rotation"] > err["RTN"] + 3
    assert isinstance(model.a, nn.Linear)  # the original is untouched


class StubTokenizer:
    def __call__(self, sentences, **kw):
        from transformers import BatchEncoding

        ids = [[1] + [2 + (ord(c) % 40) for c in s[:8]] for s in sentences]
        n = max(map(len, ids))
        return BatchEncoding({
            "input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])})


def test_embedding_errors_on_a_tiny_bert():
    from transformers import BertConfig, BertModel

    from quantlab.models import sentence_embeddings
    from quantlab.schemes import Scheme, TensorScheme

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=48, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    bert, tok = BertModel(cfg).eval(), StubTokenizer()
    with torch.no_grad():
        bert.embeddings.LayerNorm.weight[3] = 30.0  # an outlier channel at q/k/v's input
    sentences = ["a small test", "another sentence here", "third one", "and a fourth"]
    ref = sentence_embeddings(bert, tok, sentences)
    xs = ol.linear_inputs(bert, dict(tok(sentences)))
    assert len(xs) == 6 and len(ol.distinct_inputs(xs)) == 4  # q/k/v share, pooler skipped
    w4a4 = Scheme("w4a4", TensorScheme("int4", "channel"), TensorScheme("int4", "token"))
    made = ol.w8a8_variants(bert, xs, scheme=w4a4)  # a random BERT's output barely moves: 4 bits
    assert isinstance(made["SmoothQuant 0.5"].encoder.layer[0].attention.self.query.linear,
                      QuantLinear)
    errs = ol.embedding_errors({"float": bert, **made}, tok, sentences, ref)
    assert abs(errs["float"]) < 1e-12 and all(1e-6 < errs[k] < 1e-3 for k in made)
    assert errs["SmoothQuant 0.5"] < 0.5 * errs["RTN"] and errs["rotation"] < errs["RTN"]


def test_planted_outliers_keep_a_llama_and_the_w8a8_kl_helper_runs():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    lm = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 256), generator=gen(8))
    planted = ol.plant_outlier_channels(lm, channels=(3, 7), factor=30.0)
    with torch.no_grad():
        torch.testing.assert_close(planted(input_ids=ids).logits, lm(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    amax = ol.channel_absmax(ol.linear_inputs(planted, {"input_ids": ids})[
        "model.layers.0.self_attn.q_proj"])
    assert set(ol.outlier_channels(amax).tolist()) == {3, 7}
    kl = ol.causal_lm_w8a8_kl(lm, planted, ids, ids[:1])
    assert list(kl) == ["RTN", "SmoothQuant", "rotation"] and all(v >= 0 for v in kl.values())
    assert kl["SmoothQuant"] < kl["RTN"] and kl["rotation"] < kl["RTN"]


# --- figures -----------------------------------------------------------------------------------

def _buttons(fig):
    return fig.layout.updatemenus[0].buttons


def test_figures_have_their_menus_and_slider():
    maps = {"a": torch.rand(3, 16) + 1, "b": torch.rand(2, 16) + 1}
    fig = viz.outliers.channel_heatmap_figure(maps)
    assert len(fig.data) == 2 and [b.label for b in _buttons(fig)] == ["a", "b"]
    assert [tr.visible for tr in fig.data] == [True, False]
    assert _buttons(fig)[1].args[0]["visible"] == [False, True]
    fig = viz.outliers.token_heatmap_figure({"x": torch.randn(4, 8)},
                                            ["[CLS]", "a", "b", "[SEP]"])
    assert len(fig.data[0].y) == 4
    fig = viz.outliers.token_codes_figure({"t": torch.tensor([127.0, 3, -2, 0])})
    assert "largest |code| 127, the next 3" in fig.layout.title.text
    rows = ol.alpha_sweep(with_outliers(), torch.randn(8, 32, generator=gen(9)), (0.5, 1.0))
    fig = viz.outliers.alpha_slider_figure(rows)
    assert len(fig.data) == 6 and len(fig.layout.sliders[0].steps) == 3
    assert fig.layout.sliders[0].steps[2].args[0]["visible"] == [False] * 4 + [True] * 2
    fig = viz.outliers.alpha_sqnr_figure({"l1": rows, "l2": rows})
    assert len(fig.data) == 12 and len(_buttons(fig)) == 2
    x = with_outliers()
    fig = viz.outliers.rotation_histogram_figure({"x": (x, ol.rotate(x, x[:1])[0])})
    assert "kurtosis" in fig.data[0].name and len(fig.data) == 2
    fig = viz.outliers.end_to_end_figure({"m": {"RTN": 2.0, "rotation": 1.0},
                                          "n": {"RTN": 3.0}}, {"m": "err", "n": "kl"})
    assert _buttons(fig)[1].args[1]["yaxis.title.text"] == "kl"
    assert fig.layout.yaxis.title.text == "err" and fig.layout.title.text.endswith(": m")
    assert fig.data[0].marker.color[0] == fig.data[1].marker.color[0] != fig.data[0].marker.color[1]

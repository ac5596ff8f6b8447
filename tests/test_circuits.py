"""Circuit selection, faithfulness and the circuit run's checks (tiny models; the CLI on a local checkpoint)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from actpatch import wrap_model
from actpatch.analysis.circuit_pruning import (circuit_heads, circuit_nodes, exact_prune, fed_senders, greedy_edges, jaccard, node_circuit,
                                        prune, top_edges, top_edges_with)
from actpatch.analysis.mib_scores import MIB_FRACTIONS, cpr_cmd, mib_sizes
from actpatch.cli import main
from actpatch.engine import edge_patching as edges_module
from actpatch.engine.circuit_graph import build_graph
from actpatch.engine.pairs import PromptPair
from actpatch.errors import ConfigError
from actpatch.experiment import circuit_checks
from actpatch.experiment.circuit_discovery import CircuitConfig, _same_size, run_circuit
from actpatch.experiment.circuit_checks import random_halves, template_halves
from actpatch.experiment.circuit_result import CircuitResult
from actpatch.report.circuit_report import findings, head_table, plot_curves, render_circuit_md
from conftest import tiny_model

PAIRS = [
    PromptPair("When Mary and John went to the store, John gave a drink to",
               "When Mary and John went to the store, Mary gave a drink to", " Mary", " John", template=0),
    PromptPair("When Anna and Paul went to the park, Paul gave a ball to",
               "When Anna and Paul went to the park, Anna gave a ball to", " Anna", " Paul", template=0),
    PromptPair("The cat sat on the mat and then it", "The dog sat on the rug and then it", " slept", " ran", template=1),
    PromptPair("The cow sat on the mat and then it", "The pig sat on the rug and then it", " slept", " ran", template=1),
]


@pytest.fixture(scope="module")
def gpt2_lm(gpt2_tokenizer):
    return wrap_model(tiny_model("gpt2"), gpt2_tokenizer, {"spec": "tiny-gpt2"})


def _keep(graph, pairs):
    keep = torch.zeros_like(graph.allowed)
    for sender, receiver in pairs:
        keep[graph.receiver_index(receiver), graph.sender_index(sender)] = True
    return keep


def test_prune_keeps_only_paths_from_input_to_logits(gpt2_lm):
    g = build_graph(gpt2_lm.adapter)
    path = [("input", "a0.h1<v>"), ("a0.h1", "m1"), ("m1", "logits")]
    dangling = [("a0.h2", "a1.h0<q>"),    # a0.h2 gets nothing from the input
                ("input", "a1.h3<k>")]    # a1.h3 sends nowhere
    kept = prune(g, _keep(g, path + dangling))
    assert torch.equal(kept, _keep(g, path))
    assert circuit_nodes(g, kept) == ["input", "a0.h1", "m1", "logits"]
    assert not prune(g, _keep(g, [("a0.h1", "m1"), ("m1", "logits")])).any()  # never reached from the input


def test_top_edges_with_grows_until_pruning_leaves_enough_edges(gpt2_lm):
    g = build_graph(gpt2_lm.adapter)
    scores = torch.zeros(g.allowed.shape)
    for (sender, receiver), value in {("input", "a0.h0<q>"): 10.0, ("a1.h0", "logits"): 9.0,  # no path: pruned
                                      ("a0.h0", "logits"): 8.0, ("a0.h0", "m1"): 7.0, ("m1", "logits"): 6.0}.items():
        scores[g.receiver_index(receiver), g.sender_index(sender)] = value
    assert not top_edges(g, scores, 2).any()  # the two strongest edges share no path
    want = _keep(g, [("input", "a0.h0<q>"), ("a0.h0", "logits")])
    assert torch.equal(top_edges_with(g, scores, 1), want) and torch.equal(top_edges_with(g, scores, 2), want)
    bigger = _keep(g, [("input", "a0.h0<q>"), ("a0.h0", "logits"), ("a0.h0", "m1"), ("m1", "logits")])
    assert torch.equal(top_edges_with(g, scores, 3), bigger)  # top 4 prune to 2 edges, top 5 to 4
    # against a plain scan over n on random scores: the first top-n circuit with enough edges after pruning
    noisy = torch.randn(g.allowed.shape, generator=torch.Generator().manual_seed(1)) * g.allowed
    for n_edges in (1, 5, 17, 40):
        n = next(n for n in range(n_edges, g.n_edges + 1) if int(top_edges(g, noisy, n).sum()) >= n_edges)
        assert torch.equal(top_edges_with(g, noisy, n_edges), top_edges(g, noisy, n)), n_edges
    # stability compares circuits of the chosen one's edge count: a 2-edge circuit chosen as the top 2 of other scores
    chosen = {"keep": want, "point": {"size": 2}}
    assert torch.equal(_same_size(CircuitConfig(), g, scores, chosen), want)


def test_top_greedy_and_node_circuits(gpt2_lm):
    g = build_graph(gpt2_lm.adapter)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(g.allowed.shape, generator=gen) * g.allowed
    scores[g.receiver_index("logits"), g.sender_index("input")] = 100.0  # the strongest edge: input -> logits
    top = top_edges(g, scores, 30)
    assert 1 <= int(top.sum()) <= 30 and bool(top[g.receiver_index("logits"), 0])
    assert torch.equal(prune(g, top), top)
    # every kept edge is among the 30 largest |scores|
    threshold = scores.abs()[g.allowed].sort(descending=True).values[29]
    assert bool((scores.abs()[top] >= threshold).all())
    grown = greedy_edges(g, scores, 10)
    assert bool(grown[g.receiver_index("logits")].any()) and torch.equal(prune(g, grown), grown)
    nodes = node_circuit(g, ["a1.h2"])
    senders = {g.senders[j] for j in nodes.any(0).nonzero().flatten().tolist()}
    assert senders == {"input", "m0", "m1", "m2", "a1.h2"}
    assert not bool(nodes[g.receiver_index("a1.h0<q>")].any())  # a head outside the circuit reads nothing
    assert jaccard(top, top) == 1.0 and jaccard(top, torch.zeros_like(top)) == 0.0
    with pytest.raises(ConfigError, match="circuit size"):
        top_edges(g, scores, 0)
    assert [len(f) for f in fed_senders(g)][:12] == [1] * 12  # without GQA each q, k, v feeds its own head


def test_circuit_heads_read_and_write(gpt2_lm, gpt2_tokenizer):
    g = build_graph(gpt2_lm.adapter)
    # a0.h1 reads (v) and writes; a1.h0 reads but writes nothing; a0.h2 writes but reads nothing
    keep = _keep(g, [("input", "a0.h1<v>"), ("a0.h1", "logits"), ("input", "a1.h0<q>"), ("a0.h2", "m2")])
    assert circuit_heads(g, keep) == ["a0.h1"]
    llama = build_graph(wrap_model(tiny_model("llama"), gpt2_tokenizer).adapter)  # 4 query heads on 2 KV heads
    # a key of KV head 1 is read by query heads 2 and 3; only head 3 writes
    assert circuit_heads(llama, _keep(llama, [("input", "a1.kv1<k>"), ("a1.h3", "logits")])) == ["a1.h3"]
    assert circuit_heads(llama, _keep(llama, [("input", "a1.kv0<k>"), ("a1.h3", "logits")])) == []
    gemma = build_graph(wrap_model(tiny_model("gemma3"), gpt2_tokenizer).adapter)  # the layer's attention sends
    assert circuit_heads(gemma, _keep(gemma, [("input", "a1.h2<q>"), ("a1", "logits")])) == ["a1.h2"]


def _plain_trapezoid(xs, ys):
    """Area under straight lines through (xs, ys), written out: sum of (x1 - x0) (y0 + y1) / 2."""
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


def test_cpr_and_cmd_of_hand_made_curves_with_known_areas():
    # MIB's grid of edge fractions (Mueller et al. 2025, their evaluation code): log-spaced from 0.1% to 100%
    assert MIB_FRACTIONS == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    assert mib_sizes(70651) == [70, 141, 353, 706, 1413, 3532, 7065, 14130, 35325, 70651]  # int(f x n), as MIB
    xs = list(MIB_FRACTIONS)
    # f(x) = x: trapezoids are exact on a straight line, so CPR = (1 - 0.001^2) / 2 and CMD = 0.999 - CPR
    cpr, cmd = cpr_cmd(xs, xs)
    assert cpr == pytest.approx((1 - 0.001 ** 2) / 2, abs=1e-12) and cmd == pytest.approx(0.999 - cpr, abs=1e-12)
    # a curve above 1 counts against CMD too: |1 - 1.2| over the width 0.999
    cpr, cmd = cpr_cmd(xs, [1.2] * len(xs))
    assert cpr == pytest.approx(1.2 * 0.999, abs=1e-12) and cmd == pytest.approx(0.2 * 0.999, abs=1e-12)
    # a curve that crosses 1, given out of order: the points are sorted by fraction first
    ys = [0.0, 0.1, 0.4, 0.9, 1.3, 1.1, 1.0, 0.95, 1.0, 1.0]
    cpr, cmd = cpr_cmd(xs[::-1], ys[::-1])
    assert cpr == pytest.approx(_plain_trapezoid(xs, ys), abs=1e-12)
    assert cmd == pytest.approx(_plain_trapezoid(xs, [abs(1 - y) for y in ys]), abs=1e-12)
    assert all(math.isnan(v) for v in cpr_cmd([0.5], [1.0]))  # one point has no area


def test_exact_prune_drops_edges_that_change_nothing(gpt2_lm):
    g = build_graph(gpt2_lm.adapter)
    needed = _keep(g, [("input", "a0.h0<q>"), ("a0.h0", "logits")])
    # a metric that only one path moves (input -> a0.h0's query -> logits): exact pruning keeps exactly it
    evaluate = lambda keep: float((keep & needed).sum())  # noqa: E731
    kept = exact_prune(g, torch.ones(g.allowed.shape), evaluate, threshold=0.5)
    assert torch.equal(kept, needed)
    with pytest.raises(ConfigError, match="max_edges"):
        exact_prune(g, torch.ones(g.allowed.shape), evaluate, threshold=0.5, max_edges=10)


def test_circuit_run_checks_faithfulness_and_round_trip(gpt2_lm, tmp_path):
    result = run_circuit(lm=gpt2_lm, pairs=PAIRS, task="pairs", method="eap", edges=(5, 20), resamples=1,
                         progress=False)
    assert result.passed, result.sanity
    assert set(result.sanity) == {"full_circuit_is_recipient", "empty_circuit_is_donor",
                                  "edge_patch_matches_plain_patch", "circuit_sums_agree", "no_hooks_left"}
    df = result.faithfulness_frame()
    # the node-level circuit with every head is the whole model: faithfulness exactly 1
    whole = df[(df.method == "nodes")].sort_values("edges").iloc[-1]
    assert whole.edges == result.graph["n_edges"] and whole.faithfulness == pytest.approx(1.0, abs=1e-5)
    assert len(result.edges) == result.graph["n_edges"]
    assert result.attribution_check["n_edges"] >= 20 and -1 <= result.attribution_check["spearman"] <= 1
    assert {s["subset"] for s in result.stability["subsets"]} == {"resample 0", "random half A", "random half B",
                                                                  "template half A", "template half B"}
    assert 0 <= result.stability["template_split_jaccard"] <= 1 and 0 <= result.stability["random_split_jaccard"] <= 1
    md = render_circuit_md(result, [])
    assert "template half B" in md and "Jaccard with the other half" in md
    bench = result.benchmark_scores().set_index("method")
    assert set(bench.index) == {"eap", "nodes"}
    grid = df[(df.method == "eap") & (df.grid == True)].sort_values("fraction")  # noqa: E712
    assert tuple(grid.fraction) == MIB_FRACTIONS  # every MIB point measured, plus the asked sizes 5 and 20
    assert set(df[df.method == "eap"]["size"]) >= {5, 20} | set(mib_sizes(result.graph["n_edges"]))
    assert grid.faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-5)  # 100% of the edges: the model itself
    xs, ys = grid.fraction.tolist(), grid.faithfulness.tolist()
    assert bench.loc["eap", "cpr"] == pytest.approx(_plain_trapezoid(xs, ys), abs=1e-12)
    assert bench.loc["eap", "cmd"] == pytest.approx(_plain_trapezoid(xs, [abs(1 - y) for y in ys]), abs=1e-12)
    assert "CPR" in md and "CMD" in md
    assert result.baseline["head_classes"] is None  # these pairs have no IOI positions
    graph = build_graph(gpt2_lm.adapter)
    assert result.circuit["heads"] == circuit_heads(graph, _keep_of(graph, result))
    result.save(tmp_path)
    saved = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["benchmark_scores"]}
    assert saved["eap"]["cpr"] == pytest.approx(bench.loc["eap", "cpr"], abs=1e-12)
    back = CircuitResult.load(tmp_path)
    assert back.circuit == json.loads((tmp_path / "circuit.json").read_text())
    assert back.edges_frame().equals(result.edges_frame())
    assert back.faithfulness_frame().shape == df.shape


def test_compare_measures_every_method_and_exact_patching_at_equal_edge_counts(gpt2_lm):
    result = run_circuit(lm=gpt2_lm, pairs=PAIRS, task="pairs", method="eap-ig-activations", ig_steps=2, compare=True,
                         exact_candidates=12, resamples=0, progress=False)
    assert result.passed, result.sanity
    assert result.config["method"] == "eap-ig-activations"
    df, n = result.faithfulness_frame(), result.graph["n_edges"]
    grid = df[df.grid == True]  # noqa: E712
    assert set(grid.method) == {"eap", "eap-ig-inputs", "eap-ig-activations", "exact"}
    for method in ("eap", "eap-ig-inputs", "eap-ig-activations"):  # every MIB point, for every method
        assert tuple(grid[grid.method == method].sort_values("fraction").fraction) == MIB_FRACTIONS
    exact = grid[grid.method == "exact"]
    assert len(exact) and (exact["size"] <= 12).all()  # exact scores exist for the candidates only
    table = result.side_by_side()
    assert list(table.columns) == ["eap", "eap-ig-inputs", "eap-ig-activations", "exact"]
    assert math.isnan(table.loc["CPR (higher is better)", "exact"])  # a partial curve gets no CPR
    part = grid[grid.method == "eap"].sort_values("fraction")
    assert table.loc["CPR (higher is better)", "eap"] == pytest.approx(
        _plain_trapezoid(part.fraction.tolist(), part.faithfulness.tolist()), abs=1e-12)
    # the same method's estimates in a run of its own: the same curve
    alone = run_circuit(lm=gpt2_lm, pairs=PAIRS, task="pairs", method="eap", resamples=0, progress=False)
    mine = alone.faithfulness_frame().query("method == 'eap' and grid == True").sort_values("fraction")
    assert mine.faithfulness.tolist() == pytest.approx(part.faithfulness.tolist(), abs=1e-6)
    assert "side by side" in render_circuit_md(result, [])


def _keep_of(graph, result):
    """The chosen circuit's edges as an (R, S) mask, read back from circuit.json's edge list."""
    return _keep(graph, [(e[0], e[1] if e[2] in ("mlp", "logits") else f"{e[1]}<{e[2]}>") for e in result.circuit["edges"]])


def test_ioi_circuit_lines_heads_up_with_their_classes(gpt2_lm):
    result = run_circuit(lm=gpt2_lm, task="ioi", n_pairs=4, method="eap", edges=(10, 40), resamples=0, progress=False)
    assert result.passed, result.sanity
    assert isinstance(result.baseline["head_classes"], dict)
    graph = build_graph(gpt2_lm.adapter)
    assert result.circuit["heads"] == circuit_heads(graph, _keep_of(graph, result))
    # the lineup, on classes given by hand: a head in the circuit, one outside it
    inside = result.circuit["heads"][0] if result.circuit["heads"] else None
    outside = next(f"a{L}.h{h}" for L in range(3) for h in range(4) if f"a{L}.h{h}" not in result.circuit["heads"])
    result.baseline["head_classes"] = {outside: ["induction"], **({inside: ["name mover"]} if inside else {})}
    text = " ".join(findings(result))
    assert "induction 0 of 1" in text
    assert inside is None or f"name mover 1 of 1 ({inside})" in text
    table = head_table(result).set_index("head")
    assert not table.loc[outside, "in circuit"] and table.loc[outside, "IOI classes"] == "induction"
    assert inside is None or table.loc[inside, "in circuit"]
    result.baseline["head_classes"] = {}
    assert "No head meets the IOI class thresholds" in " ".join(findings(result))
    fig = plot_curves([result, result])  # one model and task: one panel, the node-level curve drawn once
    assert len(fig.axes) == 1 and len(fig.axes[0].get_lines()) == 3 + 1  # two edge curves, nodes, the target line


@pytest.mark.parametrize("method, fails", [
    # the MLP and logits receivers read the run's own residual stream: a head's write at END no longer reaches
    # them, so patching all edges out of a head differs from a plain patch (the empty circuit still matches the
    # donor: at END, donor and recipient differ only through attention)
    (("on_single",), "edge_patch_matches_plain_patch"),
    # the heads' q, k and v ignore their patches (at the norm and at the projection): the empty circuit is not the
    # donor run
    (("on_qkv", "on_attn_input"), "empty_circuit_is_donor"),
    # only the layers' shared q/k/v input is dropped: the written-out sums no longer agree
    (("on_attn_input",), "circuit_sums_agree"),
])
def test_a_receiver_that_ignores_its_patch_fails_a_check(gpt2_lm, monkeypatch, method, fails):
    for name in method:  # the attention input is still kept, as the hooks after it need it
        monkeypatch.setattr(edges_module._Flow, name, lambda self, *args, name=name: None if name != "on_attn_input"
                            else self.resid.__setitem__(*args))
    result = run_circuit(lm=gpt2_lm, pairs=PAIRS, task="pairs", method="eap", edges=(5,), resamples=0, progress=False)
    assert not result.sanity[fails]["passed"]
    assert result.sanity["full_circuit_is_recipient"]["passed"]


def test_cli_circuit_writes_every_file(gpt2_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"recipient": p.recipient, "donor": p.donor, "answer": p.answer,
                                         "wrong": p.wrong}) + "\n" for p in PAIRS))
    out = tmp_path / "out"
    code = main(["circuit", "--model", str(gpt2_dir), "--pairs-file", str(pairs), "--method", "eap-ig", "--ig-steps",
                 "2", "--edges", "5", "30", "--resamples", "0", "--out", str(out), "--quiet"])
    assert code == 0
    for name in ("edges.csv", "circuit.json", "faithfulness.csv", "faithfulness.png", "circuit.png", "report.md",
                 "report.html", "results.json", "config.json"):
        assert (out / name).is_file(), name
    edges = pd.read_csv(out / "edges.csv")
    assert list(edges.columns) == ["sender", "receiver", "input", "score"]
    assert edges.score.abs().is_monotonic_decreasing
    assert "faithfulness" in (out / "report.md").read_text()
    # without IG's gradient buffer: the same scores (summed in another order: float32 rounding), and it is recorded
    assert main(["circuit", "--model", str(gpt2_dir), "--pairs-file", str(pairs), "--method", "eap-ig", "--ig-steps",
                 "2", "--ig-no-buffer", "--edges", "5", "--resamples", "0", "--out", str(tmp_path / "nb"),
                 "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["ig_buffer"] is True
    assert json.loads((tmp_path / "nb" / "config.json").read_text())["config"]["ig_buffer"] is False
    unbuffered = pd.read_csv(tmp_path / "nb" / "edges.csv").set_index(["sender", "receiver"]).score
    buffered = edges.set_index(["sender", "receiver"]).score
    scale = float(buffered.abs().max())
    assert scale > 0 and float((unbuffered - buffered.reindex(unbuffered.index)).abs().max()) <= 1e-5 * scale
    assert main(["circuit", "ioi", "--model", str(gpt2_dir), "--pairs-file", str(pairs), "--out",
                 str(tmp_path / "x")]) == 2  # a task and a pairs file
    assert main(["circuit", "--model", str(gpt2_dir), "--pairs-file", str(pairs), "--ig-steps", "0", "--out",
                 str(tmp_path / "y")]) == 2


@pytest.mark.parametrize("select", ["greedy", "exact"])
def test_other_selections_run_end_to_end(gpt2_lm, select):
    result = run_circuit(lm=gpt2_lm, pairs=PAIRS[:2], task="pairs", method="eap", edges=(10,), select=select,
                         resamples=0, progress=False)
    assert result.passed
    assert result.circuit["select"] == select and result.circuit["n_edges"] <= result.graph["n_edges"]
    if select == "exact":  # every edge it dropped moved the metric by less than 1% of (model - empty)
        assert result.circuit["n_edges"] < result.graph["n_edges"]


def test_template_halves_share_no_template_and_are_as_even_as_templates_allow():
    templates = [0, 0, 1, 2, 2, 2]
    a, b = template_halves(templates)
    assert sorted(a + b) == list(range(6))
    assert not {templates[i] for i in a} & {templates[i] for i in b}
    assert sorted([len(a), len(b)]) == [3, 3]  # 3 pairs of template 2 on one side, templates 0 and 1 on the other
    assert template_halves([0, 0, 0]) is None and template_halves([0, None, 1]) is None
    a, b = random_halves(7, seed=3)
    assert sorted(a + b) == list(range(7)) and (len(a), len(b)) == (3, 4)
    assert (a, b) == random_halves(7, seed=3) and (a, b) != random_halves(7, seed=4)


class _Pairs:
    def __init__(self, templates):
        self.pairs = [PromptPair("a", "b", " c", " d", template=t) for t in templates]

    def __len__(self):
        return len(self.pairs)

    def select(self, idx):
        return idx


def test_stability_compares_the_two_halves_with_each_other(monkeypatch):
    # a stand-in for edge scores: the circuit of a subset is its pairs' own edges plus edge 10, shared by all
    def scores(lm, graph, idx, metric, don, steps=None, interpolate="inputs", **_):
        sc = torch.zeros(1, 11)
        sc[0, idx], sc[0, 10] = 1.0, 1.0
        return sc
    monkeypatch.setattr(circuit_checks, "edge_scores", scores)
    keep = torch.zeros(1, 11, dtype=torch.bool)
    keep[0, [0, 1, 2, 3, 10]] = True
    out = circuit_checks.stability(None, None, _Pairs([0, 0, 1, 1]), torch.zeros(2, 4), None, (None, "inputs"),
                                  lambda sc: sc > 0, keep, resamples=2, seed=0, disable=True)
    # halves {0, 1} + 10 and {2, 3} + 10 share one edge of five; either half against the chosen circuit would be 3/5
    assert out["template_split_jaccard"] == pytest.approx(1 / 5, abs=1e-12)
    assert out["random_split_jaccard"] == pytest.approx(1 / 5, abs=1e-12)  # any two disjoint halves of 2 pairs here
    resampled = [x for x in out["subsets"] if x["subset"].startswith("resample")]
    assert len(resampled) == 2 and out["resample_jaccard_mean"] == pytest.approx(
        sum(x["jaccard"] for x in resampled) / 2, abs=1e-12)
    assert all(x["jaccard"] == pytest.approx(len(set(x["pairs"]) | {10}) / 5, abs=1e-12) for x in resampled)

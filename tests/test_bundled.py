"""Integration tests on the bundled SmolLM2-135M (real pretrained weights, offline).

The converted weights are cached under $ACTPATCH_CACHE (or ~/.cache/actpatch) after the first
load, so the session-scoped fixture costs ~20 s once per machine and <1 s afterwards.
"""

from __future__ import annotations

import pytest
import torch

from actpatch import count_hooks, generate_pairs, last_logits, load_model, run_ioi, tokenize_ioi
from actpatch.engine.metrics import ioi_scores
from actpatch.model.models import bundled_gguf


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", device="cpu")


def test_bundled_model_loads_offline_with_eager_attention(smollm):
    assert smollm.info["architecture"] == "llama"
    assert (smollm.adapter.n_layers, smollm.adapter.n_heads, smollm.adapter.d_head) == (30, 9, 64)
    assert smollm.model.config._attn_implementation == "eager"
    assert smollm.info["revision"].startswith("gguf-sha256:") and bundled_gguf().is_file()
    assert next(smollm.model.parameters()).dtype == torch.float32


def test_bundled_ioi_baseline_accuracy(smollm):
    """Reference (embedded-model.md, 200 prompts): 97.5 % accuracy, mean LD 5.0."""
    pairs = generate_pairs(smollm.tokenizer, 60, designs=("swap",), seed=0)["swap"]
    batch = tokenize_ioi(smollm.tokenizer, pairs)
    with torch.inference_mode():
        logits = last_logits(smollm, batch.recipient_ids, batch.attention_mask, batch.position("END"))
    scores = ioi_scores(logits, batch.answer_ids, batch.wrong_ids)
    assert float(scores["correct"].mean()) >= 0.90
    assert float(scores["logit_diff"].mean()) > 3.0


def test_bundled_seed_experiment_runs_and_passes_sanity(smollm):
    result = run_ioi(lm=smollm, n_pairs=3, designs=("swap",), progress=False)
    assert result.passed, {k: v["detail"] for k, v in result.sanity.items() if not v["passed"]}
    df = result.to_dataframe()
    assert len(df[df.experiment.isin(["hidden", "all_heads", "head"])]) == 30 * 4 + 30 * 9
    hidden_all = df[(df.experiment == "hidden") & (df.position == "all")]
    donor_ld = result.baseline["designs"]["swap"]["donor"]["mean_logit_diff"]
    # the patched run is the donor's from that layer on; stacking variants reorders float sums (1e-4 abs)
    assert (hidden_all.logit_diff - donor_ld).abs().max() < 1e-4
    # name information reaches END late: patching the END hidden state of the last layer gives the donor's answer
    last = df[(df.experiment == "hidden") & (df.position == "END") & (df.layer == 29)].logit_diff.item()
    assert last < 0
    assert count_hooks(smollm.model) == 0


def test_bundled_attribution_ranks_heads_like_exact_patching(smollm):
    """Attribution patching's head ranking agrees with exact patching (issue target: Spearman >= 0.8)."""
    result = run_ioi(lm=smollm, n_pairs=4, designs=("abc",), layers=tuple(range(14, 30)), progress=False)
    cmp = result.attribution_vs_exact("abc")
    assert cmp["n_heads"] == 16 * 9
    assert cmp["spearman"] >= 0.8


def test_bundled_variable_length_batch_equals_one_pair_at_a_time(smollm):
    """Prompts of different lengths in one right-padded batch give each pair's own numbers (5e-5).

    30 layers of float32 with other matmul shapes: the summation order differs at every layer. 1e-5 held on the
    machines before; this CPU's kernels gave 1.4e-5 on an LD of 0.2, so the bound is 5e-5 (still far below any
    effect a wrong row or position would have, which is of order 0.1)."""
    from actpatch import HeadSite, HiddenSite
    from test_hardening import batched_equals_single

    variants = [[HeadSite(16)], [HeadSite(23, 3)], [HiddenSite(20, "S2")], [HeadSite(24, None, "END")], [HiddenSite(28)]]
    batched_equals_single(smollm, 4, variants, tol=5e-5)


@pytest.mark.parametrize("prompt, substring", [
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("The Colosseum is located in the city of", "Colosse"),   # ends inside a token: that token
    ("The war lasted from the year 1732 to the year 17", "1732"),  # SmolLM2 splits digits: the token "2"
    ("The café in Zürich", "Zürich"),
    ("Tokyo is 東京 in Japanese", "東京"),  # bytes of one character split across tokens: the last holds it
])
def test_substring_position_on_the_bundled_tokenizer(smollm, prompt, substring):
    """The token holding a substring's last character, against decoding growing prefixes of the ids."""
    from actpatch.engine.batch import substring_position

    tok = smollm.tokenizer
    ids = tok(prompt)["input_ids"]
    last = prompt.find(substring) + len(substring) - 1
    expected = next(i for i in range(len(ids))
                    if tok.decode(ids[: i + 1], skip_special_tokens=True).startswith(prompt[: last + 1]))
    assert substring_position(tok, prompt, substring) == expected

"""``actpatch check-model`` and the automatic adapter, from the command line and from Python.

Unknown model_types are made by registering subclasses of Llama and GPT-NeoX under new names with transformers'
Auto classes: their module trees are real, but no Architecture entry serves them. The Llama one has separate q/k/v
projections, which the automatic adapter reads correctly; the GPT-NeoX one has a fused per-head q/k/v, which the
automatic adapter wrongly assumes to be [q | k | v], and the self-test must catch that.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from transformers import (AutoConfig, AutoModelForCausalLM, BertConfig, BertModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

from actpatch import wrap_model
from actpatch.cli import main
from actpatch.errors import UnsupportedArchitectureError
from actpatch.experiment.selftest import FEATURES, load_checked, self_test
from actpatch.model.autoadapt import infer_architecture


class MysteryConfig(LlamaConfig):
    model_type = "actpatch_mystery"


class MysteryForCausalLM(LlamaForCausalLM):
    config_class = MysteryConfig


class MysteryNeoXConfig(GPTNeoXConfig):
    model_type = "actpatch_mystery_neox"


class MysteryNeoXForCausalLM(GPTNeoXForCausalLM):
    config_class = MysteryNeoXConfig


for _cfg, _cls in ((MysteryConfig, MysteryForCausalLM), (MysteryNeoXConfig, MysteryNeoXForCausalLM)):
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, _cls, exist_ok=True)

SMALL = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
             max_position_embeddings=64, vocab_size=300)


def _saved(tmp_path, name, model):
    """``model`` saved to a folder with no tokenizer (check-model then patches random token ids)."""
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def test_check_model_passes_a_known_family_without_a_tokenizer(tmp_path, capsys):
    folder = _saved(tmp_path, "llama", tiny_model("llama", vocab_size=300))
    assert main(["check-model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "| logits" in out and "FAIL" not in out.split("check-model:")[0]
    assert "adapter llama" in out and "17 passed, 0 failed, 0 unsupported" in out


def test_check_model_json_lists_every_feature(tmp_path, capsys):
    folder = _saved(tmp_path, "gpt2", tiny_model("gpt2", vocab_size=300))
    assert main(["check-model", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert [c["feature"] for c in report["checks"]] == list(FEATURES)
    assert all(c["status"] == "PASS" and c["max_diff"] <= c["tolerance"] for c in report["checks"])


def test_an_unknown_model_type_gets_an_automatic_adapter_that_passes(tmp_path, capsys, caplog):
    folder = _saved(tmp_path, "mystery", MysteryForCausalLM(MysteryConfig(num_key_value_heads=2, **SMALL)))
    assert main(["check-model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "adapter automatic" in out and "the automatic adapter passed" in out
    assert "Architecture(name='auto:actpatch_mystery'" in out and "blocks='model.layers'" in out
    # a run accepts it only after the self-test, says so in one line and records it in the model info it saves
    with caplog.at_level("WARNING", logger="actpatch"):
        lm = load_checked(str(folder), require_tokenizer=False)
    assert lm.info["adapter"].startswith("automatic (built from the module tree; self-test passed on 17")
    assert [r.getMessage() for r in caplog.records if "automatic adapter" in r.getMessage()] == [
        f"{lm.info['model_id']}: automatic adapter, built from the module tree; the self-test passed on 17 features"]


def test_a_wrong_automatic_fused_layout_is_caught(tmp_path, capsys):
    """GPT-NeoX's fused q/k/v is per head; the automatic adapter's [q | k | v] guess must fail qkv_layout."""
    folder = _saved(tmp_path, "neox", MysteryNeoXForCausalLM(MysteryNeoXConfig(**SMALL)))
    assert main(["check-model", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "qkv_layout | FAIL" in out.replace("  ", " ") or any(
        line.startswith("| qkv_layout") and "FAIL" in line for line in out.splitlines())
    assert "FAILED the self-test" in out
    with pytest.raises(UnsupportedArchitectureError, match="failed the self-test on .*qkv_layout"):
        load_checked(str(folder), require_tokenizer=False)


def test_the_same_model_with_its_entry_passes():
    """The layout check fails above because of the guessed layout, not the model: the real entry passes."""
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL))
    assert self_test(wrap_model(model, None)).passed


def test_the_automatic_adapter_names_what_it_did_not_find():
    model = MysteryForCausalLM(MysteryConfig(**SMALL))
    for block in model.model.layers:
        block.self_attn.renamed_out = block.self_attn.o_proj
        del block.self_attn.o_proj
    arch, missing = infer_architecture(model)
    assert arch is None and len(missing) == 1 and "output projection named one of o_proj" in missing[0]
    with pytest.raises(UnsupportedArchitectureError, match="not found: an attention module .* Architecture entry"):
        wrap_model(model, None, auto_adapter=True)
    with pytest.raises(UnsupportedArchitectureError, match="no adapter for model_type 'actpatch_mystery'.*check-model"):
        wrap_model(model, None)  # without auto_adapter: refused, pointing at check-model


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_encoder_decoder_and_non_causal_models_exit_2_in_one_line(kind, tmp_path, capsys):
    if kind == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                    num_heads=4))
        why = "encoder-decoder"
    else:
        model = BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64))
        why = "not a causal"
    folder = _saved(tmp_path, kind, model)
    capsys.readouterr()  # save_pretrained's own bar
    assert main(["check-model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1, err
    out = tmp_path / "run"
    assert main(["ioi", "--model", str(folder), "--n-pairs", "2", "--out", str(out), "--quiet"]) == 2
    assert why in capsys.readouterr().err
    assert not out.exists()  # nothing half-written


def test_check_model_refuses_a_missing_model(tmp_path, capsys):
    assert main(["check-model", str(tmp_path / "nowhere")]) == 2
    assert "actpatch: error:" in capsys.readouterr().err

"""Mutation test of the engine: break one line at a time and check that the tests (and the runtime checks they
run) catch it. Not collected by pytest; run it by hand after touching the engine:

    .venv/bin/python tests/mutants.py                 # every mutant, about 20-40 minutes on 2 cores
    .venv/bin/python tests/mutants.py head_shift eager  # only these

Each mutant is applied to a copy of the source tree (``src/`` and ``tests/`` in a temporary folder, put first
on PYTHONPATH), so the working tree is never touched. A mutant is *caught* when the test run fails. The
script exits 1 if any mutant survives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_patternsite.py", "tests/test_patterns.py", "tests/test_continuations.py", "tests/test_families.py", "tests/test_check_model.py", "tests/test_set_metrics.py", "tests/test_trust.py", "tests/test_checks.py", "tests/test_engine.py", "tests/test_contrast.py", "tests/test_noise.py", "tests/test_edges.py", "tests/test_circuits.py", "tests/test_run.py",
         "tests/test_attribution.py", "tests/test_scale.py", "tests/test_analysis.py",
         "tests/test_experiment.py", "tests/test_ioi.py"]

# name: (file under src/actpatch, the exact text, its replacement, what the bug is)
MUTANTS = {
    "noise_readout_clean": ("engine/continuation.py",
                            'noise = noise_hook(lm, batch, torch.arange(len(batch)).repeat_interleave(n)) if side == "donor" else None',
                            "noise = None", "a noised donor's multi-token baseline read from the clean prompt"),
    "noise_rows_mixed": ("engine/continuation.py", "torch.arange(len(batch)).repeat_interleave(n)",
                         "torch.arange(len(batch)).repeat(n)", "a continuation row noised with another pair's noise"),
    "cont_target_shift": ("engine/continuation.py", "targets = conts[:, :, 1:].reshape(", "targets = conts[:, :, :-1].reshape(",
                          "each continuation position scored against its own input token (off by one)"),
    "cont_gate_open": ("engine/continuation.py", "gate.open = False  # continuation", "gate.open = True  # continuation",
                       "the patch hooks left on for the continuation rows"),
    "cont_reduce_swapped": ("engine/metrics.py", '    if reduce == "mean":\n        lp = lp /', '    if reduce == "sum":\n        lp = lp /',
                            "--answer-reduce sum and mean swapped"),
    "cont_kv_order": ("engine/continuation.py", "tcache.update(keys.repeat_interleave(self.n, 0), values.repeat_interleave(self.n, 0), L)",
                      "tcache.update(keys.repeat(self.n, 1, 1, 1), values.repeat(self.n, 1, 1, 1), L)",
                      "continuation rows read another pair's patched prompt (rows tiled, not interleaved)"),
    "logsumexp_last_block": ("model/adapters.py", "for v in range(0, w.shape[0], vocab):",
                             "for v in range(0, w.shape[0] - vocab, vocab):",
                             "the normalizer of a target's log-prob misses the last block of the vocabulary"),
    "pattern_transposed": ("engine/patternsite.py", 'z = torch.einsum("bhqk,bkhd->bqhd", Ad[L].cpu(), Vm)',
                           'z = torch.einsum("bhkq,bkhd->bqhd", Ad[L].cpu(), Vm)', "the donor's pattern written transposed"),
    "pattern_causal_dropped": ("engine/patternsite.py", 'lost = lost + torch.einsum("bhqk,bqk->bqh", Ad[L].cpu(), future)',
                               'lost = lost + 0 * torch.einsum("bhqk,bqk->bqh", Ad[L].cpu(), future)',
                               "a patched row may put weight on keys after its query (causal mask dropped)"),
    "pattern_row_shift": ("engine/patternsite.py", "out[b, nd - suf:nd] = torch.arange(nr - suf, nr)",
                          "out[b, nd - suf:nd] = torch.arange(nr - suf - 1, nr - 1)",
                          "rows and keys of pairs of different lengths mapped off by one"),
    "pattern_values_own": ("engine/patternsite.py", 'Vm = torch.einsum("bdr,bdhe->brhe", onto, Vd[L].cpu())',
                           'Vm = torch.einsum("bdr,brhe->brhe", onto, Vr[L].cpu())', "values patch reads the recipient's own values"),
    "edge_qkv_which": ("engine/edge_patching.py", "self.a.qkv_start(rec.input, rec.index)",
                       'self.a.qkv_start("q", rec.index)', "a receiving head's k and v written into its q slot"),
    "edge_diff_sign": ("engine/edge_patching.py", "self.diff[s] = self.donor[s].to(value.device, value.dtype) - value",
                       "self.diff[s] = value - self.donor[s].to(value.device, value.dtype)", "recipient - donor"),
    "edge_point_mlp": ("engine/edge_patching.py", "2 * rec.layer + (rec.input == \"mlp\")", "2 * rec.layer",
                       "an MLP's donor stream taken at its layer's attention input"),
    "edge_head_write": ("engine/edge_patching.py", "self._wrote(first + h, out[h])", "self._wrote(first + h, out[(h + 1) % H])",
                        "each head's write recorded under its neighbour's name"),
    "graph_parallel": ("engine/circuit_graph.py", 'r.input == "mlp" and not parallel', 'r.input == "mlp"',
                       "the graph lets a parallel-residual MLP read its own layer's attention"),
    "eap_no_interpolation": ("engine/eap_scores.py", "alphas = [None] if steps is None else [k / steps for k in range(steps, 0, -1)]",
                             "alphas = [None] * (steps or 1)", "EAP-IG takes every gradient at the recipient"),
    "eap_records_interpolated": ("engine/eap_scores.py", "[k / steps for k in range(steps, 0, -1)]",
                                 "[k / steps for k in range(1, steps + 1)]",
                                 "EAP-IG records donor - recipient in its first, interpolated, run"),
    "eap_reach": ("engine/eap_scores.py", "reach = [int(r.nonzero().max()) + 1", "reach = [int(r.nonzero().max())",
                  "each receiver's last sender gets no score"),
    "eap_last_step_only": ("engine/eap_scores.py", "fill(total[lo:hi], add=not first)", "fill(total[lo:hi], add=False)",
                           "EAP-IG keeps only the last step's gradients"),
    "eap_last_chunk": ("engine/eap_scores.py", "    if rows:\n        _product(buf[:len(rows)].flatten(1), rows, diff, reach, scores)",
                       "    pass", "the receivers of the last score chunk get no scores"),
    "eap_record_sign": ("engine/edge_gradients.py", "torch.sub(self._donor_at(s, s + 1)[0], _positions(value.detach(), self.at), out=",
                        "torch.add(self._donor_at(s, s + 1)[0], _positions(value.detach(), self.at), out=",
                        "donor + recipient for non-head senders"),
    "eap_record_heads": ("engine/edge_gradients.py", "self.head_writes(layer, zh), out=self.written[first:first + H])",
                         "self.head_writes(layer, zh).roll(1, 0), out=self.written[first:first + H])",
                         "each head's recipient write under its neighbour"),
    "ig_grad_twice": ("engine/eap_scores.py", "        finish = fill(total[lo:hi], add=not first, heads=heads[lo:hi])\n",
                      "        finish = fill(total[lo:hi], add=not first, heads=heads[lo:hi])\n        if first:\n"
                      "            fill(total[lo:hi], add=True, heads=heads[lo:hi])\n",
                      "EAP-IG's first (alpha = 1) gradient accumulated once too often"),
    "ig_heads_add_ignored": ("engine/norm_vjp.py", "            if add:\n                gr_sum.addcmul_(",
                             "            if False:\n                gr_sum.addcmul_(",
                             "EAP-IG: a step's head gradients overwrite the sum instead of adding to it"),
    "fused_no_projection": ("engine/norm_vjp.py", "        out.addcmul_(x_hat.unsqueeze(0).to(out.dtype), inner.unsqueeze(-1).to(out.dtype), value=-1)\n"
                            "        if kind", "        if kind", "the heads' fused norm VJP without its projection term"),
    "ig_finish_layer_mean": ("engine/norm_vjp.py", "    if kind == \"layer\":  # minus r mean(a), summed over the steps\n",
                             "    if False:\n", "EAP-IG's deferred LayerNorm mean term dropped (GPT-2)"),
    "shared_prefix_plus_one": ("engine/eap_scores.py", ">= row_prefixes(part).unsqueeze(1))",
                               ">= row_prefixes(part).unsqueeze(1) + 1)", "one differing position too many left out"),
    "workspace_stale_total": ("engine/eap_scores.py", "finish = fill(total[lo:hi], add=not first",
                              "finish = fill(total[lo:hi], add=True", "EAP-IG's first step adds to the buffer's old contents"),
    "no_buffer_once": ("engine/eap_scores.py", "    buffered = accumulate and len(alphas) > 1\n",
                       "    buffered = accumulate and len(alphas) > 1\n    alphas = alphas if buffered else alphas[:1]\n",
                       "EAP-IG without its buffer scores only the first step"),
    "ig_finish_stale_rows": ("engine/edge_gradients.py", "lambda: finish(norm, folded()[0], heads, out, cache)",
                             "lambda: finish(norm, wg, heads, out, cache)",
                             "EAP-IG's finish reads the shared block of folded rows as the last layer left it"),
    "fused_no_gain": ("engine/norm_vjp.py", "out.copy_(w) if gain is None else torch.mul(w, gain, out=out)",
                      "out.copy_(w)", "the heads' fused norm VJP without the norm's gain"),
    "fused_layer_mean": ("engine/norm_vjp.py", "        if kind == \"layer\":  # minus r mean(a)\n", "        if False:\n",
                         "the fused LayerNorm VJP without its mean term (GPT-2)"),
    "ig_endpoints_inputs": ("engine/edge_gradients.py", "x = donor + self.alpha * (x - donor)",
                            "x = x + self.alpha * (donor - x)", "EAP-IG (inputs): the interpolation's endpoints swapped"),
    "ig_endpoints_activations": ("engine/edge_gradients.py", "return out + (1 - self.alpha) * (donor - out.detach())",
                                 "return out + self.alpha * (donor - out.detach())",
                                 "EAP-IG (activations): the interpolation's endpoints swapped"),
    "ig_act_gradient_scaled": ("engine/edge_gradients.py", "return out + (1 - self.alpha) * (donor - out.detach())",
                               "return donor + self.alpha * (out - donor)",
                               "EAP-IG (activations): the gradient through each mixed write scaled by alpha"),
    "mib_linear_grid": ("analysis/mib_scores.py", "MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)",
                        "MIB_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)",
                        "the log grid of edge fractions swapped for a linear one"),
    "cmd_signed": ("analysis/mib_scores.py", "(abs(1 - y0) + abs(1 - y1)) / 2", "((1 - y0) + (1 - y1)) / 2",
                   "CMD without the absolute value (a curve above 1 lowers it)"),
    "norm_kind_unchecked": ("engine/norm_vjp.py", '    for kind in ("rms", "rms1p", "layer"):',
                            '    return "rms"\n    for kind in ("rms", "rms1p", "layer"):',
                            "every norm taken for an RMSNorm without the check (GPT-2's LayerNorm, Gemma's 1 + w)"),
    "eap_positions": ("engine/edge_gradients.py", "keep.nonzero(as_tuple=True)", "keep.flip(1).nonzero(as_tuple=True)",
                      "gradients and differences taken at the padded end instead of the tokens"),
    "eap_norm_vjp": ("engine/edge_gradients.py", "got = vmap_pullback(norm, x)(target)",
                     "got = target", "a head's input gradient skips its norm (the vmap path, for norms with no closed form)"),
    "edge_shared_input": ("engine/edge_patching.py", "y = normed[which[i]] @ weight", "y = normed[min(i, len(reps) - 1)] @ weight",
                          "receivers with the same weights read another group's input"),
    "edge_base_dropped": ("engine/edge_patching.py", "        return self.read(self.base[layer], x) if layer in self.base else None\n",
                          "        return None\n",
                          "a layer's most common q/k/v input is never made: those receivers read the recipient"),
    "edge_own_unchanged": ("engine/edge_patching.py",
                           "xs = x.unsqueeze(0) if d is None else x.unsqueeze(0) + d  # (U, B, T, D)",
                           "if d is None:\n            return None\n        xs = x.unsqueeze(0) + d",
                           "heads that read the stream unchanged keep what the norm's patched input gave them"),
    "prune_no_reach": ("analysis/circuit_pruning.py", "            reached[feeds[r]] = True", "            pass",
                       "pruning forgets which nodes the input reaches"),
    "noise_prefix": ("engine/planning.py", "        same &= ~batch.noise_mask[:, :w]", "        pass",
                     "prefix reuse skips the noised donor tokens (they look shared: the same ids)"),
    "noise_dropped": ("engine/capture.py", '    noise = noise_hook(lm, batch) if side == "donor" else None',
                      "    noise = None", "the noised donor runs without its noise"),
    "head_shift": ("engine/patching.py", "view[j, :, : part.shape[1], cols] = part[:, :, cols]",
                   "view[j, :, : part.shape[1], (cols + 1) % view.shape[-1]] = part[:, :, cols]",
                   "wrong feature columns (all positions)"),
    "head_shift_pos": ("engine/sites.py", "return tuple(c for h in self.heads(adapter) for c in range(h * Dh, (h + 1) * Dh))",
                       "return tuple(c for h in self.heads(adapter) for c in range((h + 1) % adapter.n_heads * Dh, ((h + 1) % adapter.n_heads + 1) * Dh))",
                       "wrong head"),
    "donor_index": ("engine/patching.py", "value = src[rows, src_idx]  # (B, F)", "value = src[rows, dst_idx.to(act.device)]  # (B, F)",
                    "donor read at the recipient's index (pairs of different lengths)"),
    "donor_index_cols": ("engine/patching.py", "value = src[r, src_idx[:, None], c]  # (B, C)",
                         "value = src[r, dst_idx.to(act.device)[:, None], c]  # (B, C)",
                         "a head read from the donor at the recipient's index"),
    "shared_other_index": ("engine/planning.py", "first = torch.where((dst >= shared) | (src != dst), dst,",
                           "first = torch.where((dst >= shared), dst,",
                           "a write from another donor index inside the shared prefix skipped"),
    "donor_mask": ("engine/capture.py", "mask = batch.donor_attention_mask if side == \"donor\" else batch.attention_mask",
                   "mask = batch.attention_mask", "donors run with the recipient's mask"),
    "qkv_offset": ("model/adapters.py", "return ((0, H, H + KV)[idx] + head) * Dh  # (B, T, [H | KV | KV], Dh) flat",
                   "return (head * 3 + idx) * Dh", "GPT-2's fused q/k/v read as per-head"),
    "kl_direction": ("engine/metrics.py", "out[\"kl\"] = kl_from(recipient.to(logits.device), logits)",
                     "out[\"kl\"] = kl_from(logits, recipient.to(logits.device))", "KL measured the other way round"),
    "set_lse": ("engine/metrics.py", "return picked.masked_fill(~mask, float(\"-inf\")).logsumexp(dim=-1)",
                "return picked.masked_fill(~mask, float(\"-inf\")).amax(dim=-1)", "answer sets scored by their top token"),
    "start_late": ("engine/planning.py", "return (min(s.layer for s in variant), min(pos))",
                   "return (min(s.layer for s in variant), min(pos) + 1)", "off-by-one: replay starts one position late"),
    "shared_plus_one": ("engine/planning.py", "torch.minimum(same.sum(dim=1), end)", "torch.minimum(same.sum(dim=1) + 1, end)",
                        "off-by-one: shared prefix one too long"),
    "offset": ("engine/patching.py", "dst_idx.to(act.device) - start", "dst_idx.to(act.device) - start + 1",
               "off-by-one: position offset inside a replay"),
    "end_readout": ("engine/capture.py", "hidden[rows, end.to(hidden.device)]", "hidden[rows, end.to(hidden.device) - 1]",
                    "off-by-one: END read-out"),
    "end_position": ("engine/batch.py", "rec_found.append({**rp, \"END\": len(rec) - 1})", "rec_found.append({**rp, \"END\": len(rec) - 2})",
                     "off-by-one: END position"),
    "negative_pos": ("engine/sites.py", "idx = torch.where(idx < 0, lengths + idx, idx)",
                     "idx = torch.where(idx < 0, lengths + idx - 1, idx)", "off-by-one: negative positions"),
    "live_dropped": ("engine/patching.py", "live = dst >= 0  # (B,)", "live = dst >= -10**6  # (B,)",
                     "shared-prefix rows written at position 0"),
    "donor_is_recipient": ("experiment/sweeps.py", "don_cache, don_logits = capture(lm, part.donor_ids,",
                           "don_cache, don_logits = capture(lm, part.recipient_ids,", "donor and recipient swapped (no-op donor)"),
    "attribution_sign": ("engine/attribution.py", "dz = donor[HeadSite(L)].to(z_rec[L].device).float() - split_heads(",
                         "dz = -donor[HeadSite(L)].to(z_rec[L].device).float() + split_heads(", "donor and recipient swapped (attribution)"),
    # (dropping the 2-D padding mask is no bug: with right padding a real token never attends to the padding
    # after it; dropping the replay's causal mask is one)
    "mask_dropped": ("engine/prefix.py", "            rest, kwargs = self._prepare(self.calls[L], copies, pos, cache)\n",
                     "            rest, kwargs = self._prepare(self.calls[L], copies, pos, cache)\n"
                     "            kwargs = {k: None if k == 'attention_mask' else v for k, v in kwargs.items()}\n",
                     "causal mask dropped in the suffix replay"),
    "scale_not_frozen": ("analysis/heads.py", "            return c.float() * scale * gain\n",
                         "            return c.float() * (c.float().pow(2).mean(-1, keepdim=True) + eps).rsqrt() * gain\n",
                         "norm scale not frozen (RMSNorm)"),
    "ln_scale_not_frozen": ("analysis/heads.py", "return (c.float() - c.float().mean(-1, keepdim=True)) * scale * gain",
                            "return (c.float() - c.float().mean(-1, keepdim=True)) * (c.float().var(-1, unbiased=False, keepdim=True) + eps).rsqrt() * gain",
                            "norm scale not frozen (LayerNorm)"),
    "post_norm_dropped": ("model/adapters.py", "return None if self.arch.attn_post_norm is None else",
                          "return None if True else", "post-attention norm ignored"),
    "eager_not_forced": ("model/models.py", '    if current == "eager":\n        return "eager"',
                         '    if True:\n        return "eager"', "SDPA models not switched to eager"),
    "group_division": ("engine/attribution.py", "return torch.stack(heads) / n_total, torch.stack(hidden) / n_total",
                       "return torch.stack(heads) / len(batch), torch.stack(hidden) / len(batch)",
                       "attribution group divided by its own size"),
    "attribution_shift": ("engine/attribution.py", "heads.append((dz * grad_z.float()).sum(-1).permute(2, 0, 1).cpu())",
                          "heads.append((dz * grad_z.float()).sum(-1).roll(1, 1).permute(2, 0, 1).cpu())",
                          "attribution per position shifted by one"),
    "hash_order": ("tasks/ioi.py", "    names = single_token_names(tokenizer)\n", "    names = tuple(set(single_token_names(tokenizer)))\n",
                   "name order depends on PYTHONHASHSEED"),
    "path_sender_dropped": ("engine/paths.py", "            dst[:, :, hs] = src[:, :, hs]", "            dst[:, :, hs] = dst[:, :, hs]",
                            "path patching senders not written"),
    "donor_shape_unchecked": ("engine/patching.py", "    if tuple(src.shape[:2]) != want:", "    if False:",
                              "donor cache of another width accepted"),
    "qk_before_norm": ("model/architectures.py",
                       'name="olmo2", model_types=("olmo2",), **_LLAMA, qkv=("self_attn.q_norm", "self_attn.k_norm",',
                       'name="olmo2", model_types=("olmo2",), **_LLAMA, qkv=("self_attn.q_proj", "self_attn.k_proj",',
                       "OLMo 2 q/k written before q_norm"),
    "pool_unweighted": ("experiment/pooling.py", "        return sum(w * p for w, p in zip(weights, parts)) / total\n    if isinstance(first, dict):",
                        "        return sum(parts) / len(parts)\n    if isinstance(first, dict):",
                        "chunks of pairs pooled without their sizes"),
    "trim_short": ("engine/batch.py", "width = int(self.attention_mask.sum(dim=1).max())",
                   "width = int(self.attention_mask.sum(dim=1).max()) - 1", "a chunk trimmed one token short"),
    "logit_cap_ignored": ("engine/planning.py", "(row_cap is None or rows <= row_cap))", "True)",
                          "rows of full-vocabulary logits not capped (memory, not numbers)"),
    "split_vs_chosen": ("experiment/circuit_checks.py", 'jaccard(circuits[f"{k} half A"], circuits[f"{k} half B"])',
                        'jaccard(circuits[f"{k} half A"], keep)', "the halves' Jaccard taken against the chosen circuit"),
    "template_halves_shared": ("experiment/circuit_checks.py", "min(halves, key=len).extend(by[t])",
                               "[min(halves, key=len).append(i) for i in by[t]]",
                               "a template's pairs dealt out one by one, so both halves share it"),
    "stability_size_by_n": ("experiment/circuit_discovery.py", 'if cfg.select == "top" and n:', "if False:",
                            "stability's circuits chosen by the top-N count before pruning, not by edges"),
    "top_with_bisect": ("analysis/circuit_pruning.py", "            lo = mid + 1", "            lo = mid + 2",
                        "the bisection skips sizes: a circuit larger than needed"),
    # issue 26: the architecture entries and the adapter's layouts, scales and flags
    "qkv_blocks_k_offset": ("model/adapters.py", "return ((0, H, H + KV)[idx] + head) * Dh  #",
                            "return ((0, H + 1, H + KV)[idx] + head) * Dh  #",
                            "a fused [q | k | v] split with k one head late (Phi-3, Falcon multi-query, GPT-BigCode)"),
    "qkv_grouped_k_offset": ("model/adapters.py", "return (head * (G + 2) + G + idx - 1) * Dh",
                             "return (head * (G + 2) + G + idx - 2) * Dh",
                             "Falcon's grouped layout read with k one head early (its group's last query)"),
    "cohere_logit_scale": ("model/architectures.py", "logit_scale=lambda c: float(c.logit_scale),", "",
                           "Cohere's logit_scale dropped from its entry"),
    "granite_logits_scaling": ("model/architectures.py", "logit_scale=lambda c: 1.0 / c.logits_scaling,", "",
                               "Granite's logits_scaling dropped from its entry"),
    "logit_scale_ignored": ("model/adapters.py", "        if self.logit_scale != 1.0:\n            logits = logits * self.logit_scale\n",
                            "", "unembed ignores every entry's logit scale"),
    "granite_multiplier": ("model/architectures.py", "resid_scale=lambda c: float(c.residual_multiplier),", "",
                           "Granite's residual multiplier dropped from its entry"),
    "parallel_ignored": ("model/adapters.py", "return bool(self.arch.parallel)", "return False",
                         "the parallel-residual flag ignored (GPT-J, Phi-2, Cohere, Falcon, StableLM parallel)"),
    "falcon_parallel": ("model/architectures.py", "return bool(c.new_decoder_architecture or c.parallel_attn)",
                        "return bool(c.parallel_attn)", "Falcon's new decoder architecture read as sequential"),
    "causal_probe": ("model/adapters.py", "    if d > 1e-6 * max(1.0, float(a.abs().max())):", "    if False:",
                     "a bidirectional model passes as causal"),
}


FIRST = {"model/adapters.py": ["tests/test_families.py", "tests/test_check_model.py"],
         "engine/patternsite.py": ["tests/test_patternsite.py"],
         "model/architectures.py": ["tests/test_families.py", "tests/test_check_model.py"],
         "engine/edge_patching.py": ["tests/test_edges.py", "tests/test_circuits.py"], "engine/eap_scores.py": ["tests/test_edges.py"],
         "engine/edge_gradients.py": ["tests/test_edges.py"],
         "engine/norm_vjp.py": ["tests/test_edges.py"], "analysis/mib_scores.py": ["tests/test_circuits.py"],
         "engine/circuit_graph.py": ["tests/test_edges.py"], "analysis/circuit_pruning.py": ["tests/test_circuits.py"],
         "experiment/circuit_checks.py": ["tests/test_circuits.py"], "experiment/circuit_discovery.py": ["tests/test_circuits.py"]}


def _ordered(path: str) -> list[str]:
    """Every test file, those closest to the mutated module first (-x stops at the first failure)."""
    first = FIRST.get(path, [])
    return first + [t for t in TESTS if t not in first]


def run(name: str, timeout: int = 1800) -> tuple[bool, float, str]:
    """(caught, seconds, last lines of the test output) for one mutant."""
    path, old, new, _ = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        for part in ("src", "tests"):
            shutil.copytree(ROOT / part, Path(tmp) / part, ignore=shutil.ignore_patterns("__pycache__"))
        for part in ("README.md", "pyproject.toml"):
            shutil.copy(ROOT / part, Path(tmp) / part)
        target = Path(tmp) / "src" / "actpatch" / path
        text = target.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {name}: expected the text once in {path}, found it {text.count(old)} times")
        target.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src")}
        start = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *_ordered(path)],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            caught, out = proc.returncode != 0, proc.stdout
        except subprocess.TimeoutExpired:
            caught, out = True, "timed out"
        return caught, time.time() - start, "\n".join(out.strip().splitlines()[-3:])


def main(names: list[str]) -> int:
    survived = []
    for name in names or list(MUTANTS):
        caught, secs, tail = run(name)
        print(f"{'caught  ' if caught else 'SURVIVED'} {name:22s} {secs:6.0f} s  {MUTANTS[name][3]}", flush=True)
        if caught:
            print("         " + tail.splitlines()[-1] if tail else "", flush=True)
        else:
            survived.append(name)
    print(f"{len(names or MUTANTS) - len(survived)} caught, {len(survived)} survived" + (f": {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Mutation check: each claim the docs make must have a test that fails when the claim breaks.

For each named mutation below: copy this checkout's ``src/`` to a temporary folder, apply a
textual patch to it (every anchor must occur exactly once, or the script stops: the code
drifted and the mutation must be rewritten), run the relevant tests against the copy
(``PYTHONPATH`` first, so the tests and any subprocess they start import the mutated
package) and report ``killed`` (a test failed) or ``survived``. A baseline run of the same
tests on an unmodified copy comes first: a mutation only counts as killed if the tests
pass without it.

    .venv/bin/python tests/mutations.py              # all mutations
    .venv/bin/python tests/mutations.py kl-direction # some of them
    .venv/bin/python tests/mutations.py --list

Exit status 0 when every mutation is killed; 1 when one survives; 2 on drift or a broken
baseline. Not a pytest module (no ``test_`` prefix): it runs pytest itself, a few minutes.

Not covered: removing an fsync is invisible to ``kill -9`` (written pages survive the
process in the page cache; only a power loss shows it), so the checkpoint mutation removes
the temporary folder and the rename, which a real kill does show.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Patch:
    file: str  # relative to src/quantmoe
    anchor: str
    replacement: str


@dataclass(frozen=True)
class Mutation:
    name: str
    claim: str
    patches: tuple[Patch, ...]
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "stage-sees-fp",
        "each stage sees the already quantized earlier stages (quantized linears enter the block only "
        "for its final pass)",
        (Patch("quant/pipeline.py",
               "    staged[name] = qlinear\n    model.set_submodule(name, qlinear.dense(weight))\n",
               "    staged[name] = qlinear\n"),
         Patch("quant/pipeline.py",
               "        with replay.stage(len(STAGES)):\n",
               "        for name, qlinear in staged.items():\n"
               "            model.set_submodule(name, qlinear.dense())\n"
               "        with replay.stage(len(STAGES)):\n")),
        ("tests/quant/test_pipeline_reference.py",),
    ),
    Mutation(
        "next-block-fp",
        "the quantized block is re-run so the next block sees quantized inputs (here: the next block is "
        "calibrated on the full-precision outputs)",
        (Patch("quant/pipeline.py",
               "        staged: dict[str, QuantLinear] = {}",
               "        fp_outputs = _run_block(block, inputs)\n        staged: dict[str, QuantLinear] = {}"),
         Patch("quant/pipeline.py", "zip(outputs, carried, layer_inputs[block_info.index + 1])",
               "zip(fp_outputs, carried, layer_inputs[block_info.index + 1])")),
        ("tests/quant/test_pipeline_reference.py",),
    ),
    Mutation(
        "block-0-mask-everywhere",
        "every block runs with its own keyword inputs (GPT-OSS: sliding-window and full attention masks "
        "alternate); here every block gets block 0's",
        (Patch("quant/pipeline.py", "zip(outputs, carried, layer_inputs[block_info.index + 1])",
               "zip(outputs, carried, inputs)"),),
        ("tests/quant/test_pipeline_reference.py",),
    ),
    Mutation(
        "weighted-w-not-sqrt",
        "weighted mode: H = 2/n X^T diag(w) X (rows scaled by sqrt(w); here by w)",
        (Patch("calib/hessian.py", "x = x * weights.float().sqrt().unsqueeze(-1)",
               "x = x * weights.float().unsqueeze(-1)"),),
        ("tests/calib/test_hessian.py",),
    ),
    Mutation(
        "kl-direction",
        "evaluate reports KL(reference || model), not KL(model || reference)",
        (Patch("eval/metrics.py", "kl_divergence(ref, lp)", "kl_divergence(lp, ref)"),),
        ("tests/eval/test_metrics.py",),
    ),
    Mutation(
        "untie-on-load",
        "a tied lm_head stays tied after save and reload (here: an equal but separate copy)",
        (Patch("quant/checkpoint.py", "        model.tie_weights()\n",
               "        model.get_output_embeddings().weight = torch.nn.Parameter(\n"
               "            model.get_input_embeddings().weight.detach().clone())\n"),),
        ("tests/quant/test_checkpoint.py",),
    ),
    Mutation(
        "half-written-row",
        "a run's row appears in one transaction with all its metrics (here: the row first, the metrics "
        "in a second transaction)",
        (Patch("bench/store.py",
               "        with self._transaction() as db:\n"
               "            cur = db.execute(f\"INSERT OR IGNORE INTO runs ({', '.join(_COLUMNS)}) \"\n"
               "                             f\"VALUES ({', '.join('?' * len(_COLUMNS))})\", values)\n"
               "            pause_for_test(PAUSE_POINT)\n"
               "            db.execute(\"DELETE FROM failures WHERE key = ?\", (record.key,))\n"
               "            return cur.rowcount == 1\n",
               "        metrics = values[_COLUMNS.index('metrics')]\n"
               "        empty = ['{}' if c == 'metrics' else v for c, v in zip(_COLUMNS, values)]\n"
               "        with self._transaction() as db:\n"
               "            cur = db.execute(f\"INSERT OR IGNORE INTO runs ({', '.join(_COLUMNS)}) \"\n"
               "                             f\"VALUES ({', '.join('?' * len(_COLUMNS))})\", empty)\n"
               "        pause_for_test(PAUSE_POINT)\n"
               "        with self._transaction() as db:\n"
               "            db.execute('UPDATE runs SET metrics = ? WHERE key = ?', (metrics, record.key))\n"
               "            db.execute(\"DELETE FROM failures WHERE key = ?\", (record.key,))\n"
               "        return cur.rowcount == 1\n"),),
        ("tests/bench/test_runner.py::test_kill_9_inside_the_row_transaction_leaves_no_partial_row",),
    ),
    Mutation(
        "save-in-place",
        "a checkpoint save is atomic (here: written straight into the path, no temporary folder, no rename)",
        (Patch("quant/checkpoint.py",
               "    tmp = Path(tempfile.mkdtemp(prefix=f\".{out_dir.name}.{owner_tag()}-\", suffix=\".partial\", "
               "dir=out_dir.parent))\n",
               "    tmp = out_dir\n    tmp.mkdir(exist_ok=True)\n"),
         Patch("quant/checkpoint.py",
               "        if out_dir.exists():  # an earlier checkpoint (check_folder_output allowed it) or an empty folder\n"
               "            old = out_dir.with_name(f\".{out_dir.name}.old-{owner_tag()}\")\n"
               "            os.replace(out_dir, old)\n"
               "            _fsync_dir(out_dir.parent)\n"
               "            pause_for_test(\"save-between-renames\")\n"
               "        os.replace(tmp, out_dir)\n",
               "")),
        ("tests/quant/test_checkpoint_kill.py",),
    ),
    Mutation(
        "refine-takes-any-scale",
        "refinement never raises the layer loss (here: a group's new scale is taken even where it raises it)",
        (Patch("quant/gptq.py", "            better = (curv > 0) & (0.5 * d * d * curv - d * slope < 0)\n",
               "            better = curv > 0\n"),),
        ("tests/quant/test_refine.py::test_a_scale_step_that_rounding_makes_worse_is_not_taken",
         "tests/quant/test_refine.py::test_more_sweeps_never_raise_the_loss"),
    ),
    Mutation(
        "refine-unstorable-scales",
        "refined scales are storable, so the GPTQ export is exact (here: not rounded to float16/bfloat16)",
        (Patch("quant/gptq.py", "new = scale_in_dtype(round_scale(old + slope / curv.clamp_min(1e-30)), dtype)",
               "new = old + slope / curv.clamp_min(1e-30)"),),
        ("tests/quant/test_refine.py", "tests/export/test_gptq_format.py"),
    ),
    Mutation(
        "refine-touches-fallbacks",
        "an expert that fell back to RTN is not refined (here: every expert is)",
        (Patch("quant/gptq.py", "        idx = (~failed).nonzero().flatten()\n",
               "        idx = torch.arange(E, device=W.device)\n"),),
        ("tests/quant/test_refine.py::test_an_expert_without_tokens_stays_round_to_nearest",),
    ),
    Mutation(
        "tune-keeps-any-scales",
        "block tuning never raises a block's output loss (here: the tuned scales are kept even where it rises)",
        (Patch("quant/blocktune.py", "kept = after is not None and after < before",
               "kept = after is not None"),),
        ("tests/quant/test_blocktune.py::test_a_tuning_that_does_not_lower_the_loss_is_dropped",),
    ),
    Mutation(
        "tune-unstorable-scales",
        "tuned scales are storable (here: not rounded to float16), so the checkpoint computes what was tuned",
        (Patch("quant/blocktune.py", "scale_in_dtype(round_scale(m.scale().detach()), m.dtype)",
               "m.scale().detach()"),),
        ("tests/quant/test_blocktune.py::test_tuning_lowers_the_output_loss_and_keeps_codes_and_zero_points",),
    ),
    Mutation(
        "tune-targets-from-quantized-inputs",
        "block tuning's targets are the full-precision model's outputs (here: the fp block on the quantized inputs)",
        (Patch("quant/pipeline.py", "            references = targets\n", "            pass\n"),),
        ("tests/quant/test_blocktune.py::test_targets_are_the_full_precision_models_own_hidden_states",),
    ),
    Mutation(
        "stream-eval-keeps-blocks",
        "streaming evaluation holds one block's weights at a time (here: each block stays loaded)",
        (Patch("eval/stream.py", "        del block\n        lazy.release_block(i)\n", "        del block\n"),),
        ("tests/eval/test_stream_eval.py::test_full_precision_stream_equals_whole_model",),
    ),
    Mutation(
        "stream-eval-keeps-embedding",
        "streaming evaluation releases the embedding before the blocks run (here: it stays loaded)",
        (Patch("eval/stream.py",
               "    layer_inputs = capture_layer_inputs(model, blocks, windows, batch_size, device)\n"
               "    lazy.release_outside()\n",
               "    layer_inputs = capture_layer_inputs(model, blocks, windows, batch_size, device)\n"),),
        ("tests/eval/test_stream_eval.py::test_full_precision_stream_equals_whole_model",),
    ),
    Mutation(
        "stream-eval-hidden-bf16",
        "streamed perplexity and KL equal the whole model's (here: hidden states rounded to bfloat16 between "
        "blocks)",
        (Patch("eval/stream.py", "                             carries, carried)[0].to(host)\n",
               "                             carries, carried)[0].to(host, torch.bfloat16).float()\n"),),
        ("tests/eval/test_stream_eval.py::test_full_precision_stream_equals_whole_model",
         "tests/eval/test_stream_eval.py::test_quantized_checkpoint_stream_equals_whole_model"),
    ),
    Mutation(
        "hessian-triangle-unmirrored",
        "wide inputs accumulate the upper block triangle of x^T x and GPTQ reads it mirrored, exactly symmetric "
        "(here: not mirrored)",
        (Patch("calib/hessian.py", "            xtx += xtx.triu(1).T\n", ""),),
        ("tests/calib/test_hessian.py::test_wide_inputs_accumulate_the_upper_triangle_and_mirror_it",),
    ),
    Mutation(
        "malloc-no-top-pad",
        "the quantmoe command sets one malloc arena and a 64 MB top pad (here: the top pad is not set)",
        (Patch("allocator.py", "mallopt(M_ARENA_MAX, ARENAS) == 1 and mallopt(M_TOP_PAD, TOP_PAD_BYTES) == 1",
               "mallopt(M_ARENA_MAX, ARENAS) == 1"),),
        ("tests/test_allocator.py",),
    ),
    Mutation(
        "dotted-mixer-linears",
        "a mixer's linear inside a submodule (KDA's forget_gate.f_proj) is staged by its own name (here: by the "
        "whole dotted path)",
        (Patch("quant/stages.py", '    name = kind.rpartition(".")[2]\n', "    name = kind\n"),),
        ("tests/anatomy/test_families.py::test_quantize_mixed_plan_and_reload[bailing_hybrid]",
         "tests/anatomy/test_families.py::test_quantize_mixed_plan_and_reload[kimi_linear]"),
    ),
    Mutation(
        "expert-stats-one-group",
        "a stage calibrates its routed experts in groups whose statistics fit in --expert-stats-mb (here: every "
        "expert in one group, whatever the budget)",
        (Patch("quant/stages.py", "        if used and used + size > budget:\n", "        if False:\n"),),
        ("tests/quant/test_pipeline.py::test_experts_calibrated_in_groups_give_the_same_model",),
    ),
    Mutation(
        "memory-need-ignores-groups",
        "--max-memory's estimate counts one group's expert statistics (here: every expert's)",
        (Patch("quant/stream.py", "        for group in stat_groups(units, calib, gptq):\n",
               "        for group in [units]:\n"),),
        ("tests/quant/test_stream.py::test_memory_guard_refuses_with_the_number_it_needs",),
    ),
    Mutation(
        "lazy-block-borrows-the-shard",
        "a streamed block's weights own their memory, so its safetensors shard is unmapped once read (here: the "
        "weights safetensors read without a copy are kept)",
        (Patch("quant/lazy.py", "            if t is None or t.is_meta or t.untyped_storage().resizable():\n",
               "            if True:\n"),),
        ("tests/quant/test_stream.py::test_a_loaded_block_owns_its_memory_and_unmaps_the_shard",),
    ),
    Mutation(
        "attention-tail-always-kept",
        "--recompute-attention keeps no o_proj inputs (here: they are kept whatever the setting)",
        (Patch("quant/pipeline.py", "        tail = last[0] if gptq.attention_tail and len(last) == 1",
               "        tail = last[0] if len(last) == 1"),),
        ("tests/quant/test_pipeline.py::test_recomputing_the_attention_instead_of_keeping_o_proj_inputs_gives_the_same_model",),
    ),
    Mutation(
        "experts-read-all-at-once",
        "a block's experts are read a group of experts at a time (here: all of them in one group)",
        (Patch("quant/expert_load.py", "    step = max(1, int(group_bytes // max(per_expert, 1.0)))",
               "    step = reads.num_experts"),),
        ("tests/quant/test_expert_load.py::test_experts_are_read_a_group_at_a_time",),
    ),
    Mutation(
        "stream-loads-experts-fused",
        "the streamed quantization reads experts straight into the per-expert view (here: fused, then unfused)",
        (Patch("quant/stream.py", "self.lazy.load_block(index, per_expert=True)", "self.lazy.load_block(index)"),),
        ("tests/quant/test_stream.py::test_lazy_loading_gives_the_in_memory_checkpoint_with_one_block_in_memory",),
    ),
    Mutation(
        "expert-read-skips-the-view-order",
        "per-expert keys are read in expert order (here: in the order the files list them, 10 before 2)",
        (Patch("quant/expert_load.py", "        ordered = {p: tuple(sorted(ks, key=_natural)) for p, ks in lists.items()}",
               "        ordered = {p: tuple(sorted(ks)) for p, ks in lists.items()}"),),
        ("tests/quant/test_expert_load.py::test_experts_are_read_a_group_at_a_time",),
    ),
    Mutation(
        "fp8-scales-ignored",
        "FP8 checkpoints are dequantized as they are read (here: their fp8 values are taken as the weights)",
        (Patch("quant/lazy.py", "        if key not in self.scales:\n            return part",
               "        if True:\n            return part"),),
        ("tests/quant/test_fp8.py::test_streamed_reading_dequantizes_fp8_weights",),
    ),
    Mutation(
        "fp8-tile-from-the-scale-grid",
        "FP8 tiles are weight_block_size, the edge ones partial (here: derived from the scale grid, as transformers does)",
        (Patch("quant/fp8.py", "    scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]",
               "    scale = scale.repeat_interleave(rows // scale.shape[-2], dim=-2)[..., :rows, :]"),),
        ("tests/quant/test_fp8.py::test_dequantize_fp8_partial_edge_tiles",),
    ),
    Mutation(
        "whole-model-fp8-partial-tiles-pass",
        "an FP8 folder whose tiles do not divide a weight is refused without --stream (here: loaded by transformers)",
        (Patch("models.py", "                if key + \"_scale_inv\" in names and (shape[-2] % block[0] or shape[-1] % block[1]):",
               "                if False:"),),
        ("tests/quant/test_fp8.py::test_whole_model_loading_refuses_fp8_tiles_transformers_misreads",),
    ),
    Mutation(
        "fp8-dequantized-eagerly",
        "an FP8 weight becomes floats only when the loader reads it (here: as soon as its slice is handed over)",
        (Patch("quant/fp8.py", "        self.weight, self.scale_inv, self.block = weight, scale_inv, block  # safetensors slices",
               "        self.weight, self.scale_inv, self.block = weight, scale_inv, block\n"
               "        self.value = dequantize_fp8(weight[...], scale_inv[...], block)"),),
        ("tests/quant/test_fp8.py::test_an_fp8_weight_is_dequantized_only_when_read",),
    ),
    Mutation(
        "mxfp4-nibbles-swapped",
        "MXFP4 experts dequantize as transformers' own conversion does (here: high nibble first)",
        (Patch("quant/mxfp4.py", "    values[..., 0::2] = lut[(blocks & 0x0F).long()]\n    values[..., 1::2] = lut[(blocks >> 4).long()]",
               "    values[..., 1::2] = lut[(blocks & 0x0F).long()]\n    values[..., 0::2] = lut[(blocks >> 4).long()]"),),
        ("tests/quant/test_mxfp4.py::test_dequantization_equals_transformers_bit_for_bit",),
    ),
    Mutation(
        "mxfp4-reads-every-expert",
        "the streamed reader dequantizes only the MXFP4 experts of the group it reads (here: all, then cut)",
        (Patch("quant/mxfp4.py", "        if isinstance(first, slice) and first.step in (None, 1):",
               "        if False:"),),
        ("tests/quant/test_mxfp4.py::test_a_slice_reads_only_the_experts_it_selects",),
    ),
    Mutation(
        "mxfp4-whole-load-packed",
        "without --stream load_model asks transformers for MXFP4 experts as floats (here: it does not ask)",
        (Patch("models.py", '        extra["quantization_config"] = Mxfp4Config(dequantize=True)', "        pass"),),
        ("tests/quant/test_mxfp4.py::test_whole_model_loading_dequantizes_mxfp4_experts",),
    ),
    Mutation(
        "attention-replay-kept",
        "--no-attention-replay keeps none of the attention's outputs (here: they are kept whatever the setting)",
        (Patch("quant/pipeline.py", "    if module is not None and gptq.attention_replay:", "    if module is not None:"),),
        ("tests/quant/test_pipeline.py::test_recomputing_the_attention_instead_of_keeping_o_proj_inputs_gives_the_same_model",),
    ),
    Mutation(
        "kernel-caches-unbounded",
        "the command caps oneDNN's and ideep's kernel caches (here: the caps are computed but never set)",
        (Patch("allocator.py", "    environ.update(applied)\n", ""),),
        ("tests/test_allocator.py::test_kernel_caches_are_capped_unless_the_user_set_them",
         "tests/test_allocator.py::test_bounded_kernel_caches_keep_less_memory_on_bfloat16_expert_calls"),
    ),
    Mutation(
        "heap-kept-between-blocks",
        "the streamed quantization and evaluation trim the heap after each block (here: neither does)",
        (Patch("quant/stream.py", "        release_free_memory()  # the next block", "        pass  # the next block"),
         Patch("eval/stream.py", "        release_free_memory()  # the heap's", "        pass  # the heap's")),
        ("tests/quant/test_stream.py::test_the_heap_is_trimmed_after_each_block_before_the_next_is_read",
         "tests/eval/test_stream_eval.py::test_the_heap_is_trimmed_after_each_block_before_the_next_is_read"),
    ),
    Mutation(
        "multimodal-saves-under-outer-names",
        "a text model read out of a multimodal checkpoint saves under its own names (here: transformers' "
        "renames from the multimodal names stay on the model and are reversed on save)",
        (Patch("models.py", "        model.__dict__.pop(\"_weight_conversions\", None)", "        pass"),),
        ("tests/test_multimodal.py::test_the_text_model_is_read_out_of_the_multimodal_checkpoint_and_quantized",),
    ),
    Mutation(
        "multimodal-key-mapping-dropped",
        "Gemma 4's text keys are renamed out of `model.language_model.` (here: the rename is not applied)",
        (Patch("multimodal.py",
               "    return dict(entry.key_mapping) if entry is not None and entry.key_mapping else None",
               "    return None"),),
        ("tests/test_multimodal.py::test_the_text_model_is_read_out_of_the_multimodal_checkpoint_and_quantized",),
    ),
    Mutation(
        "multimodal-tying-ignored",
        "the outer config's word-embedding tying governs the text model (here: the text config's own is kept)",
        (Patch("multimodal.py", "        text.tie_word_embeddings = config.tie_word_embeddings", "        pass"),),
        ("tests/test_multimodal.py::test_text_config_carries_the_checkpoints_dtype_and_tying",
         "tests/test_multimodal.py::test_the_text_model_is_read_out_of_the_multimodal_checkpoint_and_quantized"),
    ),
    Mutation(
        "text-only-not-asked",
        "quantize asks for --text-only before writing a checkpoint without the vision tower (here: it never asks)",
        (Patch("quant/cli.py", "    if not text_only:\n        raise ValueError(f\"{model} is a multimodal",
               "    if False:\n        raise ValueError(f\"{model} is a multimodal"),),
        ("tests/test_multimodal.py::test_quantize_asks_for_text_only_before_writing_a_checkpoint_without_the_tower",),
    ),
    Mutation(
        "malloc-trim-not-called",
        "release_free_memory hands free heap pages back with malloc_trim(0) (here: it only looks the function up)",
        (Patch("allocator.py", "    return bool(trim(0)) if trim is not None else False", "    return trim is not None"),),
        ("tests/test_allocator.py::test_free_pages_inside_a_fragmented_heap_go_back_to_the_kernel",
         "tests/test_allocator.py::test_release_free_memory_calls_malloc_trim_zero"),
    ),
    Mutation(
        "carry-not-handed-on",
        "the driver hands what a block returns beside its hidden states to the next block (FamilySpec.carries; "
        "here: the next block gets None)",
        (Patch("quant/pipeline.py", "            inputs = [with_carried(family.carries, args, kwargs, out, handed)\n",
               "            inputs = [with_carried(family.carries, args, kwargs, out, (None,) * len(handed))\n"),),
        ("tests/anatomy/test_families.py::test_quantize_mixed_plan_and_reload[glm_moe_dsa]",
         "tests/quant/test_stream.py::test_lazy_loading_gives_the_in_memory_checkpoint_with_one_block_in_memory[zaya]"),
    ),
    Mutation(
        "carry-not-spilled",
        "a resumed run reads what the last finished block handed on beside its hidden states (here: None)",
        (Patch("quant/stream.py", "        if self.first_block == 0 or not count:\n            return None\n",
               "        return None\n"),),
        ("tests/quant/test_stream.py::test_resume_hands_on_what_the_last_finished_block_carried",),
    ),
    Mutation(
        "eval-stream-drops-carry",
        "streamed evaluation hands what a block returns beside its hidden states to the next block (here: None)",
        (Patch("eval/stream.py", "        handed = [_moved(c, host) for c in carried]\n",
               "        handed = [(None,) * len(c) for c in carried]\n"),),
        ("tests/eval/test_stream_eval.py::test_full_precision_stream_equals_whole_model[glm_moe_dsa]",
         "tests/eval/test_stream_eval.py::test_full_precision_stream_equals_whole_model[zaya]"),
    ),
    Mutation(
        "capture-without-outside-tensors",
        "block 0's inputs are computed with every tensor outside the blocks but the LM head (here: the embedding "
        "alone, so ZAYA's input scale is missing)",
        (Patch("quant/stream.py", "self.lazy.release_outside(only=(family_of(model).lm_head,))",
               "self.lazy.release_outside(keep=(family_of(model).embedding,))"),
         Patch("eval/stream.py", "lazy.release_outside(only=(lazy.family.lm_head,))",
               "lazy.release_outside(keep=(lazy.family.embedding,))")),
        ("tests/quant/test_stream.py::test_lazy_loading_gives_the_in_memory_checkpoint_with_one_block_in_memory[zaya]",
         "tests/eval/test_stream_eval.py::test_full_precision_stream_equals_whole_model[zaya]"),
    ),
    Mutation(
        "weight-0-choice-routed",
        "a choice with router weight 0 is no token of its expert (ZAYA's skip class; here: it is)",
        (Patch("anatomy/expert_view.py", "        if top_k_weights is not None:\n            flat = flat.masked_fill(",
               "        if False:\n            flat = flat.masked_fill("),),
        ("tests/anatomy/test_expert_view.py::test_a_choice_with_router_weight_0_is_no_token_of_its_expert",
         "tests/calib/test_hessian.py::test_tokens_routed_with_weight_0_are_not_calibration_data_of_the_expert"),
    ),
    Mutation(
        "hessian-calibrates-weight-0-choices",
        "calibration leaves out the tokens routed to an expert with weight 0 (here: the collector counts them)",
        (Patch("calib/hessian.py", "            routes = module.routes(top_k_index, top_k_weights)",
               "            routes = module.routes(top_k_index)"),),
        ("tests/calib/test_hessian.py::test_tokens_routed_with_weight_0_are_not_calibration_data_of_the_expert",),
    ),
    Mutation(
        "routing-counts-weight-0-choices",
        "collect_routing does not count a choice with router weight 0 (here: it does)",
        (Patch("calib/routing.py", "            top_i, top_w = top_i[chosen], top_w[chosen]\n", ""),),
        ("tests/anatomy/test_expert_view.py::test_a_choice_with_router_weight_0_is_no_token_of_its_expert",),
    ),
    Mutation(
        "clamped-glu-unclamped",
        "Hunyuan-V4's and DeepSeek-V4's experts clamp gate and up before the activation; the per-expert view "
        "computes the same (here: it does not clamp)",
        (Patch("anatomy/expert_view.py",
               "    return act_fn(gate.clamp(min=None, max=limit)) * up.clamp(min=-limit, max=limit)",
               "    return act_fn(gate) * up"),),
        ("tests/anatomy/test_families.py::test_per_expert_view_round_trip[hy_v4]",
         "tests/anatomy/test_families.py::test_per_expert_view_round_trip[deepseek_v4]"),
    ),
    Mutation(
        "residual-streams-not-counted",
        "--max-memory's estimate counts every residual stream the blocks pass (hyper-connections; here: one)",
        (Patch("quant/stream.py", "    streams = family.residual_streams(model.config)", "    streams = 1"),),
        ("tests/quant/test_stream.py::test_the_memory_estimate_counts_the_hidden_states_blocks_really_pass",),
    ),
    Mutation(
        "full-precision-paths-unchecked",
        "describe checks that every full_precision / outside_full_precision path of the spec exists (here: no)",
        (Patch("anatomy/describe.py", "    _check_full_precision(model, spec, num_blocks)\n", ""),),
        ("tests/anatomy/test_describe.py::test_a_full_precision_path_the_model_lacks_is_named",),
    ),
    Mutation(
        "undeclared-full-precision-linear",
        "every nn.Linear of a family is a unit or a declared full-precision part (here: Qwen4-Exp's per-layer "
        "embeddings are not declared)",
        (Patch("anatomy/families.py", 'full_precision=("ple", "attn_hyper_connection", "mlp_hyper_connection")',
               'full_precision=("attn_hyper_connection", "mlp_hyper_connection")'),),
        ("tests/anatomy/test_families.py::test_inspect_roles[qwen4_exp_text]",),
    ),
)


class DriftError(RuntimeError):
    pass


def apply(src: Path, mutation: Mutation) -> None:
    for patch in mutation.patches:
        path = src / "quantmoe" / patch.file
        text = path.read_text(encoding="utf-8")
        count = text.count(patch.anchor)
        if count != 1:
            raise DriftError(f"{mutation.name}: the anchor occurs {count} times in src/quantmoe/{patch.file} "
                             f"(expected once); the code changed, rewrite this mutation:\n{patch.anchor}")
        path.write_text(text.replace(patch.anchor, patch.replacement), encoding="utf-8")


def run_tests(src: Path, tests: tuple[str, ...], cache: Path) -> tuple[int, list[str], str]:
    """(pytest's exit code, failed test ids, output tail) of ``tests`` against the package in ``src``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "QUANTMOE_CACHE": str(cache)}
    check = f"import quantmoe, sys; sys.exit(0 if quantmoe.__file__.startswith({str(src)!r}) else 1)"
    if subprocess.run([sys.executable, "-c", check], env=env, cwd=ROOT).returncode != 0:
        raise RuntimeError(f"`import quantmoe` does not resolve to the copy in {src}: check PYTHONPATH")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rf", *tests],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    failed = [line.removeprefix("FAILED ") for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    return proc.returncode, failed, (proc.stdout + proc.stderr)[-3000:]


def fresh_copy(work: Path, name: str) -> Path:
    src = work / name / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / name / "embedded").symlink_to(ROOT / "embedded")  # found beside the source tree, as in a clone
    return src


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on an unmodified copy")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:24} {m.claim}\n{'':24} tests: {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    chosen = [known[n] for n in args.names] if args.names else list(MUTATIONS)
    with tempfile.TemporaryDirectory(prefix="quantmoe-mutations-") as tmp:
        work = Path(tmp)
        try:  # every anchor first: drift is reported before minutes of tests
            for m in chosen:
                apply(fresh_copy(work, f"check-{m.name}"), m)
        except DriftError as err:
            print(f"DRIFT: {err}", file=sys.stderr)
            return 2
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            t0 = time.perf_counter()
            code, failed, tail = run_tests(fresh_copy(work, "baseline"), tests, work / "cache-baseline")
            print(f"{'baseline':24} {'pass' if code == 0 else 'FAIL':9} {time.perf_counter() - t0:6.1f} s", flush=True)
            if code != 0:
                print(f"the tests fail without any mutation ({', '.join(failed) or 'see below'}):\n{tail}",
                      file=sys.stderr)
                return 2
        survived = errors = 0
        for m in chosen:
            src = fresh_copy(work, m.name)
            apply(src, m)
            t0 = time.perf_counter()
            code, failed, tail = run_tests(src, m.tests, work / f"cache-{m.name}")
            verdict = {0: "SURVIVED", 1: "killed"}.get(code, "ERROR")
            survived += code == 0
            errors += code not in (0, 1)
            detail = f"by {failed[0][:150]}" if failed else ("" if code == 0 else tail.strip().splitlines()[-1])
            print(f"{m.name:24} {verdict:9} {time.perf_counter() - t0:6.1f} s  {detail}", flush=True)
            if code not in (0, 1):
                print(tail, file=sys.stderr)
    print(f"{len(chosen) - survived - errors} of {len(chosen)} mutations killed"
          + (f", {survived} survived" if survived else "") + (f", {errors} errors" if errors else ""))
    return 1 if survived else (2 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())

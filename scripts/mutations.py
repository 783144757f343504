"""The mutation list for scripts/mutation_check.py: small realistic bugs and the tests that must catch them.

Each mutation replaces one exact snippet (``old``, which must occur exactly once in ``path``) by
``new``. ``tests`` are pytest arguments (node ids, ``-k``) naming the few fastest tests that should
fail. ``equivalent`` is set only for a mutant that cannot be caught because it does not change
behaviour; it says why. ``pending`` names a test that does not exist yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutation:
    id: str
    area: str
    what: str
    path: str
    old: str
    new: str
    tests: list[str] = field(default_factory=list)
    audit: bool = False  # one of the 9 bugs planted by the issue-15 audit
    equivalent: str = ""  # why this mutant cannot be told apart (it then may survive)
    pending: str = ""  # the test meant to catch it does not exist yet



def guard_off(id: str, area: str, what: str, path: str, guard: str, tests: list[str]) -> Mutation:
    """A check that never fires: the ``if``/``elif`` line ``guard`` becomes ``if False:`` (same
    indentation), the commonest way a refusal is lost."""
    indent = guard[: len(guard) - len(guard.lstrip())]
    return Mutation(id, area, what, path, guard, f"{indent}{guard.split()[0]} False:", tests)

WS = "tests/test_world_size_invariance.py::test_two_ranks_match_one_rank"
TRAINER_GRADS = "tests/test_trainer.py::test_every_trainable_parameter_gets_gradient_at_s_above_one"

MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ the audit's nine
    Mutation(
        "triton-softmax-rescale", "kernels", "online softmax: running sum not rescaled on a new maximum",
        "kernels/triton_decoupling.py",
        "l = l * tl.exp(m - m_new) + tl.sum(", "l = l + tl.sum(",
        ["tests/test_triton_decoupling.py", "-k", "later_tile"], audit=True,
    ),
    Mutation(
        "resume-lr-scheduler", "checkpointing", "LR-scheduler state not restored on resume",
        "sst_dist/train/checkpoint.py",
        "load_optimizer_states=True, load_lr_scheduler_states=True",
        "load_optimizer_states=True, load_lr_scheduler_states=False",
        ["tests/test_resume.py::test_crash_then_resume_across_a_steplr_decay"], audit=True,
    ),
    Mutation(
        "label-seed-is-train-seed", "loaders", "loader uses the training seed as the partial-label seed",
        "data_shards/loaders/__init__.py",
        "open_shard_set(shard_dir, split, proportion, label_seed,",
        "open_shard_set(shard_dir, split, proportion, seed,",
        ["tests/test_label_seed.py"], audit=True,
    ),
    Mutation(
        "grad-allreduce-disabled", "distributed", "DeepSpeed's gradient all-reduce switched off",
        "sst_dist/train/trainer.py",
        "        self.model = self.engine.module\n",
        "        self.model = self.engine.module\n        self.engine.enable_backward_allreduce = False\n",
        [WS], audit=True,
    ),
    Mutation(
        "bce-negative-term-dropped", "losses", "partial BCE drops the known-negative term",
        "sst_dist/losses.py",
        "+ torch.where(\n        neg, Fn.softplus(x), torch.zeros_like(x)\n    )",
        "+ torch.where(\n        neg, Fn.softplus(x) * 0.0, torch.zeros_like(x)\n    )",
        ["tests/test_losses.py", "-k", "partial_bce"], audit=True,
    ),
    Mutation(
        "margin-off-by-one", "pseudo labels", "margin schedule decays one epoch early",
        "sst_dist/pseudo.py",
        "for _ in range(max(0, epoch - self.warmup_epochs)):",
        "for _ in range(max(0, epoch - self.warmup_epochs + 1)):",
        ["tests/test_pseudo.py", "-k", "margin"], audit=True,
    ),
    Mutation(
        "bank-fifo-reversed", "bank", "bank FIFO pushes a batch's positives in reverse order",
        "kernels/torch_similarity.py",
        "rank = torch.cumsum(pos.long(), dim=1) - pos.long()",
        "rank = pos.long().sum(dim=1, keepdim=True) - torch.cumsum(pos.long(), dim=1)",
        ["tests/test_bank.py", "-k", "update"], audit=True,
    ),
    Mutation(
        "ap-not-monotone", "metrics", "AP uses raw precision, not made monotone from the right",
        "sst_dist/metrics.py",
        "best = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]",
        "best = precision",
        ["tests/test_metrics.py", "-k", "ap_hand_worked or slow_loops"], audit=True,
    ),
    Mutation(
        "pair-order-column-major", "losses", "pair targets laid out column-major (tril) instead of row-major",
        "sst_dist/losses.py",
        '    """t (B,P) = [y_i = +1][y_j = +1] over pairs i<j in row-major order (unknown counts as 0)."""\n'
        "    C = labels.shape[1]\n    i, j = torch.triu_indices(C, C, 1, device=labels.device)",
        '    """t (B,P) = [y_i = +1][y_j = +1] over pairs i<j in row-major order (unknown counts as 0)."""\n'
        "    C = labels.shape[1]\n    i, j = torch.tril_indices(C, C, -1, device=labels.device)",
        ["tests/test_losses.py", "-k", "cooc_hand_worked or cooc_vs_literal"], audit=True,
    ),
    # ------------------------------------------------------------------ ten more
    Mutation(
        "world-scale-dropped", "distributed", "loss not multiplied by world size (DeepSpeed averages)",
        "sst_dist/train/state.py",
        "dict(zip(rows, dens))) * D.world_size()\n", "dict(zip(rows, dens)))\n",
        [WS],
    ),
    Mutation(
        "contrastive-sign-swapped", "losses", "contrastive: positive pairs pay 1+cos, negatives 1-cos",
        "sst_dist/losses.py",
        "term = torch.where(pp, 1.0 - cos, 1.0 + cos)", "term = torch.where(pp, 1.0 + cos, 1.0 - cos)",
        ["tests/test_losses_contrastive.py", "-k", "contrastive_hand_worked"],
    ),
    Mutation(
        "asl-clip-dropped", "losses", "co-occurrence ASL ignores the probability shift (clip)",
        "sst_dist/losses.py",
        "pn = (torch.sigmoid(-x) + clip).clamp(max=1.0) if clip and clip > 0 else torch.sigmoid(-x)",
        "pn = torch.sigmoid(-x)",
        ["tests/test_losses.py", "-k", "cooc_hand_worked"],
    ),
    Mutation(
        "intra-overwrites-negatives", "pseudo labels", "intra pseudo labels may flip known negatives",
        "sst_dist/pseudo.py",
        "torch.where((labels == 0) & (s >= margin)", "torch.where((labels != 1) & (s >= margin)",
        ["tests/test_pseudo.py", "-k", "hand_worked or never_negative"],
    ),
    Mutation(
        "intra-not-normalized", "pseudo labels", "intra score summed, not averaged over known positives",
        "sst_dist/pseudo.py",
        "    return s / pos.sum(dim=1, keepdim=True).clamp_min(1.0)\n", "    return s\n",
        ["tests/test_pseudo.py", "-k", "hand_worked or slow_loop"],
    ),
    Mutation(
        "bank-slots-not-normalized", "bank", "bank similarity averages raw slots, not unit rows",
        "kernels/torch_similarity.py",
        "proto = normalize_rows(bank.to(dt)).mean(dim=1)", "proto = bank.to(dt).mean(dim=1)",
        ["tests/test_bank.py", "-k", "pseudo_labels_hand_worked or reference_vs_fused"],
    ),
    Mutation(
        "triton-dscore-no-rowsum", "kernels", "attention backward forgets the softmax row-sum term",
        "kernels/triton_decoupling.py",
        "p * (dp - rs[:, None]), mask=msk)", "p * dp, mask=msk)",
        ["tests/test_triton_decoupling.py", "-k", "matches_reference_float32 and primes"],
    ),
    Mutation(
        "bank-threshold-strict", "bank", "bank pseudo labels need sim > margin instead of >=",
        "kernels/torch_similarity.py",
        "completed = torch.where((labels == 0) & (sim >= margin), torch.ones_like(labels), labels)\n"
        "    return sim, completed",
        "completed = torch.where((labels == 0) & (sim > margin), torch.ones_like(labels), labels)\n"
        "    return sim, completed",
        ["tests/test_bank.py", "-k", "pseudo_labels"],
    ),
    Mutation(
        "checkpoint-bank-not-saved", "checkpointing", "SST state saves an empty bank",
        "sst_dist/train/state.py",
        '"bank": {k: v.detach().cpu().clone() for k, v in self.bank.state_dict().items()},',
        '"bank": {k: torch.zeros_like(v).cpu() for k, v in self.bank.state_dict().items()},',
        ["tests/test_zero_stages.py::test_zero_stage_checkpoint_evaluates_like_training[1]"],
    ),
    Mutation(
        "loader-ranks-overlap", "loaders", "train plan: rank shares overlap (all read rank 0's slice)",
        "data_shards/loaders/common.py",
        "        return list(steps[:, rank])\n",
        "        return list(steps[:, 0])\n",
        ["tests/test_loaders.py::test_backends_same_samples_disjoint_complete[2]"],
    ),
    Mutation(
        "op-uses-ground-truth", "metrics", "overall precision divides by ground-truth count",
        "sst_dist/metrics.py",
        "op = nc.sum() / np_.sum()", "op = nc.sum() / ng.sum()",
        ["tests/test_metrics.py", "-k", "prf_hand_worked or slow_loops"],
    ),
    Mutation(
        "embeddings-detached", "model", "label embeddings cut from the graph (no gradient reaches them)",
        "sst_dist/model/decoupling.py",
        "        V = self.fc2(embeddings)  # (C,D)\n",
        "        V = self.fc2(embeddings.detach())  # (C,D)\n",
        [TRAINER_GRADS],
    ),
    Mutation(
        "clip-zero-means-default", "distributed", "clip_grad=0 leaves DeepSpeed's default clipping (1.0) on",
        "sst_dist/train/engine_setup.py",
        '    ds["gradient_clipping"] = float(t.clip_grad)\n',
        '    if t.clip_grad > 0:\n        ds["gradient_clipping"] = t.clip_grad\n',
        ["tests/test_grad_clipping.py"],
    ),
    Mutation(
        "bn-stats-per-rank", "distributed", "training BNs use each rank's own batch statistics",
        "sst_dist/train/distributed.py",
        "        stats = all_reduce_sum_grad(stats)\n", "",
        [WS, "-k", "train"],
    ),
    Mutation(
        "inter-weights-ignored", "losses", "pseudo.inter_weight=similarity computed but not applied",
        "sst_dist/losses.py",
        "terms[name] = partial_bce(logits, lab, (pseudo_weights or {}).get(name))",
        "terms[name] = partial_bce(logits, lab)",
        ["tests/test_pseudo_calibrated.py", "-k", "similarity"],
    ),
    Mutation(
        "ci-skips-silently", "test harness", "conftest no longer turns CI skips into failures",
        "tests/conftest.py",
        "    if not (report.skipped and _in_ci()) or \"gpu\" in item.keywords:",
        "    if True:",
        ["tests/test_ci_skips.py"],
    ),
    Mutation(
        "gpu-checks-pack-at-end", "device checks", "gpu_checks.sh packs its results only after the last step",
        "benchmarks/gpu_checks.sh",
        '  "run_${name//-/_}"\n  pack\ndone\n', '  "run_${name//-/_}"\ndone\npack\n',
        ["tests/test_gpu_checks_script.py", "-k", "killed"],
    ),
    Mutation(
        "gpu-checks-budget-ignored", "device checks", "gpu_checks.sh lets a step run past the budget",
        "benchmarks/gpu_checks.sh",
        "  ((limit > left)) && limit=$left\n", "",
        ["tests/test_gpu_checks_script.py", "-k", "killed"],
    ),
    # ------------------------------------------------------------------ users' work (2026-12-06 audit)
    guard_off(
        "fresh-run-over-stopped-run", "run directory",
        "a fresh train replaces the config/metrics of a run stopped before its first checkpoint",
        "sst_dist/train/rundir.py",
        "    if not resuming and not overwrite and earlier:",
        ["tests/test_run_safety.py", "-k", "claim"],
    ),
    guard_off(
        "resume-missing-run-starts-fresh", "run directory",
        "--resume into a run directory that does not exist trains from scratch",
        "sst_dist/train/trainer.py",
        "                elif resume and not self.run_dir.exists():",
        ["tests/test_run_safety.py", "-k", "does_not_exist"],
    ),
    guard_off(
        "profile-replaces-profile", "outputs", "a second profile into one --out replaces the first",
        "sst_dist/profile.py",
        "        if earlier and not args.overwrite:",
        ["tests/test_profile_errors.py", "-k", "earlier"],
    ),
    guard_off(
        "eval-replaces-result", "outputs", "eval replaces an earlier result of the same name",
        "sst_dist/train/evaluate_cli.py",
        '    if (out / f"ap_{tag}.json").exists() and not args.overwrite:',
        ["tests/test_cli_polish.py", "-k", "earlier_result"],
    ),
    guard_off(
        "results-publish-replaces", "outputs", "a benchmark's final write replaces a file made meanwhile",
        "data_shards/safe_io.py",
        "        if exclusive and _link_no_clobber(tmp, path):",
        ["tests/test_bench_outputs.py", "tests/test_convert.py", "-k", "taken_during or meanwhile"],
    ),
    Mutation(
        "study-resumes-foreign-run", "outputs", "the accuracy study continues a run started otherwise",
        "benchmarks/accuracy.py",
        "    if record.is_file() and json.loads(record.read_text()) == planned:", "    if run_dir.exists():",
        ["tests/test_accuracy_study.py", "-k", "started_otherwise"],
    ),
    guard_off(
        "training-generates-over-data", "outputs", "training's synthetic step writes into a used data.root",
        "sst_dist/train/data.py",
        "    if any(p not in leftovers for p in root.iterdir()):",
        ["tests/test_synthetic_safety.py", "-k", "cannot_trust"],
    ),
    Mutation(
        "split-written-twice", "outputs", "two conversions may write one shard split at once",
        "data_shards/writer.py",
        "        self._lock.acquire()  # before _previous, which removes this split's temporaries\n",
        "        pass\n",
        ["tests/test_writer.py", "-k", "second_writer"],
    ),
    Mutation(
        "sigterm-leaves-temporaries", "outputs", "a conversion stopped by SIGTERM does not roll back",
        "data_shards/cli.py",
        "        main = threading.current_thread() is threading.main_thread()\n",
        "        main = False\n",
        ["tests/test_synthetic_safety.py", "-k", "rolls_back"],
    ),
]

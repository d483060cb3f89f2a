"""The workflow's run matrix and its DAG-build-time validation (used by the Snakefile): :mod:`.runs` (runs
and per-run configs, HuBERT's label chain), :mod:`.validate` (DAG-build-time checks), :mod:`.jobs` (the
rules' launch commands and run dirs).

The workflow config (``config/config.yaml`` laid over ``d2v2/presets/<preset>.yaml``, shape checked by
``workflow/schemas/config.schema.yaml``) names modalities, methods per modality, seeds, one matched
budget per modality, the checkpoint fractions, the fine-tuning task per modality and ablations. This
package turns it into runs and per-run configs, and validates every one of them with the engine's own
models (:func:`d2v2.engine.runconfig.resolve_run_config`, :func:`d2v2.engine.ftconfig.finetune_config`)
before Snakemake schedules anything: a bad key, an impossible value or a missing data path fails the
whole workflow at DAG-build time with a message that names the key.

Ablations: ``ablations: {image: {data2vec2: {num_masks: [1, 2, 4], decoder.depth: [1, 3]}}}`` adds
variant runs next to each method's ``default`` run. ``ablation_mode: one_at_a_time`` (default; the
paper's ablations, METHOD.md#paper-results) varies one field at a time (variants ``num_masks=1``, ``num_masks=2``,
..., ``decoder.depth=3``); ``grid`` runs every combination (``decoder.depth=1,num_masks=2``). A field is a
method field, or with the prefix ``pretrain.`` a field of the pretraining run config (``pretrain.optim.lr``;
not those the run matrix sets, :data:`.runs.MATRIX_KEYS`). Paths
hold modality/method/variant/seed, so variants never share outputs, and each run's Snakemake params
hold only that run's own config: editing an ablation list adds or removes only the affected jobs.

Budget sweeps (the paper's protocol, PROTOCOL.md#protocols): ``budget_sweep: {image: [0.125, 0.25, 0.5, 1.0]}``
adds, for every run of the modality, a separate run per listed fraction ``s < 1`` of the modality's budget,
with every schedule fitted to its own budget ``s x budget`` and only its final checkpoint kept and
fine-tuned (``.../seed0-budget0.250``); the full-budget run (``.../seed0``) is the sweep's point at 1.0 and
still gives the anytime points (its checkpoints at ``checkpoint_fractions``).
"""
from d2v2.workflow.jobs import *          # noqa: F401,F403  the Snakefile's helpers, one namespace
from d2v2.workflow.runs import *          # noqa: F401,F403
from d2v2.workflow.validate import *      # noqa: F401,F403

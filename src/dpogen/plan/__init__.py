"""The memory plan: what each run's training stages hold per GPU, and the SLURM resources they ask for.

Pure arithmetic on the model's ``config.json`` dict (no torch, no transformers, no weights), so that it runs
while Snakemake parses the workflow. It models the engine's wrapping exactly for parameters, gradients and
optimizer state, and estimates the rest:

- ``dpo.parallel: fsdp`` (the default) with ``dpo.processes`` > 1: ``fully_shard`` on each decoder layer
  (``model.model.layers[i]``, ``model.transformer.h[i]`` for gpt2), then on the root, which holds the
  embeddings, the final norm and the LM head (a tied head is one tensor). Every parameter is sharded on dim 0
  as ``torch.chunk(t, world, dim=0)``, padded with empty chunks: rank r holds chunk r's rows or none
  (``local_numel``). Parameters are kept in ``dpo.dtype`` (fp32 master weights); gradients are sharded
  like their parameter, in the same dtype; AdamW's exp_avg and exp_avg_sq likewise (sgd has no state).
  Frozen parameters (``last_layer``, ``lora``) are held but have no gradient or optimizer state.
- ``dpo.parallel: hsdp``: the same over the processes of one node (``shard_world``), each node a replica.
- ``dpo.parallel: ddp``, or a single process (nothing to shard): every rank holds the full parameters,
  gradients and optimizer state.

Terms per rank, in bytes (``GB`` = 1e9 bytes in what is printed):

- params, grads, optimizer: exact, as above (``.to_local()`` sizes; optimizer excludes AdamW's 0-dim step
  counters). FSDP2 pads each rank's storage to chunk 0's size, so rank 0, the largest, is also what every
  rank allocates for its parameters.
- working: FSDP: the largest decoder layer unsharded twice (the one computing and the one prefetched) plus
  the root's parameters, in the compute dtype (``MixedPrecisionPolicy(param_dtype=dpo.autocast)``, else
  ``dpo.dtype``). Without FSDP, under autocast to a narrower dtype: autocast's cached casts of every matrix
  (2-D parameter), held while the autocast region is open; otherwise nothing.
- activations (an estimate, checked against the tensors autograd saves in tests/test_plan.py), for T padded
  tokens per micro-batch per process and b bytes per element of the compute dtype. Per token, a norm keeps
  ``N = 4H + 2bH`` bytes (RMSNorm: its input upcast to fp32, the normalized and the scaled outputs; gpt2's
  LayerNorm ``2bH``) and one decoder layer
  ``A = 2N + b (2q + 2kv + m) + 4 heads`` bytes (H hidden size; q = heads x head_dim, kv = kv_heads x head_dim:
  queries, keys, values and the attention output; m = 4 x intermediate for gated MLPs (gate, up, act(gate),
  their product), 5 x intermediate for gpt2's gelu; 4 bytes per head for the attention's log-sum-exp; qwen3
  adds its q/k norms, ``4 (q + kv) + 2b (q + kv)``; eager attention adds its scores and probabilities,
  ``2b x heads x sequence length``). Training keeps ``T (L A + N)`` without gradient checkpointing (every
  layer's activations and the final norm's) and ``T (L b H + A + N)`` with it (each layer's input hidden
  state, plus one layer's full activations while it is recomputed). A forward pass without gradients keeps
  ``T (A + N)``. The last_layer regime trains on cached features: ``T x H x 4`` bytes.
- logits: at most ``dpo.logit_chunk`` positions (and no more than T) hold full-vocabulary fp32 logits at once:
  ``min(logit_chunk, T) x vocab x 4`` bytes, times 3 in training (logits, log-softmax, its gradient) and 2
  in a forward pass without gradients.
- total: params + grads + optimizer + working + the largest of (activations + logits) over the stage's
  passes (training micro-batches; the checkpoint passes over all pairs of the dpo stage).

Not modelled: the CUDA context and NCCL buffers (about 1 GB), the allocator's fragmentation, FSDP's
reduce-scatter buffers (one layer's gradient, unsharded, in the compute dtype and fp32).

The token budget T: ``dpo.max_tokens_per_batch`` (``dpo.eval_max_tokens_per_batch`` for checkpoint and
reference passes) when set, else rows per micro-batch per process x a sequence length: 2 rows per pair in
training (chosen and rejected; a pair of single-token answers shares one row, so 2 is an upper bound),
``dpo.eval_batch_size`` rows in a pass without gradients, one row per sequence in sft; the sequence length is
``data.max_prompt_tokens + data.max_response_tokens`` (+1 for EOS) when both are set, else the model's
``max_position_embeddings``, an upper bound.

Stages: ``sft`` (when ``sft.target`` is not none: trains every weight like dpo's full regime, with sft's
batch and optimizer, weights in ``model.dtype``, micro-batches bounded by ``dpo.max_tokens_per_batch``),
``ref_logps`` (forward only, weights in ``dpo.dtype``, or in ``dpo.autocast`` when sharded: it never steps an
optimizer) and ``dpo``. ``dpo.parallel: hsdp`` shards over the ``dpo.processes / resources.nodes``
processes of one node (replicated across nodes) where fsdp shards over all. Each stage asks for
``dpo.processes`` GPUs when ``dpo.device`` is cuda (0 otherwise, and 0 for a stage that does not run the
engine; over several nodes, ``dpo.processes / resources.nodes`` per node), ``threads.train`` CPUs, and host
memory per node (mem_mb): for each of the node's processes, nothing of the weights when it reads its shards
(dpogen.shards; on cpu, the rank's total) or a full copy of the checkpoint when it loads it whole (ddp, lora,
one process), plus 4 GiB per process and 2 GiB; sft adds one full copy on the first node, where the trained
weights are gathered to be saved.

    python -m dpogen.plan --configfile config/experiments/v5-full-llama3.1-8b.yaml [--configfile more.yaml] [--json]
"""

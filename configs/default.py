"""The main job: a small Llama trained from scratch by SFT, then DPO, on the synthetic task.

Needs no download and runs on a 2-core CPU in a few minutes. The synthetic task
(`dpo_jax.data.synthetic`): sort, reverse or copy 3-7 digits; the chosen answer is right, the
rejected one has one or two wrong digits. The SFT stage (NLL on the chosen responses) builds
π_ref, as the DPO paper does when no SFT model exists; the DPO stage then trains the policy
against it; a table compares held-out metrics before and after DPO.

Run (from the repository root):

    python scripts/train.py                                  # this config, ./runs/default
    python scripts/train.py --config=configs/default.py --workdir=/tmp/dpo_run
    python scripts/train.py --config=configs/default.py:tiny --workdir=/tmp/dpo_tiny
    python scripts/train.py --config.dpo.beta=0.3 --config.dpo.num_steps=200
    python scripts/train.py --config=configs/default.py:dpo_paper   # RMSprop, lr 1e-6, ...

Variants (`configs/default.py:<variant>`):
  tiny       seconds: a 1-layer model, a handful of steps (the smoke test).
  dpo_paper  the DPO paper's optimisation: RMSprop, lr 1e-6, 150 warmup steps, β 0.1, batch 64.
  precomputed_ref  reference log-probs computed in one pass before DPO, carried in the batch.
  tr_dpo     TR-DPO: the reference is pulled towards the policy every 16 steps (α = 0.6).
  packed     two pairs packed into each row (segment ids).
  kto        KTO (arXiv:2402.01306) instead of DPO: each pair becomes a desirable and an
             undesirable completion; β = 2 (docs/results.md, "KTO on the synthetic task").
  lora       the DPO stage trains rank-8 LoRA adapters on every layer's linear kernels over the
             SFT model (held once, the reference with adapters off), at 10x the learning rate.
"""

import ml_collections

VARIANTS = ("", "tiny", "dpo_paper", "precomputed_ref", "tr_dpo", "packed", "kto", "lora")

# Logical axis -> mesh axes. One entry per logical name the models use; a param with a name not
# listed here is an error. The batch is always split over ("data", "fsdp") on its first axis.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the stacked layers' leading axis (the decoder scans over it)
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default config, or one of VARIANTS (`arg`), locked against new keys.

    Raises:
      ValueError: an unknown variant.
    """
    config = ml_collections.ConfigDict()
    config.seed = 0  # PRNG seed of model init and of the training run's key (int)

    # Model
    config.model = ml_collections.ConfigDict()
    config.model.source = "random"  # "random" (init from the fields below), "hf", "gguf"
    config.model.hf_path = ""  # source="hf": a directory with config.json + *.safetensors
    config.model.gguf_path = ""  # source="gguf": a .gguf file ("" = the packaged Gemma 3 270M)
    # With LoRA, hold the base's Linear weights and embedding as GGUF blocks, dequantised per
    # layer where read (QLoRA; dpo_jax/models/quantize.py): a GGUF keeps its file's blocks, an
    # HF checkpoint is quantised to quantized_type on load; False = float weights.
    config.model.quantized = False  # QLoRA's base as GGUF blocks (see above); needs LoRA
    config.model.quantized_type = "Q4_0"  # source="hf": Q8_0, Q5_0 or Q4_0 (4.5 bits a weight)
    config.model.family = "llama"  # source="random": llama, mistral, qwen2, qwen3, gemma3_text
    config.model.vocab_size = 0  # embedding rows; 0 = the tokenizer's vocabulary size
    config.model.hidden_size = 96  # D, width of the residual stream
    config.model.intermediate_size = 256  # F, width of the gated MLP
    config.model.num_layers = 2  # decoder blocks
    config.model.num_heads = 4  # query heads
    config.model.num_kv_heads = 2  # key/value heads (num_heads % num_kv_heads == 0)
    config.model.head_dim = 24  # width of one attention head
    config.model.rope_theta = 10_000.0  # RoPE base
    config.model.tie_word_embeddings = False  # unembedding = embedding transposed
    config.model.dtype = "float32"  # compute dtype: float32, bfloat16
    config.model.param_dtype = "float32"  # storage dtype of params: float32, bfloat16
    config.model.remat = False  # recompute each layer's activations in the backward pass
    config.model.attention_impl = "xla"  # "xla" or "cudnn" (NVIDIA GPUs only)
    config.model.attention_block_size = 0  # mesh.sequence > 1: attention block; 0 = T / 2C
    config.model.logits_chunk_size = 0  # token rows per log-prob chunk; 0 = full [N, T, V] logits

    # Data
    config.data = ml_collections.ConfigDict()
    config.data.source = "synthetic"  # "synthetic", or a .jsonl / .parquet path of records
    config.data.eval_source = ""  # held-out records path; "" = synthetic eval split / none
    # A Hugging Face dataset as source or eval_source: "hf://<name>" (a Hub id, or anything
    # datasets.load_dataset takes) or a save_to_disk directory; or a prepared TFDS version
    # directory (dataset_info.json beside array_record shards, local or gs://); docs/data.md.
    config.data.split = "train"  # split of an HF or TFDS dataset source
    config.data.eval_split = "test"  # split of an HF or TFDS dataset eval_source
    # Dataset columns read as our fields, "prompt=question,chosen=good,rejected=bad"; "" = none
    config.data.columns = ""  # field=column pairs for HF dataset sources
    config.data.tokenizer = "synthetic"  # "synthetic" (word level), "model" (of hf_path), a dir
    config.data.num_train_pairs = 4096  # synthetic: pairs generated for training
    config.data.num_eval_pairs = 256  # synthetic: held-out pairs (prompts never in training)
    config.data.max_length = 18  # T, tokens per row (prompt + response); longer rows are cut
    config.data.max_prompt_length = 10  # most prompt tokens (bos included); 0 = no limit
    config.data.truncation_mode = "keep_end"  # long prompts keep their "keep_end" / "keep_start"
    # A pair over the limits: "truncate", "drop" (a prompt over max_prompt_length), or "error"
    # (any cut, prompt or response, stops the run naming the record and the lengths).
    config.data.prompt_too_long = "truncate"  # "truncate", "drop" or "error"
    # Where a response starts: "separate" (prompt and responses tokenised apart, joined as ids)
    # or "joint" (TRL's: prompt + response as one text, split at the common prefix); docs/data.md.
    config.data.boundary = "separate"  # "separate" or "joint"
    # A row whose tokens at the prompt/response boundary differ from its whole text's (extra bos,
    # doubled eos, a chat template whose prompt is not a prefix of the conversation;
    # docs/failures.md):
    config.data.on_boundary_problem = "error"  # "error" (name the record) or "skip" (counted)
    config.data.batch_size = 32  # B, rows per optimizer step (global, all hosts); % (data·fsdp)
    config.data.eval_batch_size = 64  # rows per eval batch; % (data·fsdp)
    config.data.pairs_per_row = 1  # S, pairs packed into one row (1 = no packing)
    config.data.shuffle_seed = 0  # seed of the data order (epochs reshuffle)
    # Refuse data whose sampled records are more than this fraction unknown tokens (a tokenizer
    # that does not fit the text); 1.0 = never refuse.
    config.data.max_unknown_token_rate = 0.05  # in [0, 1]

    # DPO (and the SFT stage that builds the reference model first)
    config.sft = ml_collections.ConfigDict()
    config.sft.num_steps = 400  # SFT optimizer steps before DPO; 0 = start DPO from the model
    config.sft.learning_rate = 3e-3  # peak learning rate of the SFT stage
    config.sft.warmup_steps = 20  # linear warmup steps of the SFT stage
    config.dpo = ml_collections.ConfigDict()
    config.dpo.num_steps = 200  # DPO optimizer steps
    config.dpo.loss_type = "sigmoid"  # a name in dpo_jax.losses.LOSS_VARIANTS, or "a,b" (sum)
    config.dpo.loss_weights = ""  # "w1,w2" for a list of losses; "" = all 1
    config.dpo.beta = 0.1  # β > 0, the KL-penalty strength
    config.dpo.label_smoothing = 0.0  # ε, assumed label-flip rate (cDPO, robust, exo_pair > 0)
    # How the loss reads the log-ratios: f'(π/π_ref) for sigmoid, hinge, ipo, robust, exo_pair,
    # discopop, sigmoid_norm (arXiv:2309.16240); the others need "reverse_kl".
    config.dpo.f_divergence_type = "reverse_kl"  # or forward_kl, js_divergence, alpha_divergence
    config.dpo.f_alpha_divergence_coef = 1.0  # α > 0 of alpha_divergence (1 = reverse_kl)
    # The settings where TRL 1.16 differs (docs/trl.md, "Differences from TRL 1.16"):
    config.dpo.sigmoid_label_smoothing = "cdpo"  # ε in sigmoid/sigmoid_norm: "cdpo"; TRL: "ignore"
    config.dpo.bco_reward_shift = "running_mean"  # bco_pair's δ₀: "running_mean"; TRL: "none"
    config.dpo.ipo_form = "per_token"  # ipo on "per_token" log-ratios (TRL's) or "summed" ones
    config.dpo.simpo_gamma = 0.5  # simpo's target reward margin γ (TRL's CPOConfig.simpo_gamma)
    # loss_type="kto": each pair becomes a desirable (chosen) and an undesirable (rejected) record
    config.dpo.kto_desirable_weight = 1.0  # KTO λ_D > 0, the weight of desirable completions
    config.dpo.kto_undesirable_weight = 1.0  # KTO λ_U > 0, the weight of undesirable ones
    # loss_type="unlikelihood": −log π(y_w) − α·Σ_t log(1 − π(y_l,t)), sums over tokens
    config.dpo.unlikelihood_alpha = 1.0  # α >= 0 on the rejected tokens' unlikelihood term
    # LD-DPO: the tokens past the shorter response of a pair count with weight α (1 = plain sums)
    config.dpo.ld_alpha = 1.0  # α in [0, 1]
    # WPO: each pair's loss times its responses' policy probabilities, aligned (arXiv:2406.11827)
    config.dpo.use_weighting = False  # bool; not with aot, aot_unpaired, kto
    # The reference (dpo_jax.reference): "frozen" (its forward in the step), "precomputed" (one
    # pass before DPO, then its params are freed), "cached" (precomputed, kept on disk by a
    # fingerprint of weights, tokenizer, data and settings), "moving" (TR-DPO), "none" (log π_ref
    # = 0).
    # Losses that read no reference (simpo, sft) always run with "none".
    # With LoRA (lora.rank > 0) the reference is the base with the adapters off: "adapters_off".
    config.dpo.reference = "frozen"  # frozen, precomputed, cached, moving, none, adapters_off
    config.dpo.ref_cache_dir = ""  # reference="cached": directory; "" = <workdir>/ref_logps_cache
    config.dpo.ref_sync_every = 0  # reference="moving": ref <- α·policy + (1−α)·ref every N steps
    config.dpo.ref_sync_alpha = 0.6  # reference="moving": TR-DPO α in [0, 1]

    # Reward model (dpo_jax.run.reward_model, scripts/train_reward_model.py): Bradley-Terry on the
    # DPO stage's pairs, a scalar head on the SFT model's last hidden state at each response's end
    config.reward_model = ml_collections.ConfigDict()
    config.reward_model.num_steps = 200  # optimizer steps of the reward model
    config.reward_model.learning_rate = 1e-3  # peak learning rate (AdamW as config.optimizer)
    config.reward_model.warmup_steps = 10  # linear warmup steps

    # PPO (dpo_jax.ppo_step, dpo_jax.run.ppo_train, scripts/train_ppo.py): the RLHF baseline of the
    # DPO paper, from the SFT model, on the prompts of config.data.source, with a per-token KL
    # penalty to π_ref. Its score is a reward model's (ppo.reward_model) or a true reward's
    # (ppo.true_reward, "PPO-GT"): exactly one of the two. Responses are sampled at temperature 1.
    config.ppo = ml_collections.ConfigDict()
    config.ppo.num_steps = 100  # PPO iterations; each samples one rollout batch, then learns
    config.ppo.reward_model = ""  # an export of scripts/train_reward_model.py (<workdir>/...)
    config.ppo.true_reward = ""  # or a reward in dpo_jax.evaluation.REWARD_FUNCTIONS
    config.ppo.rollout_batch_size = 64  # prompts per iteration (global); % (data·fsdp)
    config.ppo.num_minibatches = 2  # minibatches per epoch; must divide rollout_batch_size
    config.ppo.epochs = 4  # passes over each rollout batch (PPO's epochs)
    config.ppo.learning_rate = 1e-4  # peak rate of policy and value model (config.optimizer's)
    config.ppo.warmup_steps = 0  # linear warmup, in optimizer updates
    config.ppo.kl_coef = 0.1  # β >= 0 of the per-token KL penalty −β·(log π − log π_ref)
    # > 0: β adapts toward this KL (nats per sequence) by Ziegler et al.'s controller, β starting
    # at kl_coef; 0: β stays kl_coef.
    config.ppo.kl_target = 0.0  # KL_target >= 0 of the adaptive KL controller; 0 = fixed β
    config.ppo.kl_horizon = 10_000.0  # the controller's horizon H > 0, in sampled responses
    config.ppo.clip_range = 0.2  # ε > 0 of the clipped surrogate
    config.ppo.clip_range_value = 0.2  # ε_v > 0 of the clipped value loss
    config.ppo.value_coef = 0.1  # weight of the value loss (TRL's vf_coef)
    config.ppo.gamma = 1.0  # GAE's discount γ in [0, 1]
    config.ppo.lam = 0.95  # GAE's λ in [0, 1]
    config.ppo.whiten_rewards = False  # whiten per-token rewards over the batch before GAE
    config.ppo.max_new_tokens = 0  # tokens sampled per response; 0 = data.max_length − prompt

    # LoRA (dpo_jax.lora) in the DPO stage: the state trains low-rank adapters A [in, r],
    # B [r, out] on the matching linear kernels, W' = W + (alpha / r)·A·B; the base is held once
    # and is the reference. An SFT stage before it (sft.num_steps) trains the full model.
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 0  # r >= 1; 0 = full fine-tuning, no adapters
    config.lora.alpha = 16.0  # the adapters' delta is scaled by alpha / rank (PEFT's lora_alpha)
    # Comma-separated regexes searched in param paths like "layers/attn/q_kernel"; each must
    # match a linear kernel (q/k/v/o_kernel, gate/up/down_kernel, lm_head).
    config.lora.targets = "attn/[qkvo]_kernel,mlp/(gate|up|down)_kernel"  # every layer's
    config.lora.dropout = 0.0  # PEFT's lora_dropout on the adapters' input, in training only
    # The step's form: False = x·W + s·dropout(x)·A·B in each layer (no gradient the size of W);
    # True = the model run on W + s·A·B (the first release's form; takes no dropout).
    config.lora.merged = False  # the step on W + s·A·B (see above); False = unmerged layers

    # Optimizer (of the DPO stage; the SFT stage shares it but for its rate and warmup)
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # "adamw" or "rmsprop"
    config.optimizer.learning_rate = 1e-4  # peak learning rate of the DPO stage
    config.optimizer.warmup_steps = 10  # linear warmup from 0, in optimizer steps
    config.optimizer.decay = "cosine"  # after warmup: "constant", "cosine", "linear"
    config.optimizer.final_fraction = 0.1  # end rate / peak rate for cosine and linear, [0, 1]
    config.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay (0 for rmsprop)
    config.optimizer.b1 = 0.9  # AdamW first-moment decay
    config.optimizer.b2 = 0.999  # AdamW second-moment decay
    config.optimizer.eps = 1e-8  # AdamW / RMSprop epsilon
    config.optimizer.rmsprop_decay = 0.9  # RMSprop squared-gradient decay
    config.optimizer.max_grad_norm = 1.0  # clip the global gradient norm; 0 = no clipping
    # Comma-separated regexes over param paths ("layers/attn/q_kernel"; with LoRA the adapters'
    # paths): only matching params train, the rest frozen with no optimizer state (optax
    # partition); "" = all. E.g. "attn/" trains attention only.
    config.optimizer.trainable = ""  # regexes, or "" for every param
    config.optimizer.grad_accum_steps = 1  # micro-batches per step (B % (steps·data·fsdp) == 0)

    # Mesh
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data-parallel axis size; -1 = all remaining devices
    config.mesh.fsdp = 1  # params sharded along "embed" and batch split over it; -1 = the rest
    config.mesh.tensor = 1  # tensor-parallel axis size (heads, MLP, vocabulary); -1 = the rest
    config.mesh.sequence = 1  # context parallelism: rows split along T over it; -1 = the rest
    config.mesh.num_devices = -1  # use the first N devices; -1 = all
    config.mesh.rules = DEFAULT_RULES  # (logical axis, mesh axis or None) pairs

    # Checkpointing
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 100  # save every N optimizer steps (and at a stage's end)
    config.checkpoint.keep = 2  # keep the last N checkpoints of each stage
    config.checkpoint.export_hf = True  # write the final policy to <workdir>/hf (safetensors)
    config.checkpoint.async_save = True  # False: a save finishes before the next step (less RAM)
    # A rerun of a workdir whose saved run config differs in a field that changes the run (model,
    # data, loss, optimizer, seed) is refused, naming the fields; True: warn and go on.
    config.checkpoint.allow_changed_config = False  # bool

    # Guards (divergence and collapse)
    config.guards = ml_collections.ConfigDict()
    # A step whose loss, gradient norm or new params are not finite is never applied; then:
    config.guards.on_nonfinite = "stop"  # "stop" (an error naming the step) or "skip" (go on)
    config.guards.max_skipped_steps = 10  # on_nonfinite="skip": stop after N skipped in a row
    config.guards.collapse_patience = 3  # warn after N log steps in a row of a collapsed policy
    # At step 1 the policy must still be its reference (rewards 0, sigmoid loss ln 2): else stop.
    config.guards.check_step0 = True  # bool

    # Logging
    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 20  # fetch and write train metrics every N steps
    config.log.eval_every_steps = 100  # evaluate on held-out pairs every N steps; 0 = at the end
    config.log.num_eval_batches = 0  # eval batches per evaluation; 0 = the whole eval set
    config.log.progress_bar = True  # tqdm bar with loss, reward accuracy, tokens/s
    config.log.tensorboard = True  # TensorBoard event files in <workdir>/<stage>/tb
    # Weights & Biases (process 0 only; W&B's own settings apply, e.g. WANDB_MODE=offline): the
    # config, every metric as <stage>/<split>/<name> and the summary table; a resume continues
    # the W&B run whose id is in <workdir>/wandb_run_id.
    config.log.wandb_project = ""  # W&B project name; "" = no W&B
    config.log.wandb_entity = ""  # W&B entity (user or team); "" = W&B's default

    _apply_variant(config, arg or "")
    config.lock()
    return config


def _apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/default.py; known: {VARIANTS}")
    if variant == "tiny":
        config.model.hidden_size = 32
        config.model.intermediate_size = 64
        config.model.num_layers = 1
        config.model.head_dim = 8
        config.data.num_train_pairs = 64
        config.data.num_eval_pairs = 16
        config.data.batch_size = 8
        config.data.eval_batch_size = 16
        config.sft.num_steps = 2
        config.dpo.num_steps = 2
        config.reward_model.num_steps = 2
        config.ppo.num_steps = 2
        config.ppo.rollout_batch_size = 8
        config.checkpoint.every_steps = 2
        config.log.every_steps = 1
        config.log.eval_every_steps = 0
        config.log.progress_bar = False
    elif variant == "dpo_paper":
        config.data.batch_size = 64
        config.optimizer.name = "rmsprop"
        config.optimizer.learning_rate = 1e-6
        config.optimizer.warmup_steps = 150
        config.optimizer.decay = "constant"
        config.dpo.beta = 0.1
        config.dpo.num_steps = 400
    elif variant == "precomputed_ref":
        config.dpo.reference = "precomputed"
    elif variant == "tr_dpo":
        config.dpo.reference = "moving"
        config.dpo.ref_sync_every = 16
        config.dpo.ref_sync_alpha = 0.6
    elif variant == "lora":
        config.lora.rank = 8
        config.lora.alpha = 16.0
        config.dpo.reference = "adapters_off"
        # Adapters start at B = 0 and move the model through a rank-8 product: the usual LoRA
        # practice of a rate about 10x full fine-tuning's.
        config.optimizer.learning_rate *= 10
    elif variant == "kto":
        config.dpo.loss_type = "kto"
        config.dpo.beta = 2.0
    elif variant == "packed":
        config.data.pairs_per_row = 2
        config.data.max_length = 36
        config.data.batch_size = 16

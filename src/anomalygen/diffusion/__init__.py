"""The shared diffusion core: every diffusion method plugs its own idea into these hooks.

It knows no paper. Import the submodules directly (they import diffusers; the package root does
not, so model-free use stays light).

``backbone``
    ``load_backbone(model=None, device=None, dtype="fp32") -> Backbone`` with ``.unet .vae
    .text_encoder .tokenizer .scheduler_config .device .dtype .untrained .vae_scale_factor
    .latent_channels .native_resolution .resolution(requested) .label .noise_scheduler()``.
    ``model``: hub id, local diffusers folder or ``"tiny"``; default ``$ANOMALYGEN_MODEL`` else SD
    1.5. Two layouts, read from ``model_index.json``: Stable Diffusion (``vae/`` AutoencoderKL,
    ``text_encoder/`` CLIP) and CompVis LDM text-to-image (``vqvae/`` AutoencoderKL or VQModel,
    ``bert/`` LDMBertModel, BERT tokenizer). Missing weights -> ``ModelNotFoundError`` saying what
    to download and how to point at it; another layout -> ``DataError`` saying what the folder has.
    Components are frozen (``requires_grad=False``). ``build_backbone(configs, tokenizer, name=)``:
    random-init parts from config dicts (labelled untrained). ``resolution(None)`` is the native
    size (UNet sample size × autoencoder factor); a smaller one warns on trained weights.
``tiny``
    The test preset: configs of a small UNet/VAE/CLIP (``tiny_configs``; latent downsampling 2,
    text dim 32) + a locally built CLIP BPE tokenizer (``write_tokenizer_files(dir, words,
    single_tokens=False)``: with ``single_tokens`` every word is one token; ``clip_words(text)``;
    ``tiny_tokenizer``).
``conditioning``
    ``PromptEncoder(text_encoder, tokenizer, {"<name>": k})(prompts, {"<name>": (k,D) or (B,k,D)})
    -> EncodedPrompts(hidden_states (B,77,D), positions {name: [[token positions] per row]})``:
    vectors replace the placeholder's k input embeddings (gradients flow); the encoder adds its
    placeholder tokens to its own copy of the tokenizer (CLIP or BERT); ``word_embedding(word)``
    for initialisation; ``encoder=`` calls another module (e.g. the trainer's DDP wrapper). Extra
    tokens may also be concatenated to ``hidden_states`` directly. ``.pooled`` (B, P): the pooled
    prompt embedding (CLIP's end-token state, projected when the encoder is
    ``CLIPTextModelWithProjection``; None for LDMBert).
``image_encoder``
    ``load_image_encoder(source=None, model=, device=, dtype=)``: the frozen CLIP image encoder
    (``CLIPVisionModelWithProjection``) from a hub id, a folder (itself or its ``image_encoder/``)
    or ``"tiny"``; None: the base model folder's ``image_encoder/``, else CLIP ViT-L/14.
    ``image_embeds(encoder, images in [0, 1]) -> (B, P)`` projected embeddings (CLIP preprocessing
    in torch); ``build_image_encoder(config)`` (random; ``architectures.SD15_IMAGE_ENCODER``).
``attention``
    ``handle = install_hooks(unet, factory, layers=None)`` with ``layers = select_layers(unet,
    kinds=("self","cross"), blocks=("down","mid","up"), levels=None)`` (``AttnLayer.name/block/
    level/kind``); ``factory(layer) -> [hooks]``. Installs compose (a second install on a layer runs
    the first's hooks, then its own); ``remove_hooks(unet, handle)`` gives those layers back exactly
    the processors they had before that install (last install first); ``remove_hooks(unet)`` undoes
    every install. Hooks (``nn.Module``, state on the object) override stages ``context`` (K/V
    source), ``logits``, ``probabilities``, ``output`` (after ``to_out``, before the residual,
    (B,N,C)); in list order. ``AttentionReweight(stage="logits"|"log_logits"|
    "probabilities", renormalise=False)`` (``.weights`` (B,1,h,w) map, ``.positions`` per row,
    ``.rows`` of the UNet batch, e.g. ``StepState.cond_rows``: those tokens' attention × weight per
    pixel), ``ReferenceKV(mix=use_reference)`` (``.mode`` "record"/"inject"/"off", ``.targets``,
    ``.reference_rows`` (reference from rows of the same batch), ``.stored``; ``mix(own, reference)
    -> K/V source``, a module mix trains), ``AttentionRecorder`` (``.maps``). Subclass
    ``AttentionHook`` for new ones. SDPA is kept unless a hook needs logits/probabilities.
``lora``
    ``add_adapters(unet, names, rank=32, alpha=None (= rank), targets=("to_q","to_k","to_v",
    "to_out.0"))``: one peft LoRA per name on every attention layer, all active and trainable
    (diffusers'/peft's ``set_adapter`` would freeze the others); ``trainable_parameters(unet, name)``
    (that adapter's A/B weights); ``route(unet, row_adapters)``: context manager in which UNet batch
    row i uses adapter ``row_adapters[i]`` (``BASE``: none) via peft's mixed-batch layer forward
    (diffusers drops ``adapter_names``); gradients reach each adapter from its rows only; the list
    must match the batch (CFG: one entry per stacked row). The same functions work on a text encoder
    with ``targets=TEXT_TARGETS``. ``save_adapter(unet, name, folder, text_encoder=, text_name=)``
    writes ``pytorch_lora_weights.safetensors`` (UNet and optional text-encoder LoRA; diffusers'
    ``load_lora_weights`` reads it); ``load_adapter(unet, folder, name, text_encoder=, text_name=)``;
    ``activate_all`` (undo a ``set_adapter``); ``adapter_names``, ``lora_layers``.
``sampling``
    ``sample_latents(backbone, cond, generators, latent_size=, sampler="ddim"|"dpm++"|"pndm",
    num_inference_steps=, eta=, guidance_scale=, uncond_hidden_states=, known_latents=, mask=,
    callback=, denoiser=, conditioning=)`` (blended latent diffusion when ``known_latents`` and ``mask`` are given;
    ``denoiser(model_in, t, context) -> ε`` replaces the UNet call, e.g. to run extra rows;
    ``callback(StepState)`` before each UNet call may change ``.latents``/
    ``.encoder_hidden_states`` or hook state; ``.cond_rows`` = the conditional rows of the UNet
    batch; ``conditioning(t) -> encoder_hidden_states`` is the per-timestep conditioning hook: the
    conditional rows' context for step t, e.g. a timestep-dependent embedding); ``blended_generate(backbone, cond, good, masks, generators, resolution=,
    final_paste=True, **sampling) -> uint8 images``;
    ``sample_generators(seed, indices)`` (sample i depends on (seed, i) only); ``encode_images``,
    ``encode_posterior`` (mean and std of the latent posterior),
    ``decode_latents`` (chunked), ``latent_mask``, ``to_tensor``, ``to_uint8``, ``paste``,
    ``make_scheduler``.
``tokens``
    ``TypeTokens(types, num_tokens, init)``: ``k`` learnable input embeddings per defect type
    (``module(type_indices) -> (B, k, D)``), initialised from a word's embedding.
``train``
    ``train(modules, loss_fn, config, validate=None) -> TrainResult``: one accelerate loop for
    "these parameters, this loss" with bf16, gradient accumulation, ``max_steps`` + wall-time
    budget, safetensors+JSON checkpoints of the trainable state, exact resume, validation grids,
    CSV (+ TensorBoard) loss log, an optional EMA of the trainable weights (``ema_decay``,
    ``ema.safetensors`` in each checkpoint); ``load_trainable(path)``; ``save_grid``;
    ``batch_share(batch_size)`` (a DDP process's rows of the global batch).
"""

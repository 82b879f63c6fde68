"""The kit every diffusion method is built from (as peft's ``BaseTuner`` is for its tuners): the
lifecycle written once, so that a method folder holds only its options, its loss, its
``sample_batch`` and its equations.

``config``
    ``diffusion_options(**changed)``: the options every diffusion method shares (base model,
    device, precision, batch, seed, sampler, guidance, resolution, checkpoints, ...); a method
    changes a default by passing the option again and adds its own after them.
``method``
    ``DiffusionMethod``: options validated when it is built, the base model and the prompt encoder
    (with the method's ``placeholders()``) loaded on first use, the guards and chunks of
    ``generate`` (each chunk a ``Batch`` handed to the method's ``sample_batch``), the training
    draws (picks, timesteps, noise), ``TrainConfig`` from the options and the core's loop in
    ``work_dir``, the ``{name}.json`` meta file of a saved model.
``batch``
    ``Batch``: one chunk of samples with everything drawn per sample from ``(seed, i)``: its defect
    type, good image, random generator and torch generator; ``subset`` / ``split`` for groups.
``state``
    Saving and loading learned state: named modules in one safetensors file, training masks as
    PNGs, a saved tensor copied in with its shape checked.

The kit is no method: methods import it, never each other.
"""

"""From a fitted generator to a finished output folder: the parts of ``generate`` below the pipeline.

``validity``
    The four checks of one (image, mask) pair (visible, aligned, on the object, plausible size),
    calibrated on the real training defects; ``judge`` applies them under a method's outside-mask policy.
``redraw``
    The filter's policy: redraw seeds (``sub_seed``), ``first_valid``, the ``DrawBudget`` that stops a
    run, ``filtered`` (a generator's samples, each one valid or redrawn).
``writer``
    ``SampleWriter``: the MVTec-layout output of one run, its manifest and ``run.json``, resume.
``sharding``
    Generation sharded over processes (``generate --processes N``), the same output as one process.

It imports methods only through the generator interface (``methods.base``), never a method itself.
"""

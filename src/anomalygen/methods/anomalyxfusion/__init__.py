"""AnomalyXFusion (Hu et al., "AnomalyXFusion: Multi-modal Anomaly Synthesis with Diffusion", 2024).

Modules follow the paper: ``config`` (the options, each default named for its source), ``mif``
(Multi-modal In-Fusion: semantic, location and textural embeddings, their concatenation and the
aggregator, Eqs. 1-5), ``ddf`` (Dynamic Dif-Fusion: the timestep-conditioned X-embedding, Eq. 14),
``generator`` (training loss Eq. 17, blended sampling Eq. 16, ablations, save / load) on the
diffusion kit (``methods/kit``). No official code; the authors' partial code
(``hujiecpp/MVTec-Caption``) gives the loss, prompt and base model. Captions: ``anomalygen.data.captions``.
"""

from anomalygen.methods.anomalyxfusion.generator import AnomalyXFusion

__all__ = ["AnomalyXFusion"]
